"""A SwiGLU MLP over plain Linear layers as one autograd function: the same forward, half the activations kept.

`down(silu(gate(x)) * up(x))` (Llama, Qwen, Mistral, SmolLM; GeGLU, Gemma's, with GELU's tanh form in silu's
place: `ACTIVATIONS`) run module by module keeps four `[tokens,
intermediate]` tensors for the backward pass: gate(x) for silu, silu(gate(x)) and up(x) for the product, and
the product for down's weight gradient. Here the forward runs the same operations (the same bits) and keeps
x, g = gate(x) and u = up(x); the backward makes h = silu(g) u again (two elementwise passes) and applies

    dW_down = dyᵀ h     dh = dy W_down     du = dh silu(g)     dg = silu'(g) dh u
    dW_gate = dgᵀ x     dW_up = duᵀ x      dx = dg W_gate + du W_up

For SmolLM2-135M at 1,024 tokens that is 180 MB less in a bf16 pass (360 MB in fp32) for full fine-tuning, the
largest share of its activations (docs/performance.md, "bf16 weights"). This is for MLPs whose weights train or
stay plain Linear weights (full, freeze, gradual); an MLP around PEFT LoRA layers takes fast_lora's function,
which keeps the same three tensors. With `training.saved_activations: bf16` (auto where the optimizer state is
bf16) an fp32 pass keeps g and u in bf16 (another 180 MB less), here and in fast LoRA's function (`KEEP`): the
forward is the same, the backward reads g and u rounded to 8 bits. Why by hand: PyTorch has no fused SwiGLU for a CPU, and Liger's and
Unsloth's kernels are Triton (GPU only).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# the gated MLPs' activations these functions compute: name -> the function an act_fn must match bit for bit
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
# a module attribute: the dtype it keeps its saved activations in where narrower than the pass's
# (training.saved_activations; norm.py reads it too)
KEEP = "tunelab_keep"


def narrowed(t: torch.Tensor, keep: torch.dtype | None) -> torch.Tensor:
    """`t` as a function saves it for its backward pass: in `keep` where one is set and differs (KEEP), else itself."""
    return t if keep is None or keep == t.dtype else t.to(keep)


def act(kind: str, g: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation of `kind` (an `ACTIVATIONS` name) on g: what the model's act_fn computes."""
    return ACTIVATIONS[kind](g)


def act_backward_(kind: str, grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * act'(g), written into grad: ATen's own backward kernel of the activation (what autograd runs), one
    pass instead of the several of its formula."""
    if kind == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=grad)
    return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="tanh", grad_input=grad)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, kind, keep=None):
        g, u = F.linear(x, w_gate), F.linear(x, w_up)
        out = F.linear(act(kind, g) * u, w_down)
        # training.saved_activations: g and u kept narrower (module doc)
        ctx.save_for_backward(x, narrowed(g, keep), narrowed(u, keep), w_gate, w_up, w_down)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad):
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        g, u = g.to(x.dtype), u.to(x.dtype)
        need_x, need_gate, need_up, need_down, *_ = ctx.needs_input_grad
        dy = grad.reshape(-1, grad.shape[-1])
        a = act(ctx.kind, g).reshape(-1, g.shape[-1])
        u2 = u.reshape(-1, u.shape[-1])
        grad_down = dy.t().mm(a * u2) if need_down else None
        dh = dy.mm(w_down)
        du = dh * a
        del a
        dg = act_backward_(ctx.kind, dh.mul_(u2), g.reshape(dh.shape))
        x2 = x.reshape(-1, x.shape[-1])
        grad_gate = dg.t().mm(x2) if need_gate else None
        grad_up = du.t().mm(x2) if need_up else None
        grad_x = dg.mm(w_gate).addmm_(du, w_up).view(x.shape) if need_x else None
        return grad_x, grad_gate, grad_up, grad_down, None, None


def _plain(layer) -> bool:
    return type(layer) is nn.Linear and layer.bias is None


def _covered(self, x: torch.Tensor) -> bool:
    """Gradients on, and x and the three weights in one dtype (fp32, or bf16 weights that train: under autocast
    the linear layers then compute in that dtype too; an fp32 master weight beside a bf16 x does not)."""
    if not torch.is_grad_enabled():
        return False
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    if any(m._forward_hooks or m._forward_pre_hooks for m in layers):  # a hook on a layer would be skipped
        return False
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.get_autocast_dtype(x.device.type):
        return False  # fp32 under autocast: the linear layers would compute in bf16, the backward pass not
    return all(m.weight.dtype == x.dtype and m.weight.device == x.device for m in layers)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _covered(self, x):
        return self._plain_forward(x)
    return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.tunelab_act,
                         getattr(self, KEEP, None))  # fmt: skip


LAYERS = ("gate_proj", "up_proj", "down_proj")  # a gated MLP's linear layers, as transformers names them


def _gated(module: nn.Module) -> bool:
    return all(hasattr(module, k) for k in LAYERS)


def gated_activation(module: nn.Module) -> str | None:
    """The activation (an `ACTIVATIONS` name) of a gated MLP, gate_proj, up_proj and down_proj layers around an
    act_fn that gives one of them bit for bit on a probe (SiLU: Llama, Qwen, Mistral; GELU's tanh form: Gemma),
    else None. Kept on the module once asked."""
    if not _gated(module):
        return None
    if "tunelab_act" in vars(module):
        return module.tunelab_act
    fn, kind = getattr(module, "act_fn", None), None
    if isinstance(fn, nn.Module) and not any(True for _ in fn.parameters()):
        probe = torch.linspace(-8, 8, 97)
        with torch.no_grad():
            try:
                kind = next((k for k, f in ACTIVATIONS.items() if torch.equal(fn(probe), f(probe))), None)
            except Exception:  # noqa: BLE001 - an activation of another signature: not this path
                kind = None
    module.tunelab_act = kind
    return kind


def other_activations(model) -> list[str]:
    """The act_fn classes of the model's gated MLPs that these functions do not compute (their own forward runs)."""
    mlps = [m for m in model.modules() if _gated(m)]
    return sorted({type(getattr(m, "act_fn", None)).__name__ for m in mlps if gated_activation(m) is None})


def is_swiglu(module: nn.Module) -> bool:
    """Whether `module` is a gated MLP this path computes (`gated_activation`): SwiGLU, or GeGLU in tanh form."""
    return gated_activation(module) is not None


def install(model) -> int:
    """Route every SwiGLU MLP of `model` whose three layers are bias-free nn.Linear (and not routed already, e.g.
    by fast LoRA) through `_SwiGLU`; returns how many."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_plain_forward") or not is_swiglu(m):
            continue
        if not all(_plain(getattr(m, k)) for k in LAYERS):
            continue
        m._plain_forward = m.forward
        m.forward = types.MethodType(_forward, m)
        n += 1
    return n


def keep_saved(model, dtype: torch.dtype) -> tuple[int, int]:
    """Mark the MLPs routed through one function (`install` here, or fast LoRA's) and the norms accel's norm.py
    routed (their `tunelab_norm`) to keep their saved activations in `dtype` where a pass's are wider (KEEP;
    training.saved_activations): (MLPs, norms)."""
    mlps = norms = 0
    for m in model.modules():
        if hasattr(m, "_plain_forward") and getattr(m, "tunelab_act", None) is not None:
            mlps += 1
        elif hasattr(m, "tunelab_norm"):
            norms += 1
        else:
            continue
        setattr(m, KEEP, dtype)
    return mlps, norms
