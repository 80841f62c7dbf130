"""Other toolkits' configs in tunelab: LLaMA-Factory and Axolotl YAML files, detected by their keys and
translated into a tunelab config dict, with a report of which keys were mapped, which ignored and why.

    from tunelab.interop.convert import convert_file
    result = convert_file("qwen3_lora_sft.yaml")      # Translation: .tool, .config (a dict), .mapped, .ignored
    print(result.report())

`tunelab/peer_keys.py` holds the key tables (it imports nothing and sits beside config, which hints with them);
`llamafactory.py` and `axolotl.py` do the translation; `convert.py` detects and loads. See docs/interop.md.
"""
