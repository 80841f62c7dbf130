"""RoPE scaling (`model.rope_scaling`, models/rope.py): the rotary frequencies a loaded model uses are exactly
what transformers' own RoPE init functions compute for the setting; dynamic leaves short inputs alone; the
setting survives save/load and reaches the GGUF metadata llama.cpp reads."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tunelab.config import ConfigError, ModelConfig, load_config
from tunelab.export.gguf import ExportError, write_gguf
from tunelab.models import ModelError, load_model
from tunelab.testing import save_tiny_model_dir

NATIVE = 256  # the tiny llama's max_position_embeddings
SETTINGS = {
    "linear": {"type": "linear", "factor": 2.0},
    "dynamic": {"type": "dynamic", "factor": 4.0},
    "yarn": {"type": "yarn", "factor": 4.0, "beta_fast": 16.0},
    "llama3": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("rope") / "m", head_dim=16)


def _reference(params: dict, seq_len=None):
    """transformers' own inv_freq and attention scaling for `params`, on a config built here from scratch."""
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=16, max_position_embeddings=NATIVE,
                      rope_parameters={"rope_theta": 10000.0, **params})  # fmt: skip
    if params["rope_type"] not in ("dynamic", "default"):
        cfg.max_position_embeddings = NATIVE * int(params["factor"])
    if params["rope_type"] == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)


@pytest.mark.parametrize(
    "raw, says",
    [
        ({"type": "ntk", "factor": 2}, "model.rope_scaling.type"),
        ({"type": "linear", "factor": 1}, "greater than 1"),
        ({"type": "llama3", "factor": 8}, "needs low_freq_factor, high_freq_factor"),
        ({"type": "linear", "factor": 2, "beta_fast": 8}, "does not take beta_fast"),
        ({"type": "yarn", "factor": 2, "beta_fast": 1, "beta_slow": 2}, "beta_fast must be greater"),
        ({"type": "linear", "factr": 2}, "unknown key 'model.rope_scaling.factr'"),
    ],
)
def test_bad_settings_are_named_before_any_load(raw, says):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config({"model": {"rope_scaling": raw}})
    assert says in str(e.value)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_frequencies_are_transformers_own(tiny, kind):
    model, _ = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS[kind]))
    params = dict(model.config.rope_parameters)
    want = {k: v for k, v in SETTINGS[kind].items() if k != "type"}
    assert params["rope_type"] == kind and {k: params[k] for k in want} == want
    ref_freq, ref_scale = _reference({k: v for k, v in params.items() if k != "rope_theta"})
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, ref_freq, rtol=0, atol=0)
    assert rotary.attention_scaling == pytest.approx(ref_scale)
    default, _ = _reference({"rope_type": "default"})
    if kind != "dynamic":  # dynamic starts at the default frequencies and changes with the length
        assert not torch.equal(rotary.inv_freq, default)
        assert model.config.max_position_embeddings == NATIVE * SETTINGS[kind]["factor"]
    if kind == "yarn":
        assert ref_scale == pytest.approx(0.1 * np.log(4.0) + 1)


def test_dynamic_keeps_short_inputs_and_rescales_long_ones(tiny):
    plain, _ = load_model(ModelConfig(name=tiny))
    dyn, _ = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS["dynamic"]))
    lin, _ = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS["linear"]))
    ids = torch.randint(3, 300, (1, NATIVE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dyn(ids).logits, plain(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(lin(ids).logits, plain(ids).logits, atol=1e-3)  # a scaling that does act
        long = torch.randint(3, 300, (1, 4 * NATIVE), generator=torch.Generator().manual_seed(1))
        dyn(long)
    params = {k: v for k, v in dyn.config.rope_parameters.items() if k != "rope_theta"}
    ref_freq, _ = _reference(params, seq_len=4 * NATIVE)
    torch.testing.assert_close(dyn.model.rotary_emb.inv_freq, ref_freq)
    assert not torch.equal(ref_freq, _reference({"rope_type": "default"})[0])


def test_saved_model_keeps_the_scaling(tiny, tmp_path):
    cfg = ModelConfig(name=tiny, rope_scaling=SETTINGS["yarn"])
    model, tok = load_model(cfg)
    model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, no tunelab
    assert back.config.rope_parameters == model.config.rope_parameters
    torch.testing.assert_close(back.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    # a run manifest stores model.model_dump(); loading it again (with the folder) is the same model
    again = ModelConfig(**cfg.model_dump())
    assert again == cfg
    tok.save_pretrained(tmp_path / "out")
    reloaded, _ = load_model(ModelConfig(**{**again.model_dump(), "name": str(tmp_path / "out")}))
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert reloaded.config.max_position_embeddings == NATIVE * 4
    with pytest.raises(ModelError, match="already has RoPE scaling"):
        load_model(ModelConfig(name=str(tmp_path / "out"), rope_scaling=SETTINGS["linear"]))


def test_models_without_rope_are_refused(tmp_path):
    bert = save_tiny_model_dir(tmp_path / "bert", arch="bert")
    with pytest.raises(ModelError, match="has no rotary position embeddings"):
        load_model(ModelConfig(name=bert, rope_scaling=SETTINGS["linear"]))


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if ".rope." in k or k.endswith("context_length")}


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_gguf_metadata_carries_the_scaling(tiny, tmp_path, kind):
    model, tok = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS[kind]))
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    f = _fields(tmp_path / "m.gguf")
    factor = SETTINGS[kind]["factor"]
    assert f["llama.rope.scaling.type"] == kind
    assert f["llama.rope.scaling.factor"] == pytest.approx(factor)
    assert f["llama.rope.scaling.original_context_length"] == NATIVE
    assert f["llama.context_length"] == NATIVE * factor
    assert f.get("llama.rope.scaling.yarn_beta_fast") == (16.0 if kind == "yarn" else None)


def test_gguf_llama3_writes_llama_cpp_frequency_divisors(tiny, tmp_path):
    model, tok = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS["llama3"]))
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    freqs = {t.name: np.array(t.data) for t in reader.tensors}["rope_freqs.weight"]
    default, _ = _reference({"rope_type": "default"})
    # llama.cpp rotates pair i by position * theta_i / rope_freqs[i]: that must be transformers' llama3 frequency
    np.testing.assert_allclose(default.numpy() / freqs, model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert freqs[0] == pytest.approx(1.0) and freqs[-1] == pytest.approx(4.0)  # high frequencies kept, low ones / F
    assert "llama.rope.scaling.type" not in reader.fields  # llama.cpp would apply a linear factor on top


def test_gguf_refuses_dynamic(tiny, tmp_path):
    model, tok = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS["dynamic"]))
    with pytest.raises(ExportError, match="no dynamic NTK"):
        write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_eval_perplexity_at_a_context_is_the_model_loss_per_window(tiny, tmp_path):
    from tunelab.evaluation.runner import evaluate

    text = " ".join(f"word{i % 37} and more text {i}" for i in range(200))
    (tmp_path / "held.txt").write_text(text)
    res = evaluate(tiny, "perplexity", data=str(tmp_path / "held.txt"), context=128, device="cpu", progress=False,
                   rope_scaling=SETTINGS["linear"])  # fmt: skip
    assert res["rope_parameters"]["rope_type"] == "linear" and res["native_context"] == NATIVE
    model, tok = load_model(ModelConfig(name=tiny, rope_scaling=SETTINGS["linear"]))
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // 128
    with torch.no_grad():  # transformers' own shifted loss, window by window
        losses = [float(model(input_ids=torch.tensor([ids[i * 128 : (i + 1) * 128]]), labels=torch.tensor(
            [ids[i * 128 : (i + 1) * 128]])).loss) for i in range(n)]  # fmt: skip
    assert res["metrics"]["windows"] == n and res["metrics"]["tokens"] == n * 127
    assert res["metrics"]["loss"] == pytest.approx(sum(losses) / n, rel=1e-5)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--context", "64"], "needs --data FILE"),
        (["--data", "x.txt", "--context", "64", "--rope-scaling", "{type: yarn, factor: 0.5}"], "greater than 1"),
        (["--data", "missing.txt", "--context", "64"], "missing.txt: file not found"),
    ],
)
def test_eval_perplexity_flags_are_checked(tiny, capsys, flags, says):
    from tunelab.cli import main

    assert main(["eval", tiny, "--task", "perplexity", *flags]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 16}, {"name": "full"}])
def test_a_run_trained_with_scaling_reloads_with_it(tiny, tmp_path, method):
    import json

    import tunelab
    from tunelab.stages.runs import load_run

    rows = [{"text": f"count {i} {i + 1} {i + 2} and so on to {i + 9}"} for i in range(16)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "output_dir": str(tmp_path / "run"), "stage": "pretrain",
        "model": {"name": tiny, "rope_scaling": SETTINGS["linear"]},
        "data": {"train": str(tmp_path / "t.jsonl"), "val_fraction": 0.25, "max_length": 64, "packing": True},
        "method": method,
        "training": {"max_steps": 2, "batch_size": 2, "progress": False, "tensorboard": False},
    })  # fmt: skip
    run = tunelab.train(cfg).run_dir
    manifest = json.loads((run / "final" / "tunelab.json").read_text())
    assert manifest["base_model"]["rope_scaling"]["type"] == "linear"
    model, _ = load_run(str(run), device="cpu")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert inner.config.rope_parameters["rope_type"] == "linear" and inner.config.rope_parameters["factor"] == 2.0
    ref, _ = _reference({"rope_type": "linear", "factor": 2.0})
    torch.testing.assert_close(inner.model.rotary_emb.inv_freq, ref, rtol=0, atol=0)
