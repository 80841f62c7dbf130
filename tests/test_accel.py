"""`training.accelerate`: `off` installs none of tunelab/accel's speed pieces, and trains as `auto` does."""

import contextlib

import pytest
import torch
from test_attention import band_masks
from test_fast_lora import dropout_drawing_fast_masks
from test_training import losses, make_cfg  # tests/ is on sys.path (conftest.py)

import tunelab
from tunelab import accel
from tunelab.accel import attention, compact, fast_lora, head, memory, norm, swiglu, threads
from tunelab.config import ConfigError, load_config
from tunelab.methods import get
from tunelab.models import count_parameters
from tunelab.models import loss as L
from tunelab.testing import save_bf16_valued_tiny_model_dir, tiny_llama


def test_the_setting_validates():
    assert load_config({}).training.accelerate == "auto"
    assert load_config({"training": {"accelerate": "off"}}).training.accelerate == "off"
    assert load_config({}, ["training.accelerate=off"]).training.accelerate == "off"  # YAML reads a bare off as false
    assert load_config({"training": {"accelerate": False}}).training.accelerate == "off"
    with pytest.raises(ConfigError, match="accelerate"):
        load_config({"training": {"accelerate": "fast"}})
    assert "plain PyTorch" in type(load_config({}).training).model_fields["accelerate"].description


def _prepared(accelerate: str, packing: bool = True):
    """A LoRA model with the bf16-valued tiny base after `speed.prepare`, as the loop makes it."""
    cfg = load_config(
        {
            "data": {"packing": packing},
            "method": {"name": "lora", "r": 4, "dropout": 0.0},
            "training": {"accelerate": accelerate, "device": "cpu"},
        }
    )
    base = tiny_llama()
    for p in base.parameters():
        p.data = p.data.bfloat16().float()
    model = get("lora").apply(base, cfg.method)
    speed = accel.start(cfg.training, torch.device("cpu"))
    speed.prepare(model, cfg, count_parameters(model)[1], multi=False)
    return model, speed


def _speed_pieces(model) -> list[str]:
    """Every trace a speed piece leaves on a model."""
    inner = model.get_base_model()
    found = [
        f"{name}: {k}"
        for name, m in model.named_modules()
        for k in ("_peft_forward", "_plain_forward")
        if k in m.__dict__
    ]
    found += [
        f"{name}: {type(m).__name__}"
        for name, m in model.named_modules()
        if isinstance(m, (compact.CompactLinear, compact.CompactEmbedding))
    ]
    found += [k for k in (L.PACKED_INPUTS, L.FUSED_HEAD) if hasattr(inner, k)]
    if inner.config._attn_implementation == attention.NAME:
        found.append("packed attention")
    return found


def test_off_installs_no_speed_piece_and_auto_installs_them(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model, speed = _prepared("off")
    assert _speed_pieces(model) == []
    assert speed.shares == 1 and speed.compacted == 0 and not speed.pieces
    assert isinstance(speed.forward(), contextlib.nullcontext)
    assert speed.describe().startswith("accelerate: off: plain PyTorch + PEFT")

    model, speed = _prepared("auto")
    found = _speed_pieces(model)
    assert any("_peft_forward" in f for f in found) and any("_plain_forward" in f for f in found)  # LoRA, MLP, norm
    assert any("CompactLinear" in f for f in found) and "packed attention" in found
    assert L.PACKED_INPUTS in found and L.FUSED_HEAD in found
    assert speed.shares == 2 and speed.compacted > 0
    line = speed.describe()
    for piece in ("fast LoRA", "fused RMSNorm", "per-example attention", "fused LM head", "kept compact", "shares"):
        assert piece in line, piece
    from tunelab.accel import attention_backward

    attention_backward._scratch((1, 4, 4), torch.zeros(1, dtype=torch.bfloat16))  # as a products backward leaves it
    speed.release(model, expand=True)  # dense weights back, scratch buffers dropped
    assert not compact._SCRATCH
    assert not any(isinstance(m, compact.CompactLinear) for m in model.modules())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_encoder_classifier_gets_no_packed_attention_line(attn):
    """Packed attention and unpadded rows are for causal LMs' rows (and packed ones): an encoder classifier's log
    says nothing about them, SDPA or not; a causal LM with eager attention says why it stays off."""
    from tunelab.testing import tiny_bert

    cfg = load_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}, "training": {"device": "cpu"}})
    model = get("lora").apply(tiny_bert(attn_implementation=attn), cfg.method)
    speed = accel.start(cfg.training, torch.device("cpu"))
    speed.prepare(model, cfg, count_parameters(model)[1], multi=False)
    assert "attention" not in speed.describe()
    model = get("lora").apply(tiny_llama(attn_implementation="eager"), cfg.method)
    speed = accel.start(cfg.training, torch.device("cpu"))
    speed.prepare(model, cfg, count_parameters(model)[1], multi=False)
    assert "packed attention: the model's attention is not SDPA" in speed.describe()


def _prepared_lora(dropout: float, autocast: bool = False, **training):
    cfg = load_config({"method": {"name": "lora", "r": 4, "dropout": dropout},
                       "training": {"device": "cpu", **training}})  # fmt: skip
    model = get("lora").apply(tiny_llama(), cfg.method)
    speed = accel.start(cfg.training, torch.device("cpu"))
    speed.prepare(model, cfg, count_parameters(model)[1], multi=False, autocast=autocast)
    return model, speed


def test_bf16_passes_log_the_compiled_norm_rows_and_attention_backward_or_why_not(monkeypatch):
    """In bf16 on a CPU the log line names RMSNorm's compiled rows and the attention backward's products; where
    neither builds (no C compiler) one "not on" line each says so and what turns it on."""
    from tunelab.accel import compiled

    def prepared():
        cfg = load_config({"model": {"dtype": "bfloat16"}, "data": {"packing": True},
                           "method": {"name": "lora", "r": 4, "dropout": 0.0}, "training": {"device": "cpu"}})  # fmt: skip
        model = get("lora").apply(tiny_llama().to(torch.bfloat16), cfg.method)
        speed = accel.start(cfg.training, torch.device("cpu"))
        speed.prepare(model, cfg, count_parameters(model)[1], multi=False, autocast=True)
        return speed

    if compiled.load("probe", "void f(void) {}", {"f": []}) is None:
        pytest.skip(f"no C compiler: {compiled.why_not('probe')}")
    speed = prepared()
    line = speed.describe().splitlines()[0]
    assert "fused RMSNorm (5), its bf16 rows compiled" in line
    assert "bf16 examples of 128+ tokens: the backward as bf16 products and a compiled pass" in line
    assert not any("compiled" in s for s in speed.skipped)
    nothing = "no C compiler (cc or gcc on PATH, or $CC)"
    monkeypatch.setattr(compiled, "_loaded", {"rms_norm": nothing, "attention_backward": nothing})
    speed = prepared()
    first = speed.describe().splitlines()[0]
    assert "its bf16 rows compiled" not in first and "as bf16 products" not in first
    assert [s for s in speed.skipped if "compiled rows" in s or "bf16 products" in s] == [
        f"RMSNorm's compiled rows: {nothing}; torch's operations run (~3x slower a norm; a C compiler, cc or gcc, "
        "turns it on)",
        f"attention backward as bf16 products: {nothing}; the flash kernel's backward runs (~1.5x slower; a C "
        "compiler, cc or gcc, turns it on)",
    ]


def test_lora_dropout_takes_the_fast_path_and_the_log_says_why_a_piece_stays_off(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model, speed = _prepared_lora(0.1)
    line = speed.describe()
    assert "fast LoRA (14 layers, its dropout masks drawn by a compiled loop)" in line and "2 shares" in line
    assert speed.skipped == [] and "not on" not in line
    assert "fast LoRA (14 layers)" in _prepared_lora(0.0)[1].describe()  # no dropout: no masks to draw
    from tunelab.accel import compiled, masks

    monkeypatch.setattr(compiled, "_loaded", {"lora_masks": "no C compiler (cc or gcc on PATH, or $CC)"})
    _, speed = _prepared_lora(0.1)  # the masks from torch's generator, and the log says why
    assert "fast LoRA (14 layers)" in speed.describe() and masks.load() is None
    assert speed.skipped == ["compiled LoRA dropout masks: no C compiler (cc or gcc on PATH, or $CC); torch's "
                             "generator draws them (~10x slower a mask; a C compiler, cc or gcc, turns it on)"]  # fmt: skip
    monkeypatch.undo()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # one log line per piece not on: what stays off, why, and the setting that turns it on
    _, speed = _prepared_lora(0.1, autocast=True, gradient_checkpointing=True)
    lines = speed.describe().splitlines()
    assert lines[0].startswith("accelerate: auto (tunelab/accel): ") and len(lines) == 4
    assert "fused LM head + cross-entropy (its products in bf16 under autocast)" in lines[0]  # a CPU's autocast
    # an fp32 model under autocast: its passes are not bf16 by themselves (bf16 passes: tests/test_precision.py)
    assert lines[1].startswith("accelerate: not on: bf16 passes without autocast: the frozen ")
    assert lines[2] == ("accelerate: not on: fast LoRA: bf16 autocast; PEFT's own forward runs "
                        "(model.dtype: float32 takes it)")  # fmt: skip
    assert "thread shares: LoRA dropout with gradient checkpointing" in lines[3]
    assert "training.gradient_checkpointing: false" in lines[3]
    base = tiny_llama()
    base.config.attention_dropout = 0.1
    cfg = load_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}, "training": {"device": "cpu"}})
    speed = accel.start(cfg.training, torch.device("cpu"))
    speed.prepare(get("lora").apply(base, cfg.method), cfg, 10**6, multi=False)
    assert speed.skipped == ["thread shares: dropout outside the fast LoRA layers is active: threads would draw "
                             "its random numbers in a different order each run; each pass runs on all threads"]  # fmt: skip
    off = load_config({"training": {"accelerate": "off", "pass_threads": 2, "compact_frozen": False}}).training
    assert "(ignored: training.compact_frozen, training.pass_threads)" in accel.Speed(off, "cpu").describe()


def test_an_off_run_calls_no_speed_code(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a speed piece ran with training.accelerate: off")

    for module, name in [(fast_lora, "enable"), (norm, "install"), (norm, "recomputed_outputs"),
                         (attention, "install"), (head, "install"), (compact, "compact_frozen_linears"),
                         (compact, "expand_compact"), (threads, "parts_for"), (threads, "run"),
                         (threads, "shutdown"), (accel, "sharded_step"), (memory, "release_freed_memory"),
                         (memory, "allocator_note")]:  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    cfg = make_cfg(tiny_dir, data_file, tmp_path / "off", max_steps=3, accelerate="off")
    cfg.data.packing, cfg.data.max_length, cfg.method.dropout = True, 160, 0.0
    assert tunelab.train(cfg).metrics["steps"] == 3
    assert "accelerate: off: plain PyTorch + PEFT" in capsys.readouterr().err
    assert not memory.wants_tbbmalloc(cfg.training) and not memory.skip_unused_imports(cfg)


@pytest.mark.parametrize("method", ["lora", "lora-dropout", "full", "prompt", "prefix"])
def test_off_and_auto_give_the_same_losses_step_by_step(method, data_file, tmp_path, monkeypatch):
    """LoRA: fast LoRA and SwiGLU, fused norm, packed attention, fused head, compact weights and two thread
    shares against plain PyTorch + PEFT; lora-dropout: the same with LoRA dropout 0.1 in one share (PEFT's
    dropout drawing the fast path's masks from torch's generator); full: fused norm, SwiGLU MLPs as one function
    (accel/swiglu.py) and the fused head with the head's (tied) weight gradient; prompt / prefix (unpacked): the fused head at the label positions of PEFT's forward against
    the full logits."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two shares on any machine (auto)
    calls = []
    monkeypatch.setattr(accel, "sharded_step", lambda *a, _f=accel.sharded_step: calls.append(1) or _f(*a))
    folder = save_bf16_valued_tiny_model_dir(tmp_path / "model")

    def run(accelerate):
        cfg = make_cfg(folder, data_file, tmp_path / accelerate, max_steps=4, accelerate=accelerate)
        cfg.data.packing, cfg.data.max_length = True, 160
        if method == "lora":
            cfg.method.dropout = 0.0
        elif method == "lora-dropout":
            cfg.method.dropout, cfg.training.pass_threads = 0.1, 1
        elif method in ("prompt", "prefix"):
            cfg = load_config({**cfg.model_dump(), "method": {"name": method, "num_virtual_tokens": 4},
                               "data": {**cfg.data.model_dump(), "packing": False},
                               "training": {**cfg.training.model_dump(), "lr": 1e-2}})  # fmt: skip
        else:
            cfg = load_config(
                {**cfg.model_dump(), "method": {"name": "full"}, "training": {**cfg.training.model_dump(), "lr": 1e-3}}
            )
        result = tunelab.train(cfg)
        return losses(tmp_path / accelerate), result.metrics

    fused = []
    monkeypatch.setattr(head._HeadCrossEntropy, "apply",
                        lambda *a, _f=head._HeadCrossEntropy.apply: fused.append(1) or _f(*a))  # fmt: skip
    mlps, fast_mlps = [], []
    monkeypatch.setattr(swiglu._SwiGLU, "apply", lambda *a, _f=swiglu._SwiGLU.apply: mlps.append(1) or _f(*a))
    monkeypatch.setattr(fast_lora._SwiGLU, "apply",
                        lambda *a, _f=fast_lora._SwiGLU.apply: fast_mlps.append(1) or _f(*a))  # fmt: skip
    auto, auto_m = run("auto")
    assert fused  # every method here takes the fused head under auto
    # LoRA's MLPs are fast LoRA's own, and so are a soft prompt's over its compact frozen body
    assert bool(mlps) == (method == "full") and bool(fast_mlps) == (method != "full")
    if method in ("lora", "lora-dropout", "full"):
        assert bool(calls) == (method == "lora")  # full: most parameters train, no shares
    fused.clear()
    if method == "lora-dropout":  # PEFT's nn.Dropout drawing the fast path's masks (not torch's bernoulli_)
        dropout_drawing_fast_masks(monkeypatch)
    off, off_m = run("off")
    assert not fused
    assert auto.keys() == off.keys() and len(off) == 4
    for step in off:
        assert auto[step] == pytest.approx(off[step], rel=1e-5, abs=1e-6), step
    assert auto_m["eval_loss"] == pytest.approx(off_m["eval_loss"], rel=1e-5)
    assert auto_m["tokens"] == off_m["tokens"]


def test_bf16_on_a_cpu_collates_widths_rounded_up_to_the_shape_bucket():
    """oneDNN keeps a kernel per shape in bf16 (memory.shape_bucket): batches are padded to a multiple of
    SHAPE_BUCKET there, with padding like any other (labels ignored, mask 0, packed positions their own example);
    fp32 and `accelerate: off` keep the longest row's width."""
    from tunelab.data.collate import collate
    from tunelab.data.preference import collate_pairs

    rows = [{"input_ids": [5] * 7, "labels": [-100] * 3 + [5] * 4}, {"input_ids": [6] * 40, "labels": [6] * 40}]
    packed = [{**rows[0], "position_ids": list(range(3)) + list(range(4))}]
    cpu = torch.device("cpu")
    for setting, dtype, width in (
        ("auto", torch.bfloat16, 64),
        ("auto", torch.float32, 40),
        ("off", torch.bfloat16, 40),
    ):
        speed = accel.Speed(load_config({"training": {"accelerate": setting}}).training, cpu)
        with speed.collating(dtype):
            batch = collate(rows, pad_id=0)
            one = collate(packed, pad_id=0, width=12)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
        assert int(batch["attention_mask"].sum()) == 47 and int((batch["labels"] != -100).sum()) == 44
        assert one["position_ids"].shape[1] == (32 if width == 64 else 12)
        assert one["position_ids"][0, 7:10].tolist() == [0, 1, 2]  # the padding: an example of its own
    with accel.Speed(load_config({}).training, cpu).collating(torch.bfloat16):
        pairs = collate_pairs([{"chosen_input_ids": [1] * 9, "rejected_input_ids": [2] * 33,
                                "chosen_response_mask": [1] * 9, "rejected_response_mask": [1] * 33}], pad_id=0)  # fmt: skip
    assert {t.shape[1] for t in pairs.values() if t.ndim == 2} == {64}
    assert collate(rows, pad_id=0)["input_ids"].shape == (2, 40)  # outside the context: as before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gemma_with_examples_longer_than_its_window_trains_as_accelerate_off(tmp_path, data_file, dtype,
                                                                                monkeypatch):  # fmt: skip
    """Gemma 3 with a 16-token sliding window over packed rows of longer examples: under `auto` (two thread shares,
    fused norm and GeGLU MLP, packed attention with the window's band, fused head; bf16 passes in bf16) the losses of
    plain PyTorch + PEFT, where transformers' masked call runs every layer."""
    from tunelab.testing import tiny_causal, tiny_tokenizer

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    tok = tiny_tokenizer()
    model = tiny_causal("gemma3_text", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)  # fmt: skip
    model.save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")

    def run(accelerate):
        cfg = make_cfg(str(tmp_path / "gemma"), data_file, tmp_path / accelerate, max_steps=3, accelerate=accelerate)
        cfg.data.packing, cfg.data.max_length, cfg.method.dropout, cfg.model.dtype = True, 160, 0.0, dtype
        with band_masks() as bands:
            tunelab.train(cfg)
        return losses(tmp_path / accelerate), bands

    (auto, bands), (off, none) = run("auto"), run("off")
    assert bands and not none  # the local layer took the band for the longer examples, under auto only
    assert auto.keys() == off.keys() and len(off) == 3
    # bf16: within 1e-4 of the plain run's autocast losses; the window left out moves them by 1.4e-3 to 8e-3
    tol = {"rel": 1e-5, "abs": 1e-6} if dtype == "float32" else {"rel": 5e-4}
    for step in off:
        assert auto[step] == pytest.approx(off[step], **tol), step


def test_a_gemma_takes_the_fused_norm_and_mlp_and_another_activation_is_said():
    """Gemma 3's RMSNorm ((1 + w), in fp32) and GeGLU MLP are on the fast path; a gated MLP of another activation
    runs its own forward, and the log says so."""
    from transformers.activations import ACT2FN

    from tunelab.testing import tiny_causal

    def prepared(base):
        cfg = load_config({"method": {"name": "lora", "r": 4, "dropout": 0.0}, "training": {"device": "cpu"}})
        speed = accel.start(cfg.training, torch.device("cpu"))
        speed.prepare(get("lora").apply(base, cfg.method), cfg, 10**6, multi=False)
        return speed

    def gemma():
        return tiny_causal("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip

    speed = prepared(gemma())
    assert "fused RMSNorm (13)" in speed.describe() and not any("RMSNorm" in s or "MLP" in s for s in speed.skipped)
    base = gemma()
    for layer in base.model.layers:
        layer.mlp.act_fn = ACT2FN["relu"]
    assert "gated MLPs as one function: the MLPs' activation (ReLU) is neither SiLU nor GELU's tanh form" in (
        prepared(base).describe()
    )
