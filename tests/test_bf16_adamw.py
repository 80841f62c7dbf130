"""AdamW over bf16 weights with stochastic rounding (training/bf16_adamw.py, `training.master_weights`): each update
lands between the two bf16 neighbours of AdamW's fp32 result, in expectation on it; the run keeps and saves bf16
weights, trains, and resumes to the same weights. Then the same optimizer over fp32 weights with bf16 gradients and
moments (`training.optimizer_state`)."""

import copy
import ctypes
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab.accel import compiled, sr_adamw
from tunelab.config import load_config
from tunelab.training import bf16_adamw
from tunelab.training import checkpoint as ckpt
from tunelab.training.bf16_adamw import BF16AdamW
from tunelab.training.harness import master_weights_choice, optimizer_state_choice


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values at or below and at or above each fp32 value (by magnitude, as truncation rounds)."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    high = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    exact = low == x
    return low, torch.where(exact, low, high)


# each test of the update runs both forms of the step: PyTorch ops (accelerate: off) and the compiled loop
STEPS = [False, pytest.param(True, marks=pytest.mark.skipif(sr_adamw.load() is None, reason=sr_adamw.why_not()))]


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The distance between the bf16 values either side of each fp32 value."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    return ((low.view(torch.int32) + 65536).view(torch.float32) - low).abs()


def fp32_adamw(p, grads, **kw):
    ref = torch.nn.Parameter(p.detach().float().clone())
    opt = torch.optim.AdamW([ref], **kw)
    for g in grads:
        ref.grad = g.float()
        opt.step()
    return ref.detach()


@pytest.mark.parametrize("compiled", STEPS)
@pytest.mark.parametrize("n", [1000, 3 * bf16_adamw.CHUNK + 77])  # one short chunk; full chunks and a tail
def test_one_step_lands_on_a_bf16_neighbour_of_adamws_fp32_result(n, compiled):
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(n) * 0.05).bfloat16())
    g = torch.randn(n).bfloat16()
    expected = fp32_adamw(p, [g], lr=1e-3, weight_decay=0.1)
    opt = BF16AdamW([p], lr=1e-3, weight_decay=0.1, compiled=compiled)
    p.grad = g
    opt.step()
    low, high = bf16_neighbours(expected)
    got = p.detach().float()
    neighbours = (got == low) | (got == high)
    if compiled:  # its fp32 arithmetic may differ from torch's kernel in the last bit: a result next to a bf16 value
        assert float(neighbours.float().mean()) > 0.999  # may then round to the value on the other side of it
        assert bool(((got - expected).abs() <= bf16_spacing(expected) * 1.001).all())
    else:
        assert bool(neighbours.all())
    assert float((got != expected).float().mean()) > 0.5  # rounded: most fp32 results are not bf16 values
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


@pytest.mark.parametrize("compiled", STEPS)
def test_small_updates_land_in_expectation_where_rounding_to_nearest_loses_them(compiled):
    """AdamW's step is ~lr; at lr 1e-4 a weight of 1.0 (bf16 spacing 2^-7) never moves when rounded to nearest
    (what torch's AdamW does to bf16 weights), and moves by the fp32 amount on average when rounded stochastically."""
    n, steps, lr = 20_000, 60, 1e-4
    start = torch.ones(n).bfloat16()
    grads = [torch.full((n,), 0.01).bfloat16() for _ in range(steps)]
    expected = fp32_adamw(start, grads, lr=lr, weight_decay=0.0)
    nearest = torch.nn.Parameter(start.clone())
    torch_opt = torch.optim.AdamW([nearest], lr=lr, weight_decay=0.0)
    ours = torch.nn.Parameter(start.clone())
    opt = BF16AdamW([ours], lr=lr, weight_decay=0.0, seed=1, compiled=compiled)
    for g in grads:
        nearest.grad, ours.grad = g.clone(), g.clone()
        torch_opt.step()
        opt.step()
    moved = 1.0 - float(expected.mean())
    assert moved == pytest.approx(steps * lr, rel=0.01)
    assert float(nearest.detach().float().mean()) == 1.0  # every update rounded away
    assert 1.0 - float(ours.detach().float().mean()) == pytest.approx(moved, rel=0.03)


@pytest.mark.parametrize("compiled", STEPS)
def test_the_same_seed_rounds_alike_and_a_reloaded_state_continues_the_same_run(compiled):
    torch.manual_seed(0)
    start = (torch.randn(50_000) * 0.05).bfloat16()
    grads = [torch.randn(50_000).bfloat16() for _ in range(6)]

    def run(grads, p=None, state=None):
        p = torch.nn.Parameter(start.clone()) if p is None else p
        opt = BF16AdamW([p], lr=1e-3, seed=7, compiled=compiled)
        if state is not None:
            opt.load_state_dict(state)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p, opt

    whole, _ = run(grads)
    again, _ = run(grads)
    assert torch.equal(whole, again)
    half, opt = run(grads[:3])
    state = copy.deepcopy(opt.state_dict())
    resumed, _ = run(grads[3:], p=torch.nn.Parameter(half.detach().clone()), state=state)
    assert torch.equal(whole, resumed)
    other = torch.nn.Parameter(start.clone())
    opt = BF16AdamW([other], lr=1e-3, seed=8, compiled=compiled)
    for g in grads:
        other.grad = g.clone()
        opt.step()
    assert not torch.equal(whole, other)  # the seed is the noise


@pytest.mark.parametrize("compiled", STEPS)
def test_clipping_gives_torchs_norm_and_the_moments_see_the_clipped_gradient(compiled):
    """With the compiled step the clipping factor is applied inside the step: the first moment (0.1 g after
    one step) shows the gradient it saw (within two bf16 steps: PyTorch's clipping rounds the gradient first)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(5000) * 0.05).bfloat16())
    norm_weight = torch.nn.Parameter(torch.ones(64))  # fp32, as a norm kept in fp32
    g, g_norm = (torch.randn(5000) * 3).bfloat16(), torch.randn(64) * 3
    expected = torch.nn.utils.get_total_norm([g, g_norm])
    opt = BF16AdamW([p, norm_weight], lr=1e-3, compiled=compiled)
    p.grad, norm_weight.grad = g.clone(), g_norm.clone()
    assert float(opt.clip_grad_norm_(1.0)) == pytest.approx(float(expected), rel=1e-3)
    opt.step()
    factor = 1.0 / (float(expected) + 1e-6)
    m = opt.state[p]["exp_avg"].float()
    assert bool(((m - 0.1 * g.float() * factor).abs() <= bf16_spacing(0.1 * g.float() * factor) * 2.001).all())
    assert torch.allclose(opt.state[norm_weight]["exp_avg"], 0.1 * g_norm * factor, rtol=1e-2, atol=1e-7)
    assert opt.grad_scale == 1.0  # for one step only


@pytest.mark.skipif(sr_adamw.load() is None, reason=sr_adamw.why_not())
def test_the_compiled_step_is_the_same_however_many_threads_split_a_tensor():
    torch.manual_seed(0)
    n = 3 * compiled.SPLIT + 5
    start, g = (torch.randn(n) * 0.05).bfloat16(), torch.randn(n).bfloat16()
    results = []
    for threads in (1, 2, 3):
        p, m, v = start.clone(), torch.zeros(n).bfloat16(), torch.zeros(n).bfloat16()
        stepper = sr_adamw.Stepper(sr_adamw.load(), threads)
        for step in (1, 2):
            stepper.submit(p, g, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, step=step, key=step)
            stepper.wait()
        results.append((p, m, v))
    assert not torch.equal(results[0][0], start)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


@pytest.mark.skipif(sr_adamw.load() is None, reason=sr_adamw.why_not())
def test_the_compiled_step_is_the_same_bits_whatever_the_compiler_and_its_optimisation(monkeypatch, tmp_path):
    """No fused multiply-adds or fast-math (FLAGS): -O0 scalar code, -O3 vector code and another compiler (clang,
    where it is installed: the macOS default) give the same weights and moments, so a run resumes the same when
    its home's build changes."""
    import shutil

    torch.manual_seed(0)
    n = (1 << 20) + 3  # enough values for a contracted a * b + c to round differently somewhere (6 in a million)
    start, g = (torch.randn(n) * 0.05).bfloat16(), torch.randn(n).bfloat16()
    builds = [("default", None, compiled.FLAGS), ("-O0", None, ["-O0", *compiled.FLAGS[1:]])]
    builds += [("clang", "clang", compiled.FLAGS)] if shutil.which("clang") else []
    results = []
    for name, cc, flags in builds:
        if cc:
            monkeypatch.setenv("CC", cc)
        monkeypatch.setattr(compiled, "FLAGS", flags)
        fn = ctypes.CDLL(str(compiled.build("sr_adamw", sr_adamw.SOURCE, tmp_path / name))).sr_adamw_bf16
        fn.restype, fn.argtypes = None, sr_adamw.SIGNATURE
        p, m, v = start.clone(), torch.zeros(n).bfloat16(), torch.zeros(n).bfloat16()
        stepper = sr_adamw.Stepper(SimpleNamespace(sr_adamw_bf16=fn), 1)
        for step in (1, 2, 3):
            stepper.submit(p, g, m, v, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, step=step, key=step)
            stepper.wait()
        results.append((p, m, v))
    assert not torch.equal(results[0][0], start)
    assert all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))


def test_without_a_compiler_the_pytorch_step_runs_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc did not run"):
        compiled.build("sr_adamw", sr_adamw.SOURCE, tmp_path / "kernels")
    monkeypatch.setattr(sr_adamw, "load", lambda: None)
    monkeypatch.setattr(sr_adamw, "why_not", lambda: "no C compiler (cc or gcc on PATH, or $CC)")
    p = torch.nn.Parameter(torch.ones(10).bfloat16())
    opt = BF16AdamW([p], lr=1e-2, compiled=True)
    assert opt.stepper is None and "~3x slower: no C compiler" in opt.how
    p.grad = torch.ones(10).bfloat16()
    opt.step()
    assert float(p.detach().float().max()) < 1.0


@pytest.mark.skipif(sr_adamw.load() is None, reason=sr_adamw.why_not())
def test_a_compiler_that_refuses_march_native_builds_without_it(monkeypatch, tmp_path):
    import shutil

    cc = tmp_path / "picky-cc"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) echo "unknown: -march=native" >&2; exit 1;; esac\n'
                  f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')  # fmt: skip
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    lib = compiled.build("sr_adamw", sr_adamw.SOURCE, tmp_path / "kernels")
    assert lib.exists() and hasattr(ctypes.CDLL(str(lib)), "sr_adamw_bf16")
    failing = tmp_path / "failing-cc"
    failing.write_text('#!/bin/sh\necho "no such header" >&2\nexit 1\n')
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with pytest.raises(RuntimeError, match="failing-cc failed: no such header"):
        compiled.build("sr_adamw", sr_adamw.SOURCE, tmp_path / "other")


@pytest.mark.skipif(sr_adamw.load() is None or os.name != "posix", reason=sr_adamw.why_not() or "POSIX modes")
def test_a_cached_library_others_could_have_written_is_not_loaded(tmp_path):
    """A cached build is code: loaded only when this user (or root) owns it and nobody else can write it or its
    folder. A folder made under umask 002 is tightened; a planted or loosened file is refused with the fix."""
    cache = tmp_path / "kernels"
    old = os.umask(0o002)
    try:
        lib = compiled.build("sr_adamw", sr_adamw.SOURCE, cache)
    finally:
        os.umask(old)
    assert cache.stat().st_mode & 0o777 == 0o755 and lib.stat().st_mode & 0o777 == 0o755
    cache.chmod(0o775)  # loosened later: tightened again, the same file loads
    assert compiled.build("sr_adamw", sr_adamw.SOURCE, cache) == lib and cache.stat().st_mode & 0o022 == 0
    lib.chmod(0o775)
    with pytest.raises(RuntimeError, match=r"not loaded: writable by others \(mode 775\); delete it"):
        compiled.build("sr_adamw", sr_adamw.SOURCE, cache)
    lib.chmod(0o755)
    if os.getuid() == 0:  # as root (CI): a file another user owns
        os.chown(lib, 12345, 12345)
        with pytest.raises(RuntimeError, match=r"owned by another user \(uid 12345\)"):
            compiled.build("sr_adamw", sr_adamw.SOURCE, cache)
        os.chown(cache, 12345, 12345)
        with pytest.raises(RuntimeError, match="owned by another user.*set \\$TUNELAB_HOME"):
            compiled.build("sr_adamw", sr_adamw.SOURCE, cache)


@pytest.mark.skipif(sr_adamw.load() is None, reason=sr_adamw.why_not())
def test_fp32_moments_beside_a_bf16_weight_take_the_pytorch_step():
    """The compiled loop reads bf16 moments; fp32 ones (set by hand here) go the PyTorch-ops way, the same step,
    clipped alike."""
    torch.manual_seed(0)
    start, g = (torch.randn(3000) * 0.05).bfloat16(), torch.randn(3000).bfloat16()
    m, v = torch.randn(3000) * 0.01, torch.rand(3000) * 1e-4
    results = []
    for compiled_step in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = BF16AdamW([p], lr=1e-3, seed=1, compiled=compiled_step)
        opt.state[p].update(step=torch.tensor(1.0), exp_avg=m.clone(), exp_avg_sq=v.clone())
        p.grad = g.clone()
        opt.clip_grad_norm_(0.5)  # clipped either way: by the gradient or by the factor the step applies
        opt.step()
        results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone()))
    assert torch.equal(results[0][0], results[1][0]) and not torch.equal(results[0][0], start)
    assert torch.equal(results[0][1], results[1][1])


def test_fp32_parameters_take_torchs_fused_step_exactly():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000))
    grads = [torch.randn(3000) for _ in range(3)]
    expected = fp32_adamw(p, grads, lr=1e-2, weight_decay=0.01, fused=True)
    opt = BF16AdamW([p], lr=1e-2, weight_decay=0.01)
    for g in grads:
        p.grad = g
        opt.step()
    assert torch.equal(p.detach(), expected)


@pytest.mark.parametrize(
    "setting, device, trainable, own, available, bf16, said",
    [
        ("fp32", "cpu", 100, True, None, False, "master_weights: fp32"),
        ("bf16", "cuda", 1, False, None, True, "master_weights: bf16"),
        ("auto", "cpu", 100, True, 10**9, True, "of the weights train, on a CPU"),
        ("auto", "cpu", 10, True, 10**9, False, "fp32 master weights"),  # a few of the weights train
        ("auto", "cpu", 100, False, 10**9, False, "fp32 master weights"),  # a PEFT adapter (prefix's encoder)
        ("auto", "cuda", 100, True, 10**9, False, "fp32 master weights"),
        ("auto", "cuda", 100, True, 1000, True, "would take"),  # 1,400 bytes of fp32 copies, 1,000 available
    ],
)
def test_master_weights_choice(setting, device, trainable, own, available, bf16, said):
    chosen, why = master_weights_choice(setting, device, trainable, 120, available, own_weights=own)
    assert chosen is bf16 and said in why


def make_cfg(tiny_dir, data_file, out, dtype="bfloat16", **training):
    return load_config({
        "output_dir": str(out), "model": {"name": tiny_dir, "dtype": dtype},
        "data": {"train": data_file, "val_fraction": 0.2, "max_length": 64}, "method": {"name": "full"},
        "training": {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "progress": False, "tensorboard": False,
                     "seed": 3, "device": "cpu", "scheduler": "constant", "warmup_steps": 0, **training},
    })  # fmt: skip


def step_losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_full_fine_tuning_in_bf16_keeps_bf16_weights_trains_and_resumes(tiny_dir, data_file, tmp_path, capsys):
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a"))
    log = capsys.readouterr().err
    assert result.metrics["precision"] == "bfloat16 autocast, bf16 weights (stochastic rounding)"
    assert "bf16 weights: " in log and "of the weights train, on a CPU" in log
    if sr_adamw.load() is not None:  # accelerate: auto's default: the compiled step
        assert "bf16 AdamW step: one compiled loop" in log
    losses = step_losses(tmp_path / "a")
    assert losses[6] < losses[1] and result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    start = load_file(str(Path(tiny_dir) / "model.safetensors"))
    moved = [(saved[k].float() - start[k].float()).abs().max() for k in saved if k in start and saved[k].ndim == 2]
    assert moved and all(float(m) > 0 for m in moved)  # every matrix moved

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "b")
    tunelab.train(cfg, callbacks=[stop_after_3])  # Ctrl-C: a checkpoint at step 3
    tunelab.train(copy.deepcopy(cfg), resume=True)
    resumed = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert step_losses(tmp_path / "b") == losses
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_a_resumed_auto_run_keeps_the_master_weights_it_started_with(tiny_dir, data_file, tmp_path, capsys):
    """A run that started with fp32 copies (an earlier version's auto, or another host's) resumes with them under
    `auto`, which here would take bf16 weights: the checkpoint's saved weights say which."""

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run", master_weights="fp32")
    tunelab.train(cfg, callbacks=[stop_after_3])
    step = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert ckpt.saved_master_weights(step) == "fp32"
    capsys.readouterr()
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", master_weights="auto"), resume=True)
    assert result.metrics["precision"] == "bfloat16 autocast, fp32 master weights"
    assert "as the run started: step-00000003's weights are fp32" in capsys.readouterr().err
    assert torch.float32 in {t.dtype for t in load_file(str(result.final_dir / "model.safetensors")).values()}


def test_master_weights_fp32_keeps_fp32_copies(tiny_dir, data_file, tmp_path):
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a", master_weights="fp32", max_steps=2))
    assert result.metrics["precision"] == "bfloat16 autocast, fp32 master weights"
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert torch.float32 in {t.dtype for t in saved.values()}


@pytest.mark.parametrize("flags, master, chosen", [
    ({"avx2", "avx512f", "amx_bf16"}, "auto", "bfloat16 autocast, bf16 weights (stochastic rounding)"),
    ({"avx2", "avx512f", "amx_bf16"}, "fp32", "float32"),  # fp32 copies in bf16 were measured to take more memory
    ({"avx2", "avx512f"}, "auto", "float32"),  # emulated bf16
])  # fmt: skip
def test_auto_trains_full_fine_tuning_in_bf16_weights_where_the_cpu_has_it(tiny_dir, data_file, tmp_path, monkeypatch,
                                                                           flags, master, chosen):  # fmt: skip
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: flags)
    raw = make_cfg(tiny_dir, data_file, tmp_path / "run", max_steps=2, master_weights=master).model_dump(mode="json")
    result = tunelab.train(load_config({**raw, "model": {**raw["model"], "dtype": "auto"}}))
    assert result.metrics["precision"] == chosen


@pytest.mark.parametrize("method, chosen", [
    ({"name": "freeze", "last_k": 1}, "bfloat16 autocast, fp32 master weights"),  # under half the weights train
    ({"name": "freeze"}, "bfloat16 autocast, bf16 weights (stochastic rounding)"),  # last_k 2: most of them
    ({"name": "adapter"}, "bfloat16 autocast, fp32 master weights"),
    ({"name": "gradual"}, "bfloat16 autocast, bf16 weights (stochastic rounding)"),  # every block thaws in the end
])  # fmt: skip
def test_auto_trains_the_other_methods_sft_in_bf16_where_the_cpu_has_it(tiny_dir, data_file, tmp_path, monkeypatch,
                                                                        method, chosen):  # fmt: skip
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: {"avx2", "avx512f", "amx_bf16"})
    raw = make_cfg(tiny_dir, data_file, tmp_path / "run", max_steps=2).model_dump(mode="json")
    raw = {**raw, "model": {**raw["model"], "dtype": "auto"}, "method": method}
    result = tunelab.train(load_config(raw))
    assert result.metrics["precision"] == chosen
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: {"avx2", "avx512f"})  # emulated bf16: fp32
    assert tunelab.train(load_config({**raw, "output_dir": str(tmp_path / "b")})).metrics["precision"] == "float32"


def test_the_memory_left_counts_an_fp32_copy_only_for_a_half_precision_weight(monkeypatch):
    """Under bf16 autocast with fp32 master weights a bf16 weight that trains gains an fp32 copy, its gradient and
    moments (14 bytes over the bf16 weight); an adapter already in fp32 its gradient and moments only (12)."""
    from tunelab.training import harness

    monkeypatch.setattr(harness, "available_memory", lambda: 10**9)
    half, full = torch.nn.Parameter(torch.zeros(1000).bfloat16()), torch.nn.Parameter(torch.zeros(500))
    model = torch.nn.ParameterList([half, full])
    bf16, _, left = harness.master_weights_plan("fp32", "cpu", model, [half, full], mixed=True, own_weights=False)
    assert not bf16 and left == 10**9 - 1000 * 14 - 500 * 12
    bf16, _, left = harness.master_weights_plan("bf16", "cpu", model, [half, full], mixed=True, own_weights=False)
    assert bf16 and left == 10**9 - 1500 * 6
    _, _, left = harness.master_weights_plan("auto", "cpu", model, [full], mixed=False, own_weights=False)
    assert left == 10**9 - 500 * 12


# ---- fp32 weights with bf16 gradients and AdamW moments (`training.optimizer_state: bf16`, `bf16_state`): the
# weight takes AdamW's fp32 update of the bf16 gradient, the moments land on a bf16 neighbour, autograd's fp32
# gradients are folded in as they are made, and a run trains, keeps fp32 weights and resumes to the same weights.


def backward(p: torch.nn.Parameter, c: torch.Tensor) -> None:
    """A pass whose gradient of p is c, through autograd (so the gradient hooks run)."""
    (p * c).sum().backward()


def on_a_bf16_neighbour(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Within one bf16 step of `expected`, give or take fp32 rounding at the tensor's scale: where 0.9 m + 0.1 g
    cancels to near zero the compiled loop's order of operations (not torch's lerp) lands a few 1e-9 away."""
    return (got.float() - expected).abs() <= bf16_spacing(expected) * 1.001 + 1e-6 * float(expected.abs().max())


@pytest.mark.parametrize("compiled", STEPS)
@pytest.mark.parametrize("n", [1000, 2 * bf16_adamw.CHUNK + 77])  # one short chunk; full chunks and a tail
def test_the_fp32_weight_takes_adamws_update_of_the_bf16_gradient(n, compiled):
    torch.manual_seed(0)
    start = torch.randn(n) * 0.05
    grads = [torch.randn(n) for _ in range(3)]
    ref = torch.nn.Parameter(start.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1)
    p = torch.nn.Parameter(start.clone())
    opt = BF16AdamW([p], lr=1e-3, weight_decay=0.1, compiled=compiled, bf16_state=True)
    for i, c in enumerate(grads):
        backward(p, c)
        assert p.grad is None  # folded into the bf16 gradient as autograd made it
        ref.grad = c.bfloat16().float()
        if i:  # from the second step the moments differ by their rounding: compare one step from the same moments
            ref_opt.state[ref]["exp_avg"] = opt.state[p]["exp_avg"].float()
            ref_opt.state[ref]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].float()
            ref.data.copy_(p.detach())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        assert p.dtype == torch.float32
        assert torch.allclose(p.detach(), ref.detach(), rtol=1e-6, atol=1e-9)
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert bool(on_a_bf16_neighbour(state["exp_avg"], ref_opt.state[ref]["exp_avg"]).all())
        assert bool(on_a_bf16_neighbour(state["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"]).all())
    assert not torch.equal(p.detach(), start)


def test_passes_add_into_one_bf16_gradient_and_a_grad_set_by_hand_is_folded_in():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(500))
    opt = BF16AdamW([p], lr=1e-3, bf16_state=True)
    a, b, c = torch.randn(500), torch.randn(500), torch.randn(500)
    backward(p, a)
    backward(p, b)
    p.grad = c.clone()  # as thread shares add theirs, outside autograd's accumulation
    got = opt._gradient(p)
    assert got.dtype == torch.bfloat16 and p.grad is None
    assert torch.allclose(got.float(), a + b + c, rtol=2e-2, atol=2e-2)
    opt.zero_grad()
    assert opt._gradient(p) is None
    opt.remove_hooks()
    backward(p, a)  # no longer collected: the gradient stays where autograd put it
    assert torch.equal(p.grad, a)


@pytest.mark.parametrize("compiled", STEPS)
def test_with_bf16_state_clipping_uses_the_bf16_gradients_norm_and_scales_inside_the_step(compiled):
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(3000) * 0.05), torch.nn.Parameter(torch.randn(64))
    opt = BF16AdamW([p, q], lr=1e-3, compiled=compiled, bf16_state=True)
    gp, gq = torch.randn(3000) * 3, torch.randn(64) * 3
    backward(p, gp)
    backward(q, gq)
    norm = opt.clip_grad_norm_(1.0)
    expected = torch.cat([gp.bfloat16().float(), gq.bfloat16().float()]).norm()
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    factor = 1.0 / (float(expected) + 1e-6)
    opt.step()
    m = opt.state[p]["exp_avg"].float()  # 0.1 g after one step: g the clipped gradient
    assert bool(on_a_bf16_neighbour(m, 0.1 * gp.bfloat16().float() * factor).all())
    assert opt.grad_scale == 1.0


@pytest.mark.parametrize("compiled", STEPS)
def test_with_bf16_state_a_reloaded_state_continues_the_same_run_bit_for_bit(compiled):
    """torch's load_state_dict casts the moments to the weight's dtype (fp32); the step takes them back to bf16,
    exactly, and rounds as the uninterrupted run does."""
    torch.manual_seed(0)
    start = torch.randn(40_000) * 0.05
    grads = [torch.randn(40_000) for _ in range(6)]

    def run(grads, p=None, state=None):
        p = torch.nn.Parameter(start.clone()) if p is None else p
        opt = BF16AdamW([p], lr=1e-3, seed=7, compiled=compiled, bf16_state=True)
        if state is not None:
            opt.load_state_dict(state)
        for c in grads:
            backward(p, c)
            opt.step()
            opt.zero_grad()
        return p, opt

    whole, _ = run(grads)
    half, opt = run(grads[:3])
    state = copy.deepcopy(opt.state_dict())
    resumed, _ = run(grads[3:], p=torch.nn.Parameter(half.detach().clone()), state=state)
    assert torch.equal(whole, resumed)


@pytest.mark.parametrize(
    "setting, device, own, trainable, multi, available, chosen, said",
    [
        ("auto", "cpu", True, 100, False, 10**9, True, "of the weights train, on a CPU"),
        ("auto", "cpu", False, 100, False, 10**9, False, ""),  # a PEFT adapter beside frozen weights
        ("auto", "cpu", True, 10, False, 10**9, False, ""),  # a few of the weights train
        ("auto", "cuda", True, 100, False, 10**9, False, ""),
        ("auto", "cuda", True, 100, False, 1000, True, "would take"),  # 1,200 bytes of fp32 state, 1,000 available
        ("auto", "cpu", True, 100, True, 10**9, False, ""),  # several processes
        ("bf16", "cpu", True, 100, True, 10**9, False, "is for one process"),
        ("bf16", "cpu", False, 10, False, 10**9, True, "optimizer_state: bf16"),
        ("fp32", "cpu", True, 100, False, 10**9, False, "optimizer_state: fp32"),
    ],
)
def test_optimizer_state_choice(monkeypatch, setting, device, own, trainable, multi, available, chosen, said):
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    learning = [torch.nn.Parameter(torch.zeros(trainable))]
    got, why = optimizer_state_choice(setting, device, learning, 120, own, multi, available)
    assert got is chosen and said in why
    half = [torch.nn.Parameter(torch.zeros(trainable).bfloat16())]  # bf16 weights: master_weights decides
    assert optimizer_state_choice(setting, device, half, 120, own, multi, available) == (False, "")
    monkeypatch.setattr(precision, "CPU_BF16_AUTO", False)  # the test suite's setting: auto stays fp32
    assert optimizer_state_choice("auto", device, learning, 120, own, multi, 1000)[0] is False


def bf16_state_cfg(tiny_dir, data_file, out, **training):
    return make_cfg(tiny_dir, data_file, out, dtype="float32", **{"optimizer_state": "bf16", **training})


def test_full_fine_tuning_with_bf16_state_trains_keeps_fp32_weights_and_resumes(tiny_dir, data_file, tmp_path, capsys):
    result = tunelab.train(bf16_state_cfg(tiny_dir, data_file, tmp_path / "a"))
    log = capsys.readouterr().err
    assert result.metrics["precision"] == "float32"
    assert "optimizer state: the gradients and AdamW moments of" in log and "optimizer_state: bf16" in log
    losses = step_losses(tmp_path / "a")
    assert losses[6] < losses[1] and result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    saved = load_file(str(result.final_dir / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    fp32 = tunelab.train(bf16_state_cfg(tiny_dir, data_file, tmp_path / "c", optimizer_state="fp32"))
    assert abs(fp32.metrics["eval_loss"] - result.metrics["eval_loss"]) < 0.05 * fp32.metrics["eval_loss"]
    # auto keeps the MLPs' gate and up outputs and the norms' inputs in bf16 beside bf16 state, not beside fp32 state
    assert result.metrics["saved_activations"] == "bfloat16" and fp32.metrics["saved_activations"] is None
    assert "saved activations in bfloat16: 2 MLPs' gate and up outputs and 5 norms' inputs" in log
    exact = tunelab.train(bf16_state_cfg(tiny_dir, data_file, tmp_path / "d", saved_activations="fp32"))
    assert exact.metrics["saved_activations"] is None
    assert abs(exact.metrics["eval_loss"] - result.metrics["eval_loss"]) < 0.01 * exact.metrics["eval_loss"]

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = bf16_state_cfg(tiny_dir, data_file, tmp_path / "b")
    tunelab.train(cfg, callbacks=[stop_after_3])  # Ctrl-C: a checkpoint at step 3
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000003" / "optimizer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    tunelab.train(copy.deepcopy(cfg), resume=True)
    resumed = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert step_losses(tmp_path / "b") == losses
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_bf16_saved_activations_stand_aside_where_the_passes_are_bf16(tiny_dir, data_file, tmp_path, capsys):
    """training.saved_activations: bf16 in a bf16 run changes nothing and says so (its activations are bf16 already)."""
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a", saved_activations="bf16"))
    assert result.metrics["saved_activations"] is None
    assert (
        "narrower saved activations (training.saved_activations): the passes are bf16 already"
        in capsys.readouterr().err
    )
