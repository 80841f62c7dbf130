"""The RMSNorm training function (tunelab/accel/norm.py): same forward bit for bit, exact gradients."""

import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunelab.accel import norm, swiglu
from tunelab.testing import tiny_causal, tiny_llama


def test_forward_is_bit_identical_and_gradients_match_autograd():
    torch.manual_seed(0)
    module = LlamaRMSNorm(48, eps=1e-5)
    module.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 48) * 4).requires_grad_()
    ref = module(x)
    out = norm._RMSNorm.apply(x, module.weight, module.variance_epsilon, False)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    ref_x, ref_w = torch.autograd.grad(ref, (x, module.weight), g)
    out_x, out_w = torch.autograd.grad(out, (x, module.weight), g)
    torch.testing.assert_close(out_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_w, ref_w, rtol=1e-5, atol=1e-5)


def test_backward_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    frozen = w.detach()  # the usual case: a frozen norm weight, no dw computed
    for offset in (False, True):  # Llama's w, Gemma's 1 + w
        assert torch.autograd.gradcheck(lambda x, w, o=offset: norm._RMSNorm.apply(x, w, 1e-6, o), (x, w))
        assert torch.autograd.gradcheck(lambda x, o=offset: norm._RMSNorm.apply(x, frozen, 1e-6, o), (x,))


def test_installed_on_a_llama_gives_the_same_loss_and_gradients():
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    layers = model.config.num_hidden_layers
    assert norm.install(model) == 2 * layers + 1
    assert norm.install(model) == 0  # once
    out = model(input_ids=ids, labels=ids).loss
    out.backward()
    assert torch.equal(out, ref)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


class _EpsOutsideRMSNorm(nn.Module):
    """w * x / (rms + eps): another formula, which install must leave alone."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)


def test_install_leaves_other_formulas_alone():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    model = nn.Sequential(_EpsOutsideRMSNorm(16), LlamaRMSNorm(16), Gemma3RMSNorm(16))
    assert norm.install(model) == 2
    assert not hasattr(model[0], "_plain_forward") and model[1].tunelab_norm == (1e-6, False)
    assert model[2].tunelab_norm == (1e-6, True)  # Gemma's (1 + w), in fp32: its own formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_installed_on_a_gemma3_gives_its_outputs_and_gradients(dtype):
    """Gemma's RMSNorm, (1 + w) x / rms in fp32 narrowed after the product (and its q / k norms): the module's output
    bit for bit, in fp32 and in a bf16 pass (the compiled rows there: equal on these rows, a rare element one unit
    apart in general, test_compiled_rows_in_bf16_give_torchs_output_and_gradient), and autograd's gradients (w
    trained, and x's)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    module = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
    module.weight.data.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(module)
    assert norm.install(module) == 1
    x = (torch.randn(3, 7, 48) * 4).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = module(x), reference(x_ref)
    assert type(out.grad_fn).__name__ == "_RMSNormBackward" and torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, **tol)
    model = tiny_causal("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8).to(dtype)  # fmt: skip
    assert norm.install(model) == 2 * (4 + 2) + 1  # 4 around each layer's blocks, q and k norms, the final one


def test_recomputed_outputs_keep_no_norm_output_and_give_the_same_gradients():
    import gc
    import weakref

    from peft import LoraConfig, get_peft_model

    from tunelab.accel import fast_lora

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B != 0, so that every LoRA gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    fast_lora.enable(model)
    norm.install(model)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))

    outputs = []
    real = norm._RMSNorm.forward

    def spy(ctx, x, weight, eps, offset, keep=None):
        y = real(ctx, x, weight, eps, offset, keep)
        outputs.append(weakref.ref(y))
        return y

    def run(recompute: bool):
        model.zero_grad(set_to_none=True)
        outputs.clear()
        norm._RMSNorm.forward = staticmethod(spy)
        try:
            with norm.recomputed_outputs() if recompute else torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
        finally:
            norm._RMSNorm.forward = staticmethod(real)
        gc.collect()
        kept = sum(ref() is not None for ref in outputs)
        loss.backward()
        return loss, kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_kept, ref_grads = run(recompute=False)
    loss, kept, grads = run(recompute=True)
    layers = model.config.num_hidden_layers
    assert ref_kept == 2 * layers and kept == 0  # each layer's two normed inputs were kept, now none
    assert torch.equal(loss, ref_loss) and ref_grads.keys() == grads.keys() and len(grads) == 14 * layers
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name  # rebuilt with the same operations: the same bits


@pytest.mark.parametrize("offset", [False, True])
def test_compiled_rows_in_bf16_give_torchs_output_and_gradient(offset, monkeypatch):
    """bf16 on a CPU runs the compiled rows (one pass a row for the output, one for dx) where torch runs its
    operations: against those (`_rms_norm` and the closed-form backward), the output equal but for the rare element
    one bf16 unit apart (1/rms summed in another order), dx to 1e-4 of its norm, Llama's w and Gemma's 1 + w (an
    odd width: the sums' tail); a recomputed output (`recomputed_outputs`) is the forward's own, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 33, 200, generator=g) * 3).bfloat16().requires_grad_()
    w = (torch.randn(200, generator=g) * 0.3 + (0 if offset else 1)).bfloat16()
    if norm._rows(x, w) is None:
        pytest.skip(f"no compiled rows: {norm.compiled.why_not('rms_norm')}")  # no C compiler
    grad = torch.randn(x.shape, generator=g).bfloat16()
    y, rstd, rows = norm._forward(x.detach(), w, 1e-5, offset)
    assert rows and torch.equal(norm._Recipe(x.detach(), w, rstd, offset, True).value(), y)
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(norm, "_rows", lambda x, w: None)
        out = norm._RMSNorm.apply(x, w, 1e-5, offset)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    (y_c, dx_c), (y_t, dx_t) = results
    assert torch.equal(y_c, y) and type(y_c.grad_fn) is type(y_t.grad_fn)
    apart = y_c != y_t
    assert apart.float().mean() <= 1e-3  # measured 2-26 in a million
    torch.testing.assert_close(y_c[apart].float(), y_t[apart].float(), rtol=2**-7, atol=0)
    assert float((dx_c.float() - dx_t.float()).norm() / dx_t.float().norm()) < 1e-4


def test_a_norm_keeping_its_input_in_bf16_gives_the_same_output_and_nearly_the_gradients():
    """training.saved_activations: bf16 in an fp32 pass: x kept in bf16 (half its bytes), the output the same bits,
    dx, dw and the rebuilt output (what the next layer's weight gradient reads) from x rounded to 8 bits."""
    torch.manual_seed(0)
    ref = LlamaRMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(ref.weight, 1.0, 0.2)
    module = copy.deepcopy(ref)
    assert norm.install(module) == 1
    setattr(module, swiglu.KEEP, torch.bfloat16)
    x = (torch.randn(3, 11, 64) * 4).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    assert (torch.bfloat16, (3, 11, 64)) in kept and (torch.float32, (3, 11, 64)) not in kept
    y_ref = ref(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for ours, theirs in ((x.grad, x_ref.grad), (module.weight.grad, ref.weight.grad)):
        assert not torch.equal(ours, theirs)  # read from the rounded x
        assert (ours - theirs).norm() < 1e-2 * theirs.norm()
    # a layer after the norm saves its output: within recomputed_outputs it is rebuilt from the kept x (rounded), with
    # the forward's 1/rms, and the layer's weight gradient reads that
    linear = torch.nn.Linear(64, 8, bias=False)
    with norm.recomputed_outputs():
        out = linear(module(x.detach()))
    out.backward(torch.ones_like(out))
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    rebuilt = module.weight.detach() * (x.detach().bfloat16().float() * rstd)
    expected = torch.ones(33, 8).t() @ rebuilt.reshape(-1, 64)
    assert torch.allclose(linear.weight.grad, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(linear.weight.grad, torch.ones(33, 8).t() @ y_ref.detach().reshape(-1, 64), rtol=1e-5,
                              atol=1e-5)  # fmt: skip


def test_a_linears_flattened_view_of_a_norm_output_is_rebuilt_too():
    """An nn.Linear over a 3-D input saves it as the 2-D view its product takes (full fine-tuning's q, k, v
    projections): within recomputed_outputs that view is rebuilt as well, so no norm output outlives the forward, and
    the weight gradient is the same bits."""
    import gc
    import weakref

    torch.manual_seed(0)
    module = LlamaRMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(module.weight, 1.0, 0.2)
    norm.install(module)
    linear = torch.nn.Linear(64, 8, bias=False)
    x = torch.randn(3, 11, 64) * 4
    grads, alive = [], []
    for recompute in (False, True):
        linear.weight.grad = None
        with norm.recomputed_outputs() if recompute else torch.enable_grad():
            y = module(x)
            out = linear(y)
        ref = weakref.ref(y)
        del y
        gc.collect()
        alive.append(ref() is not None)
        out.backward(torch.ones_like(out))
        grads.append(linear.weight.grad.clone())
    assert alive == [True, False]
    assert torch.equal(grads[0], grads[1])
