"""The SwiGLU MLP as one autograd function (accel/swiglu.py): the module's own output bit for bit, its gradients
autograd's, half the activations kept, and a full fine-tuning run that takes it with the losses of one that does not."""

import copy

import pytest
import torch

from tunelab.accel import swiglu
from tunelab.testing import tiny_causal


def mlp(dtype, arch="llama"):
    torch.manual_seed(0)
    dims = {"gemma3_text": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)}.get(arch, {})
    return (
        tiny_causal(arch, 64, hidden_size=32, intermediate_size=96, num_hidden_layers=1, **dims)
        .model.layers[0]
        .mlp.to(dtype)
    )


def saved_bytes(fn, module):
    """fn's result and the bytes of the tensors its graph keeps, the module's weights aside."""
    seen, total = {p.untyped_storage().data_ptr() for p in module.parameters()}, 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # SiLU; Gemma's GELU in tanh form (GeGLU)
@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_swiglu_is_the_modules_forward_and_autograds_gradients_keeping_half(dtype, autocast, arch):
    module, reference = mlp(dtype, arch), None
    reference = copy.deepcopy(module)
    assert swiglu.install(module) == 1 and swiglu.install(module) == 0  # once
    x = (torch.randn(2, 7, 32) * 2).to(dtype).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, kept = saved_bytes(lambda: module(x), module)
        y_ref, kept_ref = saved_bytes(lambda: reference(x_ref), reference)
    assert type(y.grad_fn).__name__ == "_SwiGLUBackward"
    assert torch.equal(y, y_ref)  # the same operations: the same bits
    width = torch.finfo(dtype).bits // 8
    assert kept == (32 + 2 * 96) * 14 * width  # x, gate(x), up(x)
    assert kept_ref == (32 + 4 * 96) * 14 * width  # x and four [tokens, intermediate] tensors
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = 0 if dtype == torch.float32 else 1e-2
    assert torch.allclose(x.grad, x_ref.grad, rtol=tol, atol=1e-6 if tol == 0 else 1e-2)
    for name in ("gate_proj", "up_proj", "down_proj"):
        ours, theirs = getattr(module, name).weight.grad, getattr(reference, name).weight.grad
        assert ours.dtype == dtype and torch.allclose(ours, theirs, rtol=tol, atol=1e-6 if tol == 0 else 1e-2), name


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_an_fp32_mlp_keeping_gate_and_up_in_bf16_gives_the_same_output_and_nearly_the_gradients(arch):
    """training.saved_activations: bf16 (swiglu.KEEP): g and u kept in bf16, a quarter of the fp32 pass's bytes
    fewer than `_SwiGLU` keeps in fp32; the forward the same bits, the gradients from g and u rounded to 8 bits."""
    module = mlp(torch.float32, arch)
    reference = copy.deepcopy(module)
    swiglu.install(module)
    assert swiglu.keep_saved(module, torch.bfloat16) == (1, 0)
    x = (torch.randn(2, 7, 32) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, kept = saved_bytes(lambda: module(x), module)
    y_ref = reference(x_ref)
    assert torch.equal(y, y_ref)
    assert kept == (32 * 4 + 2 * 96 * 2) * 14  # x in fp32, gate(x) and up(x) in bf16
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    pairs = [(x.grad, x_ref.grad)] + [(getattr(module, n).weight.grad, getattr(reference, n).weight.grad)
                                      for n in ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
    for ours, theirs in pairs:
        assert ours.dtype == torch.float32 and not torch.equal(ours, theirs)  # read from the rounded g and u
        assert (ours - theirs).norm() < 1e-2 * theirs.norm()


def test_only_the_activations_it_computes_are_taken():
    from transformers.activations import ACT2FN

    module = mlp(torch.float32)
    assert swiglu.gated_activation(module) == "silu"
    for name, kind in (("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", None), ("relu", None)):
        module = mlp(torch.float32)
        module.act_fn = ACT2FN[name]
        assert swiglu.gated_activation(module) == kind, name
        assert swiglu.install(module) == (kind is not None), name


def test_frozen_weights_get_no_gradient_and_an_fp32_master_weight_takes_the_modules_forward():
    module = mlp(torch.float32)
    swiglu.install(module)
    for layer in (module.gate_proj, module.up_proj):
        layer.weight.requires_grad_(False)
    x = torch.randn(3, 32, requires_grad=True)
    module(x).sum().backward()
    assert module.gate_proj.weight.grad is None and module.down_proj.weight.grad is not None and x.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, a bf16 or fp32 input: autocast's own casts
        for dtype in (torch.bfloat16, torch.float32):
            y = module(torch.randn(3, 32).to(dtype).requires_grad_())
            assert type(y.grad_fn).__name__ != "_SwiGLUBackward"
            y.sum().backward()
    module.down_proj.register_forward_hook(lambda *a: None)  # a hook on a layer: the module's own forward runs
    assert type(module(x).grad_fn).__name__ != "_SwiGLUBackward"
