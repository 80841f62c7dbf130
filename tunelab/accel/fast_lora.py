"""A faster, lighter training path for PEFT's LoRA linear layers when the base weight is frozen and dense.

PEFT computes `W x + s * B (A x)`: one big matmul, two small ones, then an elementwise scale and
add over the whole `[tokens, out]` output, and in the backward pass another scale and an add of
the two input-gradient paths. On a CPU those elementwise passes are memory-bound and cost about
as much as the small matmuls (profile of SmolLM2 LoRA SFT: ~25% of a step in mul/add).

Here each adapted layer is one autograd function. With many rows the adapter is folded into the
weight for the duration of the call, `W' = W + s B A` (`2 out in r` FLOPs, under 2% of the big
matmul at 1,024 tokens), and the output is a single matmul `x W'^T`; with few rows, where writing a
weight-sized `W'` costs more than a pass over the output, the low-rank term is accumulated into the
output by `addmm_` instead. Only `x` is kept for the backward pass, and on that path `x A^T` (r
numbers a row, so dB needs no second pass over `x`):

    dx = g W'           dB = s g^T (x A^T)           dA = s (g B)^T x

The frozen W gets no gradient.

A SwiGLU MLP (`down(silu(gate(x)) * up(x))`, Llama / Qwen / Mistral / SmolLM) whose three layers
take this path runs as one function that keeps `x`, `gate(x)` and `up(x)` and recomputes
`silu(gate(x)) * up(x)` in the backward pass: two of the four `[tokens, intermediate]` tensors
autograd would keep (a quarter of SmolLM2's activation memory) for two elementwise passes.

Anything this path does not cover (dropout, DoRA and other variants, several active adapters,
quantised or non-Linear bases, autocast, a trainable base weight, merged or disabled adapters) goes
through PEFT's own forward unchanged, so saved adapters, `disable_adapter()` and merging behave
exactly as in PEFT. Why not a library: no maintained CPU kernel for this exists (Unsloth's fused
LoRA and SwiGLU kernels are Triton / CUDA only).
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.accel.compact import CompactLinear, CompactWeight, scratch


class _Parts(NamedTuple):
    """A linear map y = x (W + s B A)^T + bias; A and B are None for a frozen plain Linear. W is a
    tensor, or a CompactWeight decoded where it is used (accel/compact.py)."""

    weight: torch.Tensor | CompactWeight
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scale: float


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1]


def _dense(p: _Parts) -> torch.Tensor:
    """W, for one matmul now (a compact W is decoded into a shared buffer)."""
    return p.weight.dense(scratch=True) if isinstance(p.weight, CompactWeight) else p.weight


def _folded(p: _Parts) -> torch.Tensor:
    """W + s B A, for one matmul now, in a buffer shared by the weights of this shape."""
    if isinstance(p.weight, CompactWeight):
        return p.weight.dense(scratch=True).addmm_(p.lora_b, p.lora_a, alpha=p.scale)
    return torch.addmm(p.weight, p.lora_b, p.lora_a, alpha=p.scale, out=scratch(p.weight.shape, p.weight.device))


def _linear(x: torch.Tensor, p: _Parts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, x A^T): x A^T ([rows, r], kept for dB) when the adapter was not folded, else None."""
    if p.lora_a is None:
        return F.linear(x, _dense(p), p.bias), None
    if _rows(x) > p.weight.shape[1]:  # fold: a weight-sized write is cheaper than an output-sized pass
        return F.linear(x, _folded(p), p.bias), None
    x2 = x.reshape(-1, x.shape[-1])
    out = F.linear(x2, _dense(p), p.bias)
    xa = x2 @ p.lora_a.t()
    out.addmm_(xa, p.lora_b.t(), alpha=p.scale)
    return out.view(*x.shape[:-1], -1), xa


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, p: _Parts, need_x: bool = True, xa=None):
    """(dx, dA, dB) of `_linear` (dx None when not needed; dA, dB None for a plain Linear); `xa` is the
    forward's x A^T when it kept one (else it is computed again)."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = grad_a = grad_b = None
    g_b = None if p.lora_a is None else g @ p.lora_b  # [rows, r]: for dA, and for dx when not folded
    if need_x:
        if p.lora_a is None:
            grad_x = g @ _dense(p)
        elif _rows(g) > p.weight.shape[0]:
            grad_x = g @ _folded(p)
        else:
            grad_x = (g @ _dense(p)).addmm_(g_b, p.lora_a, alpha=p.scale)
        grad_x = grad_x.view(x.shape)
    if p.lora_a is not None:
        grad_a = g_b.t().mm(x2).mul_(p.scale)
        # dB^T = (x A^T)^T g, transposed: MKL reads g row by row this way, ~1.6x faster on a CPU core than
        # g^T (x A^T) for SmolLM2's [256, 1,536] g
        grad_b = (x2 @ p.lora_a.t() if xa is None else xa).t().mm(g).mul_(p.scale).t().contiguous()
    return grad_x, grad_a, grad_b


def _saveable(weight) -> torch.Tensor | None:
    """What save_for_backward keeps of a weight: the tensor, or None for a CompactWeight (kept on ctx)."""
    return None if isinstance(weight, CompactWeight) else weight


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        p = _Parts(weight, bias, lora_a, lora_b, scale)
        out, xa = _linear(x, p)
        ctx.save_for_backward(x, _saveable(weight), lora_a, lora_b, xa)
        ctx.compact = weight if isinstance(weight, CompactWeight) else None
        ctx.scale = scale
        ctx.has_bias = bias is not None and bias.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        p = _Parts(ctx.compact or weight, None, lora_a, lora_b, ctx.scale)
        grad_x, grad_a, grad_b = _linear_backward(grad, x, p, ctx.needs_input_grad[0], xa)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for bias-free layers; keeps x, gate(x), up(x)."""

    @staticmethod
    def forward(ctx, x, *flat):
        gate, up, down = (_Parts(*flat[i : i + 5]) for i in (0, 5, 10))
        (g, xa_g), (u, xa_u) = _linear(x, gate), _linear(x, up)
        out, xa_d = _linear(F.silu(g).mul_(u), down)
        ctx.save_for_backward(
            x, g, u, xa_g, xa_u, xa_d, *(t for p in (gate, up, down) for t in (_saveable(p.weight), p.lora_a, p.lora_b))
        )
        ctx.compact = [p.weight if isinstance(p.weight, CompactWeight) else None for p in (gate, up, down)]
        ctx.scales = gate.scale, up.scale, down.scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, g, u, xa_g, xa_u, xa_d, *w = ctx.saved_tensors
        gate, up, down = (
            _Parts(ctx.compact[k] or w[3 * k], None, w[3 * k + 1], w[3 * k + 2], ctx.scales[k]) for k in range(3)
        )
        silu = F.silu(g)
        grad_h, grad_da, grad_db = _linear_backward(grad, silu * u, down, xa=xa_d)
        grad_u = grad_h * silu
        del silu
        # silu'(g) applied by ATen's own kernel, in place: one pass instead of six
        grad_g = torch.ops.aten.silu_backward.grad_input(grad_h.mul_(u), g, grad_input=grad_h)
        grad_x, grad_ga, grad_gb = _linear_backward(grad_g, x, gate, ctx.needs_input_grad[0], xa_g)
        grad_x_up, grad_ua, grad_ub = _linear_backward(grad_u, x, up, ctx.needs_input_grad[0], xa_u)
        if grad_x is not None:
            grad_x += grad_x_up
        return (grad_x, None, None, grad_ga, grad_gb, None, None, None, grad_ua, grad_ub, None,
                None, None, grad_da, grad_db, None)


def _parts(layer: nn.Module, x: torch.Tensor) -> _Parts | None:
    """The pieces of a frozen dense Linear, or of a PEFT LoRA Linear this path covers; else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) in (nn.Linear, CompactLinear):
        base, a, b, s = layer, None, None, 1.0
    elif isinstance(layer, LoraLinear):
        active = layer.active_adapters
        if layer.disable_adapters or layer.merged or len(active) != 1:
            return None
        name = active[0]
        base = layer.base_layer
        if (
            name not in layer.lora_A
            or name in getattr(layer, "lora_variant", {})
            or not isinstance(layer.lora_dropout[name], nn.Identity)
            or type(base) not in (nn.Linear, CompactLinear)
            or getattr(layer, "fan_in_fan_out", False)
            or layer.lora_A[name].weight.dtype != x.dtype
        ):
            return None
        a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    else:
        return None
    if type(base) is CompactLinear:
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return None
        return _Parts(base.compact, base.bias, a, b, s)
    if base.weight.requires_grad or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return _Parts(base.weight, base.bias, a, b, s)


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    p = None if args or kwargs else _parts(self, x)
    if p is None:
        return self._peft_forward(x, *args, **kwargs)
    return _LoRALinear.apply(x, *p)


def _fast_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    parts = [_parts(layer, x) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
    if not torch.is_grad_enabled() or any(p is None or p.bias is not None for p in parts):
        return self._plain_forward(x)
    return _SwiGLU.apply(x, *(t for p in parts for t in p))


def _is_swiglu(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")) and isinstance(
        getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)
    )


def routes(model) -> bool:
    """Whether `enable` belongs on `model`: it has PEFT LoRA Linear layers and its base is not quantised to 4
    bits (qlora: PEFT's own 4-bit LoRA layers, which this path does not cover)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from tunelab.models.loading import unwrap

    if getattr(unwrap(model), "is_loaded_in_4bit", False):
        return False
    return any(isinstance(m, LoraLinear) for m in model.modules())


def why_not(model) -> str | None:
    """Why every PEFT LoRA Linear layer of `model` will run PEFT's own forward all the same (the first
    reason found), or None when some take the fast path."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    reasons = []
    for m in model.modules():
        if not isinstance(m, LoraLinear):
            continue
        name = m.active_adapters[0] if len(m.active_adapters) == 1 else None
        if name is None or name not in m.lora_A:
            reasons.append("several active adapters")
        elif not isinstance(m.lora_dropout[name], nn.Identity):
            reasons.append(f"LoRA dropout {m.lora_dropout[name].p} > 0 (method.dropout: 0 takes the fast path)")
        elif name in getattr(m, "lora_variant", {}):
            reasons.append(f"a LoRA variant ({type(m.lora_variant[name]).__name__})")
        elif type(m.base_layer) not in (nn.Linear, CompactLinear):
            reasons.append(f"a {type(m.base_layer).__name__} base layer")
        else:
            return None
    return reasons[0] if reasons else None


def enable(model) -> int:
    """Route every PEFT LoRA Linear of `model`, and every SwiGLU MLP around them, through the fast
    path; returns how many LoRA layers."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            n += 1
        elif _is_swiglu(module) and not hasattr(module, "_plain_forward"):
            module._plain_forward = module.forward
            module.forward = types.MethodType(_fast_mlp_forward, module)
    return n
