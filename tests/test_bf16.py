"""bf16 passes without autocast (tunelab/accel/switch.py): fast LoRA, the fused head and the fused norm in bf16
with fp32 master weights give PEFT's bf16 loss and gradients to bf16's rounding, train to the fp32 losses, save fp32
adapters, run as thread shares, and step aside (autocast kept, the log saying why) where a pass is not all bf16.

bf16 is emulated on CPUs without avx512_bf16 / amx_bf16: everything here runs on a tiny model, fast anywhere."""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_fast_lora import dropout_drawing_fast_masks, lm_batch  # tests/ is on sys.path (conftest.py)
from test_training import losses

import tunelab
from tunelab import accel
from tunelab.accel import fast_lora, head, norm, threads
from tunelab.config import load_config
from tunelab.methods import get
from tunelab.models.loss import token_loss_sum
from tunelab.testing import tiny_llama

# bf16 keeps 8 bits of mantissa: one rounding is up to 0.4%; a gradient sums thousands of rounded products, so the
# errors of bf16 against fp32 are ~1-3% (measured: ~1.5% for PEFT's own bf16 forward on this model)
GRAD_TOL = 0.05


def _lora(dtype, dropout=0.0, fast=True, dora=False):
    torch.manual_seed(0)
    method = get("lora")
    model = method.apply(
        tiny_llama().to(dtype),
        method.Config(r=4, alpha=8, dropout=dropout, target_modules="all-linear", use_dora=dora),
    )
    for name, p in model.named_parameters():  # B starts at zero: give it values so every gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        if "lora_magnitude_vector" in name:  # DoRA's m starts at the rows' norms; fp32 master weights, as the loop's
            p.data = (p.data.float() * (1 + 0.1 * torch.randn(p.shape))).to(torch.float32 if fast else p.dtype)
    if fast:  # as accel's prepare does
        fast_lora.enable(model)
        head.install(model)
        norm.install(model)
    return model


def _grads(model, batch, seed=0):
    torch.manual_seed(seed)  # the same dropout masks in every model
    model.zero_grad()
    loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _counting(monkeypatch, function) -> list:
    calls, real = [], function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


# 1 x 12 tokens: fewer rows than any layer's width; 4 x 40: more rows than any (where fp32 would fold)
@pytest.mark.parametrize("shape", [(1, 12), (4, 40)])
def test_bf16_fast_path_gives_pefts_bf16_loss_and_gradients(monkeypatch, shape):
    fast = _lora(torch.bfloat16)
    peft = _lora(torch.bfloat16, fast=False)
    lora, mlp = _counting(monkeypatch, fast_lora._LoRALinear), _counting(monkeypatch, fast_lora._SwiGLU)
    fused, normed = _counting(monkeypatch, head._HeadCrossEntropy), _counting(monkeypatch, norm._RMSNorm)
    batch = lm_batch(*shape)
    loss_fast, g_fast = _grads(fast, batch)
    assert len(lora) == 8 and len(mlp) == 2 and len(fused) == 1 and len(normed) == 5  # all in bf16, no autocast
    loss_peft, g_peft = _grads(peft, batch)
    assert len(lora) == 8 and len(fused) == 1  # PEFT's own forward and the plain loss for the reference
    loss_fp32, g_fp32 = _grads(_lora(torch.float32, fast=False), batch)
    assert loss_fast == pytest.approx(loss_peft, rel=5e-3) and loss_fast == pytest.approx(loss_fp32, rel=1e-2)
    assert g_fast.keys() == g_peft.keys() and len(g_fast) == 28
    for k in g_fast:
        assert g_fast[k].dtype == torch.float32, k  # master weights: fp32 gradients
        assert _relative(g_fast[k], g_peft[k]) < GRAD_TOL, k
        # no farther from fp32 than PEFT's bf16 is (with room for the roundings' luck)
        assert _relative(g_fast[k], g_fp32[k]) < 2 * _relative(g_peft[k], g_fp32[k]) + 0.01, k


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_dora_on_the_fast_path_is_no_farther_from_fp32_than_pefts_autocast(monkeypatch, dropout):
    fast = _lora(torch.bfloat16, dropout, dora=True)
    lora, mlp = _counting(monkeypatch, fast_lora._LoRALinear), _counting(monkeypatch, fast_lora._SwiGLU)
    batch = lm_batch(4, 40)
    loss_fast, g_fast = _grads(fast, batch)
    assert len(lora) == 8 and len(mlp) == 2 and len(g_fast) == 42  # A, B and m of 14 layers, in bf16 passes
    dropout_drawing_fast_masks(monkeypatch)  # PEFT's nn.Dropout drawing the fast path's masks
    with torch.autocast("cpu", torch.bfloat16):
        loss_peft, g_peft = _grads(_lora(torch.bfloat16, dropout, fast=False, dora=True), batch)
    loss_fp32, g_fp32 = _grads(_lora(torch.float32, dropout, fast=False, dora=True), batch)
    assert loss_fast == pytest.approx(loss_fp32, rel=1e-2) and loss_peft == pytest.approx(loss_fp32, rel=1e-2)
    for k in g_fast:
        assert g_fast[k].dtype == torch.float32, k
        assert _relative(g_fast[k], g_fp32[k]) < 2 * _relative(g_peft[k].float(), g_fp32[k]) + 0.01, k


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_new_dora_adapter_over_a_bf16_base_is_the_base_model_in_bf16_passes(method):
    """m taken in fp32 (PEFT takes it in bf16 over a bf16 base: every row of step 0 scaled by up to 2^-9)."""
    torch.manual_seed(0)
    mod = get(method)
    extra = {"compute_dtype": "auto"} if method == "qlora" else {}
    model = mod.apply(tiny_llama().to(torch.bfloat16), mod.Config(r=4, alpha=8, dropout=0.0, use_dora=True, **extra))
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 14 and all(m.dtype == torch.float32 for m in magnitudes)
    fast_lora.enable(model)
    ids = lm_batch(2, 20)["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(adapted, base)


def test_bf16_fast_path_with_lora_dropout_draws_the_fp32_paths_masks():
    """The masks depend on the generator and the input's shape only: bf16 and fp32 passes from one seed drop the
    same elements, so their gradients agree to bf16's rounding (and not at all with other masks)."""
    batch = lm_batch(4, 40)
    bf16 = _lora(torch.bfloat16, dropout=0.3)
    fp32 = _lora(torch.float32, dropout=0.3)
    _, g_bf16 = _grads(bf16, batch, seed=5)
    _, g_fp32 = _grads(fp32, batch, seed=5)
    _, g_other = _grads(fp32, batch, seed=6)
    for k in g_bf16:
        assert _relative(g_bf16[k], g_fp32[k]) < GRAD_TOL, k
    assert max(_relative(g_other[k], g_fp32[k]) for k in g_fp32) > 5 * GRAD_TOL


@pytest.mark.parametrize("autocast", [False, True])  # a bf16 pass; bf16 weights that train under autocast
def test_bf16_norm_is_transformers_own_and_its_gradient_fp32s(autocast):
    torch.manual_seed(0)
    module = tiny_llama().to(torch.bfloat16).model.norm
    reference = copy.deepcopy(module)
    assert norm.install(module) == 1
    x = (torch.randn(3, 7, module.weight.shape[0]) * 3).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, expected = module(x), reference(x)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the fused path ran
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)  # the same operations: the same bits
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    wide = x.detach().float().requires_grad_()
    (dx32,) = torch.autograd.grad(reference.float()(wide), wide, g.float())
    assert dx.dtype == torch.bfloat16 and _relative(dx.float(), dx32) < 1e-2


@pytest.mark.parametrize("head_trains", [False, True])
def test_bf16_fused_head_takes_its_log_sum_exp_in_fp32(head_trains):
    """The loss of bf16 logits widened to fp32, as transformers' loss takes it: a softmax in bf16 would be ~1e-3
    off; the gradient rounded to bf16 once. 300 labels rounded up to 384 (memory.shape_bucket), whose padding adds
    nothing to the loss or to either gradient: two chunks of 192 where the head trains, six of 64 (the last all
    padding) where it does not, each widened WIDE_CHUNK columns at a time."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 64).bfloat16().requires_grad_()
    weight = (torch.randn(5000, 64) * 0.3).bfloat16()
    target = torch.randint(0, 5000, (300,))
    layer = torch.nn.Linear(64, 5000, bias=False, dtype=torch.bfloat16).requires_grad_(head_trains)
    with torch.no_grad():
        layer.weight.copy_(weight)
    loss = head.fused_loss(layer, hidden, target)
    grads = torch.autograd.grad(loss, [hidden, layer.weight] if head_trains else [hidden])
    w = weight.clone().requires_grad_(head_trains)
    reference = torch.nn.functional.cross_entropy((hidden @ w.t()).float(), target, reduction="sum")
    grads_ref = torch.autograd.grad(reference, [hidden, w] if head_trains else [hidden])
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(reference), rel=2e-5)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == torch.bfloat16 and grad.shape == grad_ref.shape
        assert _relative(grad.float(), grad_ref.float()) < 1e-2
    # the fp32 copy holds WIDE_CHUNK columns at a time, the bf16 logits a chunk
    sizes = {dtype: buf.numel() for (dtype, _), buf in head._LOGITS.items()}
    chunk = head.FUSED_CHUNK if head_trains else head.BF16_CHUNK
    assert sizes == {torch.float32: head.WIDE_CHUNK * 5000, torch.bfloat16: chunk * 5000}
    head.free_buffers()


def test_fused_head_under_cpu_autocast_gives_the_plain_autocast_loss_and_fp32_gradients():
    """Full fine-tuning in bf16 keeps autocast (fp32 master weights): the fused head casts the hidden states and
    its weight to bf16 for the products as autocast does, and returns fp32 gradients for both."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 64).requires_grad_()
    layer = torch.nn.Linear(64, 5000, bias=False)
    with torch.no_grad():
        layer.weight.mul_(3)
    target = torch.randint(0, 5000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head.fused_loss(layer, hidden, target)
        reference = torch.nn.functional.cross_entropy(layer(hidden).float(), target, reduction="sum")
    grads = torch.autograd.grad(loss, [hidden, layer.weight])
    grads_ref = torch.autograd.grad(reference, [hidden, layer.weight])
    assert float(loss) == pytest.approx(float(reference), rel=2e-5)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == torch.float32 and _relative(grad, grad_ref) < 1e-2
    head.free_buffers()


def _cfg(tiny_dir, data_file, out, dtype, **training):
    return load_config({
        "output_dir": str(out),
        "model": {"name": tiny_dir, "dtype": dtype},
        "data": {"train": data_file, "val_fraction": 0.25, "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "progress": False,
                     "tensorboard": False, "seed": 3, "device": "cpu", **training},
    })  # fmt: skip


def _train(cfg):
    result = tunelab.train(cfg)
    return result, losses(Path(cfg.output_dir))


def test_bf16_passes_train_to_the_fp32_losses_and_save_fp32_adapters(tiny_dir, data_file, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fp32, fp32_losses = _train(_cfg(tiny_dir, data_file, tmp_path / "fp32", "float32", pass_threads=1))
    bf16, bf16_losses = _train(_cfg(tiny_dir, data_file, tmp_path / "bf16", "bfloat16", pass_threads=1))
    log = capsys.readouterr().err
    assert bf16.metrics["precision"] == "bfloat16, fp32 master weights"
    assert "bf16 passes without autocast (fp32 master weights)" in log and "fast LoRA (14 layers)" in log
    assert "fused LM head + cross-entropy" in log and "not on: fast LoRA" not in log
    assert "not on: compact frozen weights: the frozen weights are bf16 already" in log
    assert bf16_losses[6] < bf16_losses[1] and bf16.metrics["eval_loss"] < bf16.metrics["eval_loss_before"]
    for step in fp32_losses:
        assert abs(fp32_losses[step] - bf16_losses[step]) / fp32_losses[step] < 0.02, (fp32_losses, bf16_losses)
    assert bf16_losses != fp32_losses  # the passes really ran in bf16
    assert abs(bf16.metrics["eval_loss"] - fp32.metrics["eval_loss"]) / fp32.metrics["eval_loss"] < 0.02
    adapter = load_file(str(bf16.final_dir / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # master weights stay fp32
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(bf16.final_dir))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapter) and all(v.dtype == torch.float32 for v in loaded.values())
    saved = next(k for k in adapter if "lora_B" in k)
    assert torch.equal(loaded[saved.replace(".weight", ".default.weight")], adapter[saved])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_thread_shares_give_the_losses_of_one_pass(tiny_dir, data_file, tmp_path, monkeypatch, capsys, method):
    calls = []
    real_run = threads.run
    monkeypatch.setattr(threads, "run", lambda fns: calls.append(len(fns)) or real_run(fns))

    def run(name, parts):
        raw = _cfg(tiny_dir, data_file, tmp_path / name, "bfloat16", max_steps=4, pass_threads=parts).model_dump()
        cfg = load_config({**raw, "method": {"name": method, "r": 4, "alpha": 8, "dropout": 0.0}})
        cfg.data.packing, cfg.data.max_length = True, 160
        return _train(cfg)[1]

    whole = run("whole", 1)
    assert calls == []
    two = run("two", 2)
    assert set(calls) == {2}  # autocast is per thread: without it the shares run, each thread in bf16
    assert "bf16 passes without autocast" in capsys.readouterr().err
    assert whole.keys() == two.keys() and len(whole) == 4
    for step in whole:  # the shares' products have other shapes than the whole pass's: bf16's rounding differs
        assert whole[step] == pytest.approx(two[step], rel=5e-3), (whole, two)


def test_passes_keep_autocast_where_something_is_not_bf16_by_itself(monkeypatch):
    """The reasons the log gives; each keeps the loop's autocast (and fast LoRA aside; the fused head too off a CPU)."""

    def prepared(model, method="lora", device="cpu", **training):
        cfg = load_config({"method": {"name": method}, "training": {"device": "cpu", **training}})
        speed = accel.Speed(cfg.training, torch.device(device))
        speed.prepare(get(method).apply(model, cfg.method), cfg, 10**6, multi=False, autocast=True)
        return speed

    speed = prepared(tiny_llama().to(torch.bfloat16))
    assert not speed.autocast and "bf16 passes without autocast (fp32 master weights)" in speed.pieces
    speed = prepared(tiny_llama().to(torch.bfloat16), method="full")
    assert speed.autocast and any("model.embed_tokens.weight trains outside the fast LoRA" in s for s in speed.skipped)
    assert "fused LM head + cross-entropy (its products in bf16 under autocast)" in speed.pieces  # a CPU's autocast
    speed = prepared(tiny_llama())  # an fp32 base under autocast (say, weights kept in fp32 by the model's class)
    assert speed.autocast and any("is float32, not bf16" in s for s in speed.skipped)
    assert "fast LoRA: bf16 autocast; PEFT's own forward runs (model.dtype: float32 takes it)" in speed.skipped
    monkeypatch.setattr(threads, "check_pass_threads", lambda *a: None)
    speed = prepared(tiny_llama().to(torch.bfloat16), device="cuda")  # built and measured on CPUs only
    assert speed.autocast and any("cuda keeps autocast" in s for s in speed.skipped)
    assert any(s.startswith("fused LM head + cross-entropy: cuda autocast") for s in speed.skipped)
    speed = prepared(tiny_llama().to(torch.bfloat16), accelerate="off")
    assert speed.autocast  # nothing installed: PEFT's forward under autocast


def test_without_autocast_names_the_precision():
    from tunelab.models.precision import choose_precision

    p = choose_precision("bfloat16", "cpu", {"avx512_bf16"})
    assert p.name == "bfloat16 autocast, fp32 master weights"
    assert p.without_autocast().name == "bfloat16, fp32 master weights" and not p.without_autocast().autocast
    assert json.dumps(p.without_autocast().name)  # the metrics' field


@pytest.mark.parametrize("flags, chosen", [({"avx2", "avx512f", "amx_bf16"}, "bfloat16, fp32 master weights"),
                                           ({"avx2", "avx512f"}, "float32")])  # fmt: skip
def test_auto_trains_lora_in_bf16_only_where_the_cpu_has_it(tiny_dir, data_file, tmp_path, monkeypatch, flags, chosen):
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: flags)
    result, _ = _train(_cfg(tiny_dir, data_file, tmp_path / "run", "auto", max_steps=2))
    assert result.metrics["precision"] == chosen
    manifest = json.loads((result.final_dir / "tunelab.json").read_text())
    assert manifest["base_model"]["dtype"] == "auto"  # the result loads as its next host resolves it
    off, _ = _train(_cfg(tiny_dir, data_file, tmp_path / "off", "auto", max_steps=2, accelerate="off"))
    assert off.metrics["precision"] == "float32"  # no bf16 passes without tunelab/accel: fp32, as measured


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_auto_trains_prompt_and_prefix_in_bf16_passes_where_the_cpu_has_it(tiny_dir, data_file, tmp_path, monkeypatch,
                                                                          method):  # fmt: skip
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: {"avx2", "avx512f", "amx_bf16"})
    raw = _cfg(tiny_dir, data_file, tmp_path / "run", "auto", max_steps=2).model_dump(mode="json")
    result, _ = _train(load_config({**raw, "method": {"name": method, "num_virtual_tokens": 4}}))
    assert result.metrics["precision"] == "bfloat16, fp32 master weights"
    raw["training"]["accelerate"] = "off"  # no bf16 passes without tunelab/accel: fp32, as measured
    off, _ = _train(load_config({**raw, "output_dir": str(tmp_path / "off"), "method": {"name": method}}))
    assert off.metrics["precision"] == "float32"


@pytest.mark.parametrize("flags, chosen, matmul", [({"avx2", "avx512f", "amx_bf16"}, "bfloat16, fp32 master weights", "bfloat16"),
                                                   ({"avx2", "avx512f"}, "float32", "float32")])  # fmt: skip
def test_auto_trains_qlora_in_bf16_where_the_cpu_has_it(tiny_dir, data_file, tmp_path, monkeypatch, flags, chosen,
                                                       matmul):  # fmt: skip
    """QLoRA under `model.dtype: auto`: bf16 passes and bitsandbytes' 4-bit matmuls in bf16 on a CPU with native
    bf16 (measured 3.1x fp32's tokens/s on the 1.7B config), fp32 elsewhere; the matmul dtype is recorded."""
    from tunelab.models import precision

    monkeypatch.setattr(precision, "CPU_BF16_AUTO", True)
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: flags)
    raw = _cfg(tiny_dir, data_file, tmp_path / "run", "auto", max_steps=2).model_dump(mode="json")
    result, steps = _train(load_config({**raw, "method": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}}))
    assert result.metrics["precision"] == chosen and len(steps) == 2 and all(v == v for v in steps.values())
    meta = json.loads(next(result.final_dir.rglob("tunelab_qlora.json")).read_text())
    assert meta["quantization"]["compute_dtype"] == matmul


@pytest.mark.parametrize("method", [{"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
                                    {"name": "prompt", "num_virtual_tokens": 4},
                                    {"name": "prefix", "num_virtual_tokens": 4}], ids=lambda m: m["name"])  # fmt: skip
def test_peft_layers_that_cast_by_themselves_run_bf16_passes_to_the_autocast_losses(tiny_dir, data_file, tmp_path,
                                                                                  capsys, method):  # fmt: skip
    """PEFT's 4-bit LoRA layers cast around their fp32 adapters by themselves (qlora), and PEFT casts a soft prompt
    or a key/value prefix to the model's bf16 as it enters: the passes drop autocast and take the fused head and
    norm; the losses are autocast's (PEFT's plain forward) to bf16's rounding."""
    raw = _cfg(tiny_dir, data_file, tmp_path / "fast", "bfloat16", pass_threads=1).model_dump(mode="json")
    raw["training"]["lr"] = 1e-2 if method["name"] != "qlora" else raw["training"]["lr"]
    fast, fast_losses = _train(load_config({**raw, "method": method}))
    log = capsys.readouterr().err
    assert fast.metrics["precision"] == "bfloat16, fp32 master weights"
    assert "bf16 passes without autocast (fp32 master weights)" in log and "fused LM head + cross-entropy" in log
    plain = load_config({**raw, "output_dir": str(tmp_path / "plain"), "method": method,
                         "training": {**raw["training"], "accelerate": "off"}})  # fmt: skip
    slow, slow_losses = _train(plain)
    assert slow.metrics["precision"] == "bfloat16 autocast, fp32 master weights"
    assert fast_losses.keys() == slow_losses.keys() and len(fast_losses) == 6
    for step in fast_losses:
        assert abs(fast_losses[step] - slow_losses[step]) / slow_losses[step] < 0.02, (fast_losses, slow_losses)
    assert fast_losses[6] < fast_losses[1] and fast.metrics["eval_loss"] < fast.metrics["eval_loss_before"]
    assert abs(fast.metrics["eval_loss"] - slow.metrics["eval_loss"]) / slow.metrics["eval_loss"] < 0.02
