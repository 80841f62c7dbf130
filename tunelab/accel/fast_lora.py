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

LoRA dropout (PEFT's semantics: `y = W x + s B A d(x)`, `d(x) = x * m / (1 - p)` with a Bernoulli(1 - p)
keep mask `m` drawn per layer and call, on the adapter's input only) rules out the fold, since the base
and the adapter see different inputs: the low-rank term is added to `W x` by `addmm_`, with `1 / (1 - p)`
folded into its scale. The mask is not kept: the forward pass keeps what draws it (a 64-bit key, not `[rows, in]` bytes) and the
backward pass draws it again, the way PyTorch's own checkpointing replays random ops. The draw is 16 random
bits an element (keep where the bits, read as a number in [0, 65536), are at least `p` 65536 rounded), on a CPU
by one compiled loop over a hash of (key, element) with the key drawn from torch's generator (masks.py: 0.21 ms
for a [1,024, 1,536] mask, where torch's generator took 2.4 ms and `bernoulli_`, which PEFT's `nn.Dropout`
calls, more than twice that); without a C compiler, or off a CPU, from torch's generator itself, four elements
to each 64-bit word of `random_`, the generator's state kept for the backward pass. So the masks are a
Bernoulli(1 - p') draw with p' = p to 1/65536, seeded by the run's seed, not PEFT's very bits:

    dx = g W + s' ((g B) A) * m    dB = s' g^T ((x * m) A^T)    dA = s' (g B)^T (x * m)    s' = s / (1 - p)

`(x * m) A^T` is kept from the forward pass (r numbers a row). Thread shares (threads.py) draw from a
generator of their own each (`drawing_from`), so that several shares draw in a fixed order.

bf16 passes (`model.dtype: bfloat16`, or `auto` on a CPU with native bf16): x and the frozen W in bf16, the
adapter's A and B its fp32 master weights. Each call casts A and B to bf16 for its products (r x (in + out)
numbers) and returns dA and dB in fp32, which is how autocast treats PEFT's forward too; the adapter is never
folded, since W + s B A rounded to bf16 (8 bits of mantissa) would drop every element of s B A under half a
unit of W's last place, early in training all of them.

A 4-bit base (qlora, bitsandbytes NF4 / FP4) takes the same path, its weight dequantized by bitsandbytes' kernel
where a matmul needs it (`FourBitWeight`), in the forward pass and again in the backward pass, as bitsandbytes'
own 4-bit matmul does: its LoRA layers and SwiGLU MLPs run as above (dropout included, no fold in bf16). PEFT's
4-bit LoRA layer instead clones the base's output, and outside autocast computes the adapter in fp32 on the
input cast up (an fp32 copy of every adapted input kept for the backward pass: +0.24 GB on the 1.7B config); the
MLP then keeps all four [tokens, intermediate] tensors.

DoRA (PEFT's `use_dora`): y = c (W + s B A) x + bias with c = m / ||W + s B A|| per output row, m trained and the
norm a constant to autograd (PEFT's choice, after the paper's section 4.3). Each call takes c from the decoded W
without forming W + s B A: row by row ||W + s B A||^2 = ||W||^2 + 2 s (W A^T) . B + s^2 (B A A^T) . B, products of
r columns, in fp32 whatever W's dtype (||W||^2 once per weight: it is frozen). Where the adapter folds, the folded
rows are scaled by c; elsewhere the output is (as y + y (c - 1) in bf16 passes: `_times`). The backward pass is LoRA's for the gradient scaled by c,
plus dm = sum over rows of g y / m, read off the saved output (which the next op mostly keeps anyway). With LoRA
dropout PEFT's DoRA computes y = W x + (c - 1) W d(x) + c s B A d(x): W meets the input and the dropped input, two
big matmuls a pass here as there, and c (W + s B A) d(x) is kept for dm. PEFT's own forward instead forms W + s B A
and its norm at every call (weight-sized work: the identity matrix through both LoRA matrices, the sum, the norm),
and under autocast casts W to bf16 each time.

Anything this path does not cover (other LoRA variants, several active adapters,
non-Linear bases, autocast, a trainable base weight, merged or disabled adapters) goes
through PEFT's own forward unchanged, so saved adapters, `disable_adapter()` and merging behave
exactly as in PEFT. Why not a library: no maintained CPU kernel for this exists (Unsloth's fused
LoRA and SwiGLU kernels are Triton / CUDA only).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.accel import masks
from tunelab.accel.compact import CompactLinear, CompactWeight, scratch
from tunelab.accel.swiglu import KEEP, act, act_backward_, is_swiglu, narrowed


class FourBitWeight:
    """A bitsandbytes 4-bit weight (qlora's frozen base) as [out, in], dequantized where a matmul needs it: what
    bitsandbytes' own 4-bit matmul does in both passes on a CPU, here in the calls of this path."""

    def __init__(self, data: torch.Tensor, state):
        self.data, self.state = data, state  # the packed codes and their bitsandbytes QuantState

    @property
    def shape(self) -> torch.Size:
        return self.state.shape

    def dense(self, scratch: bool = False) -> torch.Tensor:  # `scratch`: CompactWeight's signature
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.data, self.state)


class _Parts(NamedTuple):
    """A linear map y = x (W + s B A)^T + bias; A and B are None for a frozen plain Linear. W is a
    tensor, or a weight decoded where it is used: a CompactWeight (accel/compact.py) or a FourBitWeight."""

    weight: torch.Tensor | CompactWeight | FourBitWeight
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scale: float
    dropout: float = 0.0  # the LoRA input's dropout probability (training mode only; 0 in eval)
    magnitude: torch.Tensor | None = None  # DoRA's m, one per output row; None for plain LoRA


_LOCAL = threading.local()  # .generator: the generator a thread share draws dropout masks from


@contextlib.contextmanager
def drawing_from(generator: torch.Generator | None):
    """Within the context, this thread's LoRA dropout masks come from `generator` (None: torch's default
    generator of the input's device, as PEFT's nn.Dropout draws)."""
    before = getattr(_LOCAL, "generator", None)
    _LOCAL.generator = generator
    try:
        yield
    finally:
        _LOCAL.generator = before


def _generator(device: torch.device) -> torch.Generator:
    gen = getattr(_LOCAL, "generator", None)
    if gen is not None:
        return gen
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device.type).default_generators[device.index or 0]


def keep_mask(x: torch.Tensor, p: float, state=None) -> tuple[torch.Tensor, object]:
    """(m, what draws it again): a bool keep mask the shape of `x`, each element kept with probability 1 - p (p to
    1/65536), drawn anew from this thread's generator, or again from a saved `state` (the backward pass). On a
    CPU by the compiled loop (masks.py: the state is its key, one draw of the generator), else (no C compiler,
    another device) from the generator itself (the state is the generator's)."""
    compiled = masks.load() if x.device.type == "cpu" else None
    if compiled is not None:
        key = masks.new_key(_generator(x.device)) if state is None else state
        return masks.draw(compiled, x.shape, p, key), key
    if state is None:
        gen = _generator(x.device)
        state = gen.get_state()
    else:
        gen = torch.Generator(x.device)
        gen.set_state(state)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768, state


def _scale(p: _Parts) -> float:
    """The adapter's scale on the masked input x * m: s / (1 - p) (dropout's rescaling folded in)."""
    return p.scale / (1 - p.dropout) if p.dropout else p.scale


def _rows(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1]


def _folds(x: torch.Tensor) -> bool:
    """Whether W + s B A may be formed for a pass of x: only in fp32 (bf16 would round s B A away: module doc)."""
    return x.dtype == torch.float32


def adapter_fits(adapter: torch.dtype, x: torch.dtype) -> bool:
    """Whether an adapter in `adapter` dtype takes this path for an input in `x` dtype: the same dtype, or fp32
    master weights in a bf16 pass."""
    return adapter == x or (adapter == torch.float32 and x == torch.bfloat16)


def _low_rank(p: _Parts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in the pass's dtype (the same tensors when they are in it already)."""
    return p.lora_a.to(dtype), p.lora_b.to(dtype)


def _dense(p: _Parts) -> torch.Tensor:
    """W, for one matmul now (a compact W is decoded into a shared buffer)."""
    return p.weight if isinstance(p.weight, torch.Tensor) else p.weight.dense(scratch=True)


def _folded(p: _Parts) -> torch.Tensor:
    """W + s B A, for one matmul now, in a buffer shared by the weights of this shape."""
    if not isinstance(p.weight, torch.Tensor):
        return p.weight.dense(scratch=True).addmm_(p.lora_b, p.lora_a, alpha=p.scale)
    return torch.addmm(p.weight, p.lora_b, p.lora_a, alpha=p.scale, out=scratch(p.weight.shape, p.weight.device))


def _squared_norms(p: _Parts, dense: torch.Tensor) -> torch.Tensor:
    """||W||^2 per output row of the frozen W in fp32, computed once per weight (`dense`: W decoded now) and kept on
    it. A dense weight changed in place (a load) is seen by its version counter, one given new data (PEFT's merge
    and unmerge set `.data`) by its data pointer; a compact or 4-bit one is immutable. Two thread shares may compute
    it at once: either's result is the same."""
    weight = p.weight
    holder = weight.state if isinstance(weight, FourBitWeight) else weight  # a FourBitWeight is made at each call
    version = (weight._version, weight.data_ptr()) if isinstance(weight, torch.Tensor) else 0
    found = getattr(holder, "_tunelab_squared_norms", None)
    if found is None or found[0] != version:
        found = (version, torch.linalg.vector_norm(dense, dim=1, dtype=torch.float32).square_())
        holder._tunelab_squared_norms = found
    return found[1]


def _times(t: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """t c per column (into `out`, which may be t), c in fp32: for a bf16 t as t + t (c - 1), with c - 1 (small)
    in bf16, which holds it to 2^-9 of itself, so the product is rounded once as t c in fp32 would be (measured:
    the same largest error, no bias), and runs ~2.3x faster than a bf16 t times an fp32 c."""
    if t.dtype == c.dtype:
        return torch.mul(t, c, out=out)
    return torch.addcmul(t, t, (c - 1).to(t.dtype), out=out)


def _dora_scale(p: _Parts, weight: torch.Tensor) -> torch.Tensor:
    """DoRA's c = m / ||W + s B A|| per output row in fp32, from the dense W, without forming W + s B A (or an fp32
    copy of a bf16 W): row by row ||W + s B A||^2 = ||W||^2 + 2 s (W A^T) . B + s^2 (B A A^T) . B, products of r
    columns (||W||^2 once per weight). The norm is a constant to autograd, as in PEFT and the paper (its section
    4.3)."""
    a, b = p.lora_a.float(), p.lora_b.float()
    squared = _squared_norms(p, weight).clone()
    squared.add_((weight @ p.lora_a.to(weight.dtype).t()).float().mul_(b).sum(1), alpha=2 * p.scale)
    squared.add_((b @ (a @ a.t())).mul_(b).sum(1), alpha=p.scale**2)
    return p.magnitude / squared.sqrt_()


def _linear(x: torch.Tensor, p: _Parts):
    """(y, x A^T, dropout state, c, what DoRA's dm reads): d(x) A^T ([rows, r], kept for dB) when the adapter was
    not folded, else None; what draws the dropout mask again (`keep_mask`'s state) when there is dropout, else None; DoRA's scale
    per output row (`_dora_scale`), else None; with DoRA and dropout, c (W + s B A) d(x) (else None: y less the bias
    is what dm reads)."""
    if p.lora_a is None:
        return F.linear(x, _dense(p), p.bias), None, None, None, None
    if not p.dropout and _folds(x) and _rows(x) > p.weight.shape[1]:  # a weight-sized write is cheaper than a pass
        folded, c = _folded(p), None
        if p.magnitude is not None:  # DoRA: the folded rows scaled (the fold is fp32, so its norm is taken directly)
            c = p.magnitude / torch.linalg.vector_norm(folded, dim=1)
            folded.mul_(c[:, None])
        return F.linear(x, folded, p.bias), None, None, c, None
    x2 = x.reshape(-1, x.shape[-1])
    weight = _dense(p)
    c = None if p.magnitude is None else _dora_scale(p, weight)
    out = F.linear(x2, weight, p.bias if c is None else None)
    lora_a, lora_b = _low_rank(p, x.dtype)
    state = scaled = None
    if p.dropout:
        keep, state = keep_mask(x2, p.dropout)
        dropped = x2 * keep  # x * m; 1 / (1 - p) goes in the scale
        del keep
        xa = dropped @ lora_a.t()
        if c is not None:  # DoRA with dropout, as PEFT: W x + (c - 1) W d(x) + c s B A d(x) = W (x - d(x)) + c W' d(x)
            scaled = F.linear(dropped, weight).mul_(1 / (1 - p.dropout))  # W d(x): a second big matmul, as PEFT's
            out.sub_(scaled)
            scaled.addmm_(xa, lora_b.t(), alpha=_scale(p))
            _times(scaled, c, out=scaled)  # c (W + s B A) d(x)
            out.add_(scaled)
        del dropped
    else:
        xa = x2 @ lora_a.t()
    if c is None or not p.dropout:
        out.addmm_(xa, lora_b.t(), alpha=_scale(p))
    if c is not None:
        if not p.dropout:  # an fp32 c: a bf16 output rounded once after the product, not c rounded to bf16 first
            _times(out, c, out=out)
        if p.bias is not None:
            out.add_(p.bias)
    return out.view(*x.shape[:-1], -1), xa, state, c, scaled


def _linear_backward(grad: torch.Tensor, x: torch.Tensor, p: _Parts, need_x: bool = True, xa=None, state=None,
                     c=None, read=None):  # fmt: skip
    """(dx, dA, dB, dm) of `_linear` (dx None when not needed; dA, dB None for a plain Linear, dm without DoRA);
    `xa` is the forward's d(x) A^T when it kept one (else it is computed again), `state` what draws its dropout
    mask again (`keep_mask`). DoRA: `c` its scale and `read` c z, with z what c scales (y less the bias without dropout:
    z = (W + s B A) x; with dropout, the `scaled` of `_linear`), so dm = sum over rows of g z / ||W + s B A|| =
    sum g (c z) / m, and the rest is LoRA's backward of g c (plus, with dropout, W's second product)."""
    g = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = grad_a = grad_b = grad_m = None
    if p.lora_a is None:
        return (g @ _dense(p)).view(x.shape) if need_x else None, None, None, None
    gc = g  # the gradient at the adapter's output (scaled by c with DoRA)
    if c is not None:
        # m = 0 would divide 0 by 0 here: a zero row at the start is refused (methods/lora.py), and a layer whose m
        # has an element trained to exactly 0 takes PEFT's forward (`_parts`)
        # a bf16 sum accumulates in fp32 and rounds once (summing with dtype=fp32 copies the product first)
        grad_m = (g * read.reshape(g.shape)).sum(0).to(p.magnitude.dtype).div_(p.magnitude)
        gc = _times(g, c)
    master = p.lora_a.dtype  # dA and dB are returned in it (fp32 master weights of a bf16 pass)
    lora_a, lora_b = _low_rank(p, x.dtype)
    g_b = gc @ lora_b  # [rows, r]: for dA, and for dx when not folded
    keep = None if state is None else keep_mask(x2, p.dropout, state)[0]
    scale = _scale(p)
    if need_x:
        if keep is not None:
            weight = _dense(p)
            if c is None:
                at_dropped = (g_b @ lora_a).mul_(scale)
            else:  # DoRA: d(x) met W too, scaled by c - 1
                at_dropped = torch.mul(g, (c - 1).to(g.dtype)) @ weight  # c - 1 held by bf16 to 2^-9 of itself
                at_dropped.mul_(1 / (1 - p.dropout)).addmm_(g_b, lora_a, alpha=scale)
            grad_x = (g @ weight).add_(at_dropped.mul_(keep))
            del at_dropped
        elif _folds(x) and _rows(g) > p.weight.shape[0]:
            grad_x = gc @ _folded(p)
        else:
            grad_x = (gc @ _dense(p)).addmm_(g_b, lora_a, alpha=p.scale)
        grad_x = grad_x.view(x.shape)
    dropped = x2 if keep is None else x2 * keep
    del keep
    grad_a = g_b.t().mm(dropped).to(master).mul_(scale)
    # dB^T = (x A^T)^T g, transposed: MKL reads g row by row this way, ~1.6x faster on a CPU core than
    # g^T (x A^T) for SmolLM2's [256, 1,536] g
    grad_b = (dropped @ lora_a.t() if xa is None else xa).t().mm(gc).to(master).mul_(scale).t().contiguous()
    return grad_x, grad_a, grad_b, grad_m


def _saveable(weight) -> torch.Tensor | None:
    """What save_for_backward keeps of a weight: the tensor, or None for a decoded one (kept on ctx: `_decoded`)."""
    return weight if isinstance(weight, torch.Tensor) else None


def _decoded(weight):
    """A weight decoded where it is used (CompactWeight, FourBitWeight), kept on ctx; None for a tensor."""
    return None if isinstance(weight, torch.Tensor) else weight


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, dropout, magnitude):
        p = _Parts(weight, bias, lora_a, lora_b, scale, dropout, magnitude)
        out, xa, state, c, scaled = _linear(x, p)
        # DoRA's dm reads the output (or, with dropout, the part c scales)
        dora = (c, magnitude, out if scaled is None else scaled, bias if scaled is None else None)
        ctx.save_for_backward(x, _saveable(weight), lora_a, lora_b, xa, *(dora if c is not None else (None,) * 4))
        ctx.compact = _decoded(weight)
        ctx.scale, ctx.dropout, ctx.state = scale, dropout, state
        ctx.has_bias = bias is not None and bias.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa, c, magnitude, read, bias = ctx.saved_tensors
        p = _Parts(ctx.compact or weight, None, lora_a, lora_b, ctx.scale, ctx.dropout, magnitude)
        read = read if bias is None else read - bias
        grad_x, grad_a, grad_b, grad_m = _linear_backward(grad, x, p, ctx.needs_input_grad[0], xa, ctx.state, c, read)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, grad_m


FIELDS = len(_Parts._fields)  # a layer's arguments in _SwiGLU's flat list


class _SwiGLU(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) for bias-free layers (act: silu, or GELU's tanh form; swiglu.py); keeps x, gate(x),
    up(x) (and down's output with DoRA)."""

    @staticmethod
    def forward(ctx, x, kind, keep, *flat):
        gate, up, down = (_Parts(*flat[i : i + FIELDS]) for i in range(0, 3 * FIELDS, FIELDS))
        # PEFT's order of draws: gate, up, down
        (g, xa_g, s_g, c_g, z_g), (u, xa_u, s_u, c_u, z_u) = _linear(x, gate), _linear(x, up)
        out, xa_d, s_d, c_d, z_d = _linear(act(kind, g).mul_(u), down)
        # what DoRA's dm reads: a layer's output, or with dropout the part c scales (`_linear`)
        reads = [y if z is None and c is not None else z for y, z, c in ((g, z_g, c_g), (u, z_u, c_u), (out, z_d, c_d))]
        weights = (t for p in (gate, up, down) for t in (_saveable(p.weight), p.lora_a, p.lora_b, p.magnitude))
        g, u = narrowed(g, keep), narrowed(u, keep)  # training.saved_activations (swiglu.py's module doc)
        ctx.save_for_backward(x, g, u, xa_g, xa_u, xa_d, c_g, c_u, c_d, *reads, *weights)
        ctx.compact = [_decoded(p.weight) for p in (gate, up, down)]
        ctx.scales = gate.scale, up.scale, down.scale
        ctx.dropouts, ctx.states = (gate.dropout, up.dropout, down.dropout), (s_g, s_u, s_d)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad):
        x, g, u, xa_g, xa_u, xa_d, c_g, c_u, c_d, read_g, read_u, read_d, *w = ctx.saved_tensors
        g, u = g.to(x.dtype), u.to(x.dtype)
        layers = []
        for k in range(3):  # each layer's (weight, A, B, m)
            weight, a, b, magnitude = w[4 * k : 4 * k + 4]
            layers.append(_Parts(ctx.compact[k] or weight, None, a, b, ctx.scales[k], ctx.dropouts[k], magnitude))
        gate, up, down = layers
        s_g, s_u, s_d = ctx.states
        a = act(ctx.kind, g)
        grad_h, *grads_d = _linear_backward(grad, a * u, down, xa=xa_d, state=s_d, c=c_d, read=read_d)
        grad_u = grad_h * a
        del a
        grad_g = act_backward_(ctx.kind, grad_h.mul_(u), g)  # act'(g) by ATen's own kernel, in place
        grad_x, *grads_g = _linear_backward(grad_g, x, gate, ctx.needs_input_grad[0], xa_g, s_g, c_g, read_g)
        grad_x_up, *grads_u = _linear_backward(grad_u, x, up, ctx.needs_input_grad[0], xa_u, s_u, c_u, read_u)
        if grad_x is not None:
            grad_x += grad_x_up
        # per layer: weight, bias, A, B, scale, dropout, magnitude
        per_layer = [(None, None, ga, gb, None, None, gm) for ga, gb, gm in (grads_g, grads_u, grads_d)]
        return (grad_x, None, None, *(t for layer in per_layer for t in layer))


@functools.cache  # asked at every layer call; an import that fails (bitsandbytes skipped: memory.skip_unused_imports)
def _lora_classes() -> tuple[type, ...]:  # costs ~20% of a LoRA run's speed when tried each time
    """PEFT's LoRA layer classes this path covers: over an nn.Linear (or CompactLinear), and over a bitsandbytes
    4-bit base (qlora), where bitsandbytes is installed (and imported by this process)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as Lora4bit
    except ImportError:  # no bitsandbytes: no 4-bit layer either
        return (LoraLinear,)
    return (LoraLinear, Lora4bit)


def _is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer in its standard layout (qlora's frozen base), told without importing
    bitsandbytes."""
    cls = type(module)
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes") and state is not None
            and not getattr(state, "packing_format_for_cpu", False))  # fmt: skip


def _frozen(base: nn.Module, x: torch.Tensor) -> _Parts | None:
    """A frozen base layer's weight and bias for an input `x`, or None when this path cannot run it on `x`."""
    if torch.is_autocast_enabled(x.device.type):
        return None
    if type(base) is CompactLinear:
        return _Parts(base.compact, base.bias, None, None, 1.0) if x.dtype == torch.float32 else None
    if _is_4bit(base):  # dequantized to the dtype it was quantized from; bitsandbytes would cast x to compute_dtype
        state = base.weight.quant_state
        if (
            x.dtype != state.dtype
            or x.dtype != base.compute_dtype
            or (base.bias is not None and base.bias.dtype != x.dtype)
        ):
            return None
        return _Parts(FourBitWeight(base.weight.data, state), base.bias, None, None, 1.0)
    if type(base) is not nn.Linear or base.weight.requires_grad or x.dtype != base.weight.dtype:
        return None
    return _Parts(base.weight, base.bias, None, None, 1.0)


def _parts(layer: nn.Module, x: torch.Tensor) -> _Parts | None:
    """The pieces of a frozen dense or 4-bit Linear, or of a PEFT LoRA layer over one that this path covers; else
    None."""
    if not isinstance(layer, _lora_classes()):
        return _frozen(layer, x)
    if _layer_reason(layer) is not None:
        return None
    name = layer.active_adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not adapter_fits(a.dtype, x.dtype) or a.dtype != b.dtype:
        return None
    magnitude = _magnitude(layer, name)
    # a magnitude trained to exactly 0 takes PEFT's forward: dm here divides by m (`_linear_backward`)
    if magnitude is not None and (not adapter_fits(magnitude.dtype, x.dtype) or not magnitude.detach().all()):
        return None
    base = _frozen(layer.base_layer, x)
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return None if base is None else base._replace(lora_a=a, lora_b=b, scale=layer.scaling[name], dropout=p,
                                                   magnitude=magnitude)  # fmt: skip


def _magnitude(layer, name: str) -> torch.Tensor | None:
    """DoRA's trained magnitude vector m of a layer's adapter `name`, or None for plain LoRA."""
    return layer.lora_magnitude_vector[name].weight if name in getattr(layer, "lora_variant", {}) else None


def _is_dora(variant) -> bool:
    from peft.tuners.lora.variants import DoraLinearVariant

    return type(variant) is DoraLinearVariant


def _layer_reason(layer) -> str | None:
    """Why a PEFT LoRA layer takes PEFT's own forward whatever its input, or None when it can take this path."""
    active = layer.active_adapters
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "the adapter is merged into the weight"
    if len(active) != 1 or active[0] not in layer.lora_A:
        return "several active adapters"
    name = active[0]
    drop = layer.lora_dropout[name]
    if name in getattr(layer, "lora_variant", {}) and not _is_dora(layer.lora_variant[name]):
        return f"a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    if type(drop) not in (nn.Identity, nn.Dropout):
        return f"a {type(drop).__name__} on the LoRA input"
    if type(layer.base_layer) not in (nn.Linear, CompactLinear) and not _is_4bit(layer.base_layer):
        return f"a {type(layer.base_layer).__name__} base layer"
    if getattr(layer, "fan_in_fan_out", False):
        return "a fan_in_fan_out (Conv1D-style) weight"
    return None


def _fast_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    p = None if args or kwargs else _parts(self, x)
    if p is None:
        return self._peft_forward(x, *args, **kwargs)
    return _LoRALinear.apply(x, *p)


def _fast_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    parts = [_parts(layer, x) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
    if not torch.is_grad_enabled() or any(p is None or p.bias is not None for p in parts):
        return self._plain_forward(x)
    return _SwiGLU.apply(x, self.tunelab_act, getattr(self, KEEP, None), *(t for p in parts for t in p))


def route(module: nn.Module, saved: str, forward) -> bool:
    """Give `module` `forward` as its forward, its own kept as `saved` (once: False when it was routed before)."""
    if hasattr(module, saved):
        return False
    setattr(module, saved, module.forward)
    module.forward = types.MethodType(forward, module)
    return True


def _lora_layers(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _lora_classes())]


def routes(model) -> bool:
    """Whether `enable` belongs on `model`: it has PEFT LoRA layers over Linear or 4-bit (qlora) bases."""
    return bool(_lora_layers(model))


def why_not(model) -> str | None:
    """Why every PEFT LoRA layer of `model` will run PEFT's own forward all the same (the first reason found), or
    None when some take the fast path."""
    reasons = [_layer_reason(m) for m in _lora_layers(model)]
    return None if not reasons or None in reasons else reasons[0]


def _routed(model) -> list[tuple[nn.Module, tuple[torch.Tensor, ...], torch.dtype]]:
    """(layer, its trained weights: A, B and DoRA's m, the dtype of the inputs it takes this path on) for each PEFT
    LoRA layer routed here (`enable`) that takes it whatever its input, given an input in that dtype."""
    found = []
    for m in _lora_layers(model):
        if not hasattr(m, "_peft_forward") or _layer_reason(m) is not None:
            continue
        base = m.base_layer
        if type(base) is CompactLinear:
            dtype = torch.float32
        elif _is_4bit(base):
            dtype = base.weight.quant_state.dtype if base.compute_dtype == base.weight.quant_state.dtype else None
        else:
            dtype = None if base.weight.requires_grad else base.weight.dtype
        name = m.active_adapters[0]
        a, b, magnitude = m.lora_A[name].weight, m.lora_B[name].weight, _magnitude(m, name)
        trained = (a, b) if magnitude is None else (a, b, magnitude)
        if dtype is not None and all(adapter_fits(t.dtype, dtype) for t in trained) and a.dtype == b.dtype:
            found.append((m, trained, dtype))
    return found


def dora_with_dropout(model) -> int:
    """How many DoRA layers routed here have LoRA dropout: each multiplies its frozen W by the input and by the
    dropped input (PEFT's DoRA), twice the big products of the same layer without dropout."""
    n = 0
    for m, _, _ in _routed(model):
        name = m.active_adapters[0]
        drop = m.lora_dropout[name]
        n += _magnitude(m, name) is not None and type(drop) is nn.Dropout and drop.p > 0
    return n


def covered_dropouts(model) -> list[nn.Module]:
    """The LoRA dropout modules of `model` whose masks this path draws (from `drawing_from`'s generator):
    those of PEFT LoRA layers routed here (`enable`) that take it whatever their input, given an input
    in their base's dtype that their adapter fits (`adapter_fits`)."""
    return [m.lora_dropout[m.active_adapters[0]] for m, *_ in _routed(model)]


def bf16_adapters(model) -> list[torch.Tensor]:
    """The A and B weights (and DoRA's m) of the PEFT LoRA layers routed here (`enable`) that take this path in a
    bf16 pass whatever their input: a frozen bf16 nn.Linear or 4-bit base (dequantized to bf16), an fp32 or bf16
    adapter."""
    return [t for _, trained, dtype in _routed(model) if dtype == torch.bfloat16 for t in trained]


def enable(model) -> int:
    """Route every PEFT LoRA layer of `model` (over Linear or 4-bit bases), and every SwiGLU MLP around them,
    through the fast path; returns how many LoRA layers."""
    lora = _lora_classes()
    n = 0
    for module in model.modules():
        if isinstance(module, lora):
            n += route(module, "_peft_forward", _fast_forward)
        elif is_swiglu(module):
            route(module, "_plain_forward", _fast_mlp_forward)
    return n
