"""model.dtype resolved per device (models/precision.py): native bf16 detected from the CPU's flags, the choice
`auto` makes and why, and bf16 autocast with fp32 master weights on a CPU training to the fp32 loss."""

import json

import pytest
import torch

import tunelab
from tunelab.bf16_table import measured_bf16, measured_text
from tunelab.config import load_config
from tunelab.models import compute_dtype, precision
from tunelab.models.precision import choose_precision, cpu_flags, native_bf16

# /proc/cpuinfo excerpts of the hosts the issue names, cut to the lines that matter
ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma\n"
XEON_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512vl\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    "cpuinfo, native, said",
    [
        (ZEN4, True, "avx512_bf16"),
        (SAPPHIRE_RAPIDS, True, "amx_bf16"),
        (GRAVITON3, True, "bf16"),
        (ZEN3, False, "AVX2"),
        (XEON_AVX512, False, "AVX-512"),
        ("", False, "no CPU flags"),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native, said):
    ok, why = native_bf16("cpu", cpu_flags(cpuinfo))
    assert ok is native and said in why


def test_this_hosts_flags_are_read(monkeypatch):
    """The real file is read when no text is given (the mocked reads above parse the same lines)."""
    monkeypatch.setattr(precision, "Path", lambda _: type("F", (), {"read_text": lambda self: ZEN4})())
    assert "avx512_bf16" in cpu_flags() and native_bf16("cpu")[0]
    monkeypatch.setattr(precision, "Path", lambda _: type("F", (), {"read_text": lambda self: XEON_AVX512})())
    assert not native_bf16("cpu")[0]


def test_auto_keeps_fp32_on_cpus_until_bf16_is_measured_faster(monkeypatch):
    for info in (ZEN3, XEON_AVX512, ZEN4):
        p = choose_precision("auto", "cpu", cpu_flags(info))
        assert (p.dtype, p.autocast) == (torch.float32, False)
    assert "model.dtype: bfloat16 tries it" in choose_precision("auto", "cpu", cpu_flags(ZEN4)).reason
    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)  # what a measurement on a native host would switch on
    p = choose_precision("auto", "cpu", cpu_flags(ZEN4), measured=True)
    assert (p.dtype, p.autocast, p.name) == (torch.bfloat16, True, "bfloat16 autocast, fp32 master weights")
    assert "avx512_bf16" in p.reason
    assert not choose_precision("auto", "cpu", cpu_flags(ZEN3), measured=True).autocast  # emulated stays fp32
    p = choose_precision("auto", "cpu", cpu_flags(ZEN4))  # not a measured training run (a load to chat, freeze ...)
    assert (
        p.dtype == torch.float32
        and "(training.accelerate: auto, but for qlora): lora / prompt / prefix (causal-LM stages) / qlora (causal-LM stages) / lora (kto) / qlora (kto): bf16 passes;"
        in p.reason
    )


def test_which_runs_take_bf16_under_auto_and_the_log_says_the_same(monkeypatch):
    """One table (MEASURED_BF16) decides which training runs are measured faster in bf16 and writes the log's list."""
    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    assert measured_bf16("lora", "dpo", True) and not measured_bf16("lora", "sft", False)
    assert measured_bf16("lora", "kto", True) and measured_bf16("full", "kto", True)  # measured: LoRA, QLoRA, full
    assert measured_bf16("qlora", "kto", False)
    assert not measured_bf16("bitfit", "kto", True)  # not measured
    assert not measured_bf16("lora", "classification", True) and measured_bf16("full", "classification", True)
    assert not measured_bf16("full", "extractive_qa", True) and not measured_bf16("qlora", "seq2seq", False)
    assert measured_bf16("qlora", "sft", False)  # bitsandbytes' bf16 matmuls need no accel
    assert measured_bf16("full", "sft", True) and not measured_bf16("full", "sft", True, master_weights="fp32")
    assert measured_bf16("ia3", "pretrain", True) and not measured_bf16("ia3", "reward", True)
    assert not measured_bf16("bitfit", "sft", False) and not measured_bf16("unknown", "sft", True)
    refused = choose_precision("auto", "cpu", cpu_flags(ZEN4), run="ia3 on dpo").reason
    assert "; not this one (ia3 on dpo). model.dtype: bfloat16 asks for it" in refused
    reason = choose_precision("auto", "cpu", cpu_flags(ZEN4), measured=True).reason
    assert reason.endswith("full (causal-LM stages, classification) / full (kto): bf16 weights; freeze / gradual / head / bitfit / "
                           "adapter / ia3 (sft / pretrain): bf16 autocast")  # fmt: skip


def test_explicit_settings_and_cuda(monkeypatch):
    p = choose_precision("bfloat16", "cpu", cpu_flags(ZEN3))
    assert (p.dtype, p.autocast) == (torch.bfloat16, True) and "emulated" in p.reason
    assert "slow" not in choose_precision("bfloat16", "cpu", cpu_flags(ZEN4)).reason
    assert choose_precision("float32", "cpu", cpu_flags(ZEN4)).dtype == torch.float32
    assert not choose_precision("float16", "cpu").autocast and choose_precision("float16", "cpu").dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert (choose_precision("auto", "cuda").dtype, choose_precision("auto", "cuda").autocast) == (torch.bfloat16, True)
    assert compute_dtype("auto", "cuda") == torch.bfloat16 and compute_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert choose_precision("auto", "cuda").dtype == torch.float32


def _train(tiny_dir, data_file, out, dtype, accelerate="auto"):
    cfg = load_config(
        {
            "output_dir": str(out),
            "model": {"name": tiny_dir, "dtype": dtype},
            "data": {"train": data_file, "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "progress": False,
                         "tensorboard": False, "seed": 3, "device": "cpu", "accelerate": accelerate},
        }
    )  # fmt: skip
    result = tunelab.train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return result.metrics, [r["loss"] for r in lines if "loss" in r]


def test_bf16_autocast_on_a_cpu_trains_to_the_fp32_loss(tiny_dir, data_file, tmp_path, capsys):
    """Forced on this CPU (emulated on most, so only a tiny model): bf16 matmuls under autocast (`accelerate: off`:
    PEFT's forward; with `auto` the passes run in bf16 without autocast, tests/test_bf16.py), fp32 LoRA weights;
    the losses follow fp32's within bf16's rounding (8 bits of mantissa: ~0.4% per product, averaged over the
    terms)."""
    fp32, fp32_losses = _train(tiny_dir, data_file, tmp_path / "fp32", "float32")
    bf16, bf16_losses = _train(tiny_dir, data_file, tmp_path / "bf16", "bfloat16", accelerate="off")
    log = capsys.readouterr().err
    assert fp32["precision"] == "float32" and bf16["precision"] == "bfloat16 autocast, fp32 master weights"
    said = "" if native_bf16("cpu")[0] else "; slow"  # the log says so where bf16 is emulated
    assert f"precision: bfloat16 autocast, fp32 master weights (model.dtype bfloat16{said}" in log
    assert "accelerate: off: plain PyTorch + PEFT" in log
    assert bf16_losses[-1] < bf16_losses[0] and bf16["eval_loss"] < bf16["eval_loss_before"]
    for a, b in zip(fp32_losses, bf16_losses):
        assert abs(a - b) / a < 0.02, (fp32_losses, bf16_losses)
    assert abs(bf16["eval_loss"] - fp32["eval_loss"]) / fp32["eval_loss"] < 0.02
    assert bf16_losses != fp32_losses  # the bf16 path really ran in bf16
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "bf16" / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # master weights stay fp32


@pytest.mark.parametrize("method, master", [("full", "fp32"), ("freeze", "fp32"), ("full", "bf16")])
def test_a_bf16_runs_trained_weights_load_back_exactly(tiny_dir, data_file, tmp_path, method, master):
    """A bf16 run trains and saves fp32 master weights (all of them for full fine-tuning, the top blocks for
    freeze). Loading the run (evaluate, export, serve, generate, a later stage's base) rounded them back to the
    base's bf16, losing updates smaller than bf16's step; now the run loads in fp32, its weights the saved ones.
    With bf16 weights (stochastic rounding, tests/test_bf16_adamw.py) the saved bf16 values load exactly too."""
    from safetensors.torch import load_file

    from tunelab.stages.runs import load_run

    cfg = load_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": tiny_dir, "dtype": "bfloat16"},
        "data": {"train": data_file, "val_fraction": 0, "max_length": 64}, "method": {"name": method},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "tensorboard": False,
                     "master_weights": master},
    })  # fmt: skip
    tunelab.train(cfg)
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert (torch.float32 in {t.dtype for t in saved.values()}) is (master != "bf16")
    model, _ = load_run(str(tmp_path / "run"), device="cpu")
    weights = model.state_dict()
    for name, t in saved.items():
        assert torch.equal(weights[name].float(), t.float()), name


def test_the_dtype_description_says_what_auto_takes():
    """model.dtype's description lists the table `auto` reads (bf16_table.MEASURED_BF16)."""
    from tunelab.config import ModelConfig

    described = " ".join(ModelConfig.model_fields["dtype"].description.split())
    assert f"): {measured_text()}; float32 for everything else" in described
