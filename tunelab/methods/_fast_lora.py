"""A faster training path for PEFT's LoRA linear layers when the base weight is frozen and dense.

PEFT computes `W x + s * B (A x)`: one big matmul, two small ones, then an elementwise scale and
add over the whole `[tokens, out]` output, and in the backward pass another scale and an add of
the two input-gradient paths. On a CPU those elementwise passes are memory-bound and cost about
as much as the small matmuls (profile of SmolLM2 LoRA SFT: ~25% of a step in mul/add).

Here the adapter is folded into the weight for the duration of one call: `W' = W + s B A` costs
`2 out in r` FLOPs (under 2% of the big matmul at 1,024 tokens) and the output is a single matmul
`x W'^T`. The backward pass rebuilds `W'` instead of keeping it, so memory holds only `x`:

    dx = g W'           dB = s g^T (x A^T)           dA = s (g B)^T x

The frozen W gets no gradient. Anything this path does not cover (dropout, DoRA and other variants,
several active adapters, quantised or non-Linear bases, autocast, a trainable base weight, merged or
disabled adapters) goes through PEFT's own forward unchanged, so saved adapters, `disable_adapter()`
and merging behave exactly as in PEFT. Why not a library: no maintained CPU kernel for this exists
(Unsloth's fused LoRA kernels are Triton / CUDA only).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _FoldedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scale = scale
        ctx.has_bias = bias is not None and bias.requires_grad
        return F.linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scale), bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ torch.addmm(weight, lora_b, lora_a, alpha=s)).view(x.shape)
        grad_a = (g @ lora_b).t().mm(x2).mul_(s)
        grad_b = g.t().mm(x2 @ lora_a.t()).mul_(s)
        grad_bias = g.sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    if (
        name not in self.lora_A
        or name in getattr(self, "lora_variant", {})
        or not isinstance(self.lora_dropout[name], nn.Identity)
        or type(base) is not nn.Linear
        or getattr(self, "fan_in_fan_out", False)
        or base.weight.requires_grad
        or torch.is_autocast_enabled(x.device.type)
        or not (x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype)
    ):
        return self._peft_forward(x, *args, **kwargs)
    return _FoldedLoRA.apply(
        x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    )


def enable(model) -> int:
    """Route every PEFT LoRA Linear of `model` through the folded path; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            n += 1
    return n
