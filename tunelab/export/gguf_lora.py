"""A LoRA run as a GGUF adapter that llama.cpp applies at load time (`llama-cli -m BASE.gguf --lora FILE`).

The file holds, for each adapted weight W of the base model, the pair A (r x in) and B (out x r) under
llama.cpp's tensor name plus `.lora_a` / `.lora_b`; llama.cpp adds `scale * B (A x)` to that layer's
output, where scale = `adapter.lora.alpha` / r (the rank read from the tensors) times the user's
`--lora-scaled` factor. The layout follows llama.cpp's convert_lora_to_gguf.py:

  - Q and K projections: llama.cpp stores W's rows in its interleaved rotary order (export/gguf.py,
    `permute_qk`); B holds W's rows, so B is permuted the same way and A is not;
  - alpha: PEFT's `lora_alpha` when every layer's scale is alpha / r (plain LoRA); otherwise (rsLoRA,
    per-layer ranks or alphas) each layer's own scale is folded into its B and alpha is written as 0,
    which llama.cpp reads as "scale 1".

What llama.cpp cannot apply is refused, naming the layer: DoRA (magnitude vectors), LoRA on the
embedding, and layers that have no llama.cpp tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunelab.export import ExportError
from tunelab.export.gguf import PERMUTED_QK, check_model, gguf_architecture, permute_qk

LORA_TYPES = ("f32", "f16")  # llama.cpp also reads q8_0 pairs, but B's rows (length r) rarely fill a block


def lora_layers(model) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(Hugging Face weight name, A, B, scale) for each LoRA layer of a PEFT model (adapter "default")."""
    out = []
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                raise ExportError(f"{name}: LoRA on an embedding cannot be written as a llama.cpp adapter; "
                                  "export the merged model with --format gguf instead")  # fmt: skip
            continue
        if getattr(module, "use_dora", {}).get("default"):
            raise ExportError(
                f"{name}: DoRA adapters have no llama.cpp form; export the merged model with --format gguf"
            )
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()
        hf = name.removeprefix("base_model.model.") + ".weight"
        out.append((hf, a, b, float(module.scaling["default"])))
    if not out:
        raise ExportError("no LoRA layers in this run; --format gguf-lora writes LoRA / QLoRA runs")
    return out


def write_gguf_lora(model, path, quant: str = "f32", name: str | None = None) -> dict:
    """Write the LoRA layers of `model` (a PEFT LoRA model over a Llama-architecture or Qwen2 base) to `path`."""
    import gguf

    if quant not in LORA_TYPES:
        raise ExportError(f"--format gguf-lora takes --quant {' | '.join(LORA_TYPES)}, not {quant!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_model(base)
    arch = gguf_architecture(base)
    cfg = base.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    layers = lora_layers(model)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    alphas = {scale * a.shape[0] for _, a, _, scale in layers}
    alpha = alphas.pop() if len(alphas) == 1 else 0.0  # one alpha for the file, else each scale folded into B

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    writer.add_name(name or path.stem)
    dtype, gtype = (
        (np.float32, gguf.GGMLQuantizationType.F32) if quant == "f32" else (np.float16, gguf.GGMLQuantizationType.F16)
    )
    for hf, a, b, scale in layers:
        gg = names.get_name(hf, try_suffixes=(".weight",))
        if gg is None:
            raise ExportError(
                f"{hf}: no llama.cpp tensor for this LoRA layer; export the merged model with --format gguf"
            )
        if alpha == 0.0:
            b = b * scale
        if arch in PERMUTED_QK and hf.endswith("q_proj.weight"):  # the base's rows were permuted (gguf.py)
            b = permute_qk(b, n_head)
        elif arch in PERMUTED_QK and hf.endswith("k_proj.weight"):
            b = permute_qk(b, n_kv)
        writer.add_tensor(f"{gg}.lora_a", np.ascontiguousarray(a, dtype=dtype), raw_dtype=gtype)
        writer.add_tensor(f"{gg}.lora_b", np.ascontiguousarray(b, dtype=dtype), raw_dtype=gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return {"path": str(path), "bytes": path.stat().st_size, "quant": quant, "layers": len(layers),
            "alpha": alpha, "rank": sorted({a.shape[0] for _, a, _, _ in layers})}  # fmt: skip
