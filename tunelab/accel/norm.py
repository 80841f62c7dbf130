"""RMSNorm for training as one autograd function: the same forward, a shorter backward, less kept.

Llama-style RMSNorm (`w * x / sqrt(mean(x^2) + eps)`: Llama, Qwen, Mistral, SmolLM; Gemma's `(1 + w)` form, its
product in fp32 before the narrowing, too: `offset`) is written in
transformers as five tensor operations, and autograd differentiates each: the backward pass is ten
elementwise passes over `[tokens, hidden]` and its temporaries, ~3 ms of a 0.2 ms forward for SmolLM2 at 512
tokens, 61 norms per forward. Here the forward runs the very same operations (bit-identical output),
keeps only `x` and `1/rms` (a `[tokens, 1]` vector), and the backward is the closed form

    x̂ = x r,   r = (mean(x²) + eps)^(-1/2),   g' = g w
    dx = r g' - x r³ mean(g' x)            dw = Σ_tokens g x̂

(four passes). Why by hand: PyTorch's `F.rms_norm` is the same composite of operations on a CPU.

In bf16 on a CPU those operations are still ~7 passes forward and ~9 backward, each widening to fp32 or narrowing
back (~2.3 ms forward and backward for 1,024 tokens of SmolLM2-360M's 960, ~5% of its LoRA step). There the rows run
as short C loops instead (SOURCE, compiled at first use: compiled.py), one pass a row forward (the sum of squares,
then the output with transformers' roundings) and one for dx, split among the threads: 0.7 ms. Their sums of
squares add in 16 lanes in a fixed order where torch's reduction has its own, so 1/rms can differ in its last bit,
and then an output element by one bf16 unit: 2-26 elements in a million (tests/test_norm.py); dx agrees to ~1e-5 of
its norm. Where nothing compiles, the torch operations run.

`install(model)` swaps the forward of every RMSNorm module whose own output it reproduces bit for bit
on a probe input (so variants such as Gemma's `(1 + w)` keep theirs); it is used while gradients
are on, in float32, or in bf16 with a bf16 weight (a bf16 pass, accel/switch.py, or bf16 weights that train
under autocast); otherwise the module's own forward runs. In bf16 it computes as transformers does, in fp32
between a widened input and an output narrowed before the weight's product (the compiled rows too, but for the
order of one sum); its backward runs in fp32 too and narrows dx once at the end.

`recomputed_outputs()` (the training loop's forward passes run in it): the layers after a norm save its output for
their backward pass (LoRA's dA needs its input), yet the norm keeps `x` and `1/rms` anyway, from which the output is
one elementwise pass, `w (x r)`, the same operations and so the same bits (the compiled rows rebuild it with their
own output function). Within the context a saved norm output is kept as that recipe and rebuilt when the backward
pass needs it: two `[tokens, hidden]` tensors per decoder layer less (SmolLM2: 67 MB per 512 tokens). An nn.Linear
saves its 3-D input as the flattened 2-D view its product takes; such a whole view is rebuilt too (`_Viewed`), so the
plain Linear layers of full fine-tuning (q, k, v after the first norm) keep no norm output either.

With `training.saved_activations: bf16` (swiglu.KEEP set on the module) an fp32 pass keeps `x` in bf16: the output
is computed from the fp32 x as before; the backward pass and the rebuilt output read x rounded to 8 bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import types
import weakref
from typing import NamedTuple

import torch
from torch import nn

from tunelab.accel import compiled
from tunelab.accel.swiglu import KEEP, narrowed

SOURCE = r"""  /* after compiled.BF16 */
#include <math.h>

#define LANES 16  /* sums in 16 lanes added in a fixed order: the same bits for any vector width */

static float dot(const uint16_t *a, const uint16_t *w, int offset, const uint16_t *x, int64_t n) {
    /* sum of (a w') x, w' = w (or 1 + w with offset; none when w is NULL: a x) */
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float aw = from_bf16(a[i + k]);
            if (w) aw *= offset ? 1.0f + from_bf16(w[i + k]) : from_bf16(w[i + k]);
            acc[k] += aw * from_bf16(x[i + k]);
        }
    for (; i < n; i++) {
        float aw = from_bf16(a[i]);
        if (w) aw *= offset ? 1.0f + from_bf16(w[i]) : from_bf16(w[i]);
        acc[i % LANES] += aw * from_bf16(x[i]);
    }
    float s = 0.0f;
    for (int k = 0; k < LANES; k++) s += acc[k];
    return s;
}

/* y = w (x r) with x r narrowed before the product (Llama), or (x r)(1 + w) narrowed after it (Gemma: offset) */
static void output_row(const uint16_t *x, const uint16_t *w, float r, uint16_t *y, int64_t n, int offset) {
    if (offset)
        for (int64_t j = 0; j < n; j++) y[j] = to_bf16((from_bf16(x[j]) * r) * (1.0f + from_bf16(w[j])));
    else
        for (int64_t j = 0; j < n; j++) y[j] = to_bf16(from_bf16(w[j]) * from_bf16(to_bf16(from_bf16(x[j]) * r)));
}

/* rows [start, stop) of x [rows, n]: r = (mean(x^2) + eps)^(-1/2) into rstd, the output into y */
void rms_forward(int64_t start, int64_t stop, const uint16_t *x, const uint16_t *w, uint16_t *y, float *rstd,
                 int64_t n, float eps, int64_t offset) {
    for (int64_t r = start; r < stop; r++) {
        const uint16_t *row = x + r * n;
        float rs = 1.0f / sqrtf(dot(row, NULL, 0, row, n) / (float)n + eps);
        rstd[r] = rs;
        output_row(row, w, rs, y + r * n, n, (int)offset);
    }
}

/* the output again from x and rstd (a recomputed norm output): output_row, so the forward's bits */
void rms_output(int64_t start, int64_t stop, const uint16_t *x, const uint16_t *w, const float *rstd, uint16_t *y,
                int64_t n, int64_t offset) {
    for (int64_t r = start; r < stop; r++) output_row(x + r * n, w, rstd[r], y + r * n, n, (int)offset);
}

/* dx = r g' - x r^3 mean(g' x), g' = g w (or g (1 + w)), in fp32, narrowed once */
void rms_dx(int64_t start, int64_t stop, const uint16_t *x, const uint16_t *w, const float *rstd, const uint16_t *g,
            uint16_t *dx, int64_t n, int64_t offset) {
    for (int64_t r = start; r < stop; r++) {
        const uint16_t *xr = x + r * n, *gr = g + r * n;
        uint16_t *out = dx + r * n;
        float rs = rstd[r];
        float coef = dot(gr, w, (int)offset, xr, n) * (rs * rs * rs) / (float)(-n);
        for (int64_t j = 0; j < n; j++) {
            float gw = from_bf16(gr[j]) * (offset ? 1.0f + from_bf16(w[j]) : from_bf16(w[j]));
            out[j] = to_bf16(gw * rs + from_bf16(xr[j]) * coef);
        }
    }
}
"""
_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "rms_forward": [_I, _I, _P, _P, _P, _P, _I, _F, _I],
    "rms_output": [_I, _I, _P, _P, _P, _P, _I, _I],
    "rms_dx": [_I, _I, _P, _P, _P, _P, _P, _I, _I],
}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False):
    """(output, 1/rms in fp32): transformers' LlamaRMSNorm (or with `offset` Gemma's) operation for operation, so
    bit-identical."""
    rstd = torch.rsqrt(_wide(x).pow(2).mean(-1, keepdim=True) + eps)
    return _output(x, weight, rstd, offset), rstd


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 if it is a half type (bf16, fp16), else t itself (fp32, and fp64 in the gradient checks)."""
    return t.float() if t.element_size() < 4 else t


def _output(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: bool = False) -> torch.Tensor:
    """w (x r), x r computed in fp32 and narrowed to x's dtype before the product, as transformers' Llama does; with
    `offset` (Gemma) (1 + w) (x r) all in fp32, narrowed after the product."""
    if offset:
        return ((_wide(x) * rstd) * (1.0 + _wide(weight))).to(x.dtype)
    return weight * (_wide(x) * rstd).to(x.dtype)


def compiled_rows():
    """The compiled rows (SOURCE), built at first use; None where they cannot be (`compiled.why_not('rms_norm')`)."""
    return compiled.load("rms_norm", compiled.BF16 + SOURCE, SIGNATURES)


def _rows(x: torch.Tensor, weight: torch.Tensor):
    """The compiled rows where x and the weight are bf16 on a CPU and they are built, else None."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    return compiled_rows() if weight.is_contiguous() else None


def _run(fn, x: torch.Tensor, *pointers_and_args) -> None:
    """fn over x's rows, split among the threads."""
    n = x.shape[-1]
    compiled.run(fn, x.numel() // n, *pointers_and_args, threads=torch.get_num_threads(), per=n)


def _forward(x, weight, eps, offset):
    """(output, 1/rms, whether compiled): the compiled rows on bf16 (one pass a row where torch takes seven), else
    `_rms_norm`."""
    rows = _rows(x, weight)
    if rows is None:
        return *_rms_norm(x, weight, eps, offset), False
    x = x.contiguous()
    y, rstd = torch.empty_like(x), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)
    _run(rows.rms_forward, x, x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), x.shape[-1], eps,
         int(offset))  # fmt: skip
    return y, rstd, True


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, keep=None):
        y, rstd, rows = _forward(x, weight, eps, offset)
        kept = narrowed(x, keep)  # training.saved_activations (module doc)
        ctx.save_for_backward(kept, weight, rstd)
        ctx.offset, ctx.rows, ctx.dtype = offset, rows, x.dtype
        outputs = getattr(_RECOMPUTABLE, "outputs", None)
        if outputs is not None:
            outputs[y.data_ptr()] = (weakref.ref(y), _Recipe(kept, weight, rstd, offset, rows, x.dtype))
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x = x.to(ctx.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:  # d(1 + w) = dw: the same sum with an offset
            grad_w = (grad * x * rstd).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None, None, None
        if ctx.rows:
            x, grad = x.contiguous(), grad.contiguous()
            dx = torch.empty_like(x)
            _run(_rows(x, weight).rms_dx, x, x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(),
                 dx.data_ptr(), x.shape[-1], int(ctx.offset))  # fmt: skip
            return dx, grad_w, None, None, None
        wide = _wide(x)  # a bf16 pass computes its gradient in fp32 (module doc)
        gw = _wide(grad) * (1.0 + _wide(weight) if ctx.offset else weight)
        coef = torch.linalg.vecdot(gw, wide).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return torch.addcmul(gw.mul_(rstd), wide, coef).to(x.dtype), grad_w, None, None, None


# per thread, while recomputed_outputs() is active: data_ptr of a norm output -> (weak ref to it, recipe)
_RECOMPUTABLE = threading.local()


class _Recipe:
    """A norm output as w (x r) from tensors the norm keeps anyway; rebuilt once, shared by its users."""

    __slots__ = ("x", "weight", "rstd", "offset", "rows", "dtype", "y")

    def __init__(self, x, weight, rstd, offset, rows, dtype=None):  # dtype: the pass's, where x is kept narrower
        self.x, self.weight, self.rstd, self.offset, self.rows = x, weight, rstd, offset, rows
        self.dtype = dtype or x.dtype
        self.y = None

    def value(self) -> torch.Tensor:
        if self.y is None and self.rows:  # the forward's own output function: the same bits
            x = self.x.contiguous()
            self.y = torch.empty_like(x)
            _run(_rows(x, self.weight).rms_output, x, x.data_ptr(), self.weight.data_ptr(), self.rstd.data_ptr(),
                 self.y.data_ptr(), x.shape[-1], int(self.offset))  # fmt: skip
        elif self.y is None:  # _rms_norm's operations: the same bits (from a narrower kept x: x as kept)
            self.y = _output(self.x.to(self.dtype), self.weight, self.rstd, self.offset)
        return self.y


def _pack(t: torch.Tensor):
    outputs = _RECOMPUTABLE.outputs
    entry = outputs.get(t.data_ptr()) if outputs else None
    if entry is None:
        return t
    y, recipe = entry[0](), entry[1]
    if y is t:  # the very tensor the norm returned (a later tensor at a reused address is another object)
        return recipe
    # a whole view of it: an nn.Linear's product saves its 3-D input flattened to the 2-D matrix it multiplies
    if y is not None and t._base is y and t.numel() == y.numel() and t.is_contiguous() and y.is_contiguous():
        return _Viewed(recipe, t.shape)
    return t


class _Viewed(NamedTuple):
    recipe: _Recipe
    shape: torch.Size


def _unpack(saved):
    if isinstance(saved, _Recipe):
        return saved.value()
    return saved.recipe.value().view(saved.shape) if isinstance(saved, _Viewed) else saved


@contextlib.contextmanager
def recomputed_outputs():
    """Within it, a saved output of a `_RMSNorm` is kept as the recipe that rebuilds it (module docstring)."""
    if getattr(_RECOMPUTABLE, "outputs", None) is not None:  # nested: the outer one is in place
        yield
        return
    _RECOMPUTABLE.outputs = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECOMPUTABLE.outputs = None


def _fast_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not _covered(x, self.weight):
        return self._plain_forward(x)
    return _RMSNorm.apply(x, self.weight, *self.tunelab_norm, getattr(self, KEEP, None))


def _covered(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32, or bf16 x and weight: a bf16 pass, or bf16 weights that train under autocast (full fine-tuning with
    `training.master_weights: bf16`), where autocast changes none of the norm's operations, so the output is the
    module's own bit for bit (tested). An fp32 master weight beside a bf16 x takes the module's own forward."""
    return x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)


def _reproduces(module: nn.Module) -> tuple[float, bool] | None:
    """(eps, offset) with which `_RMSNorm` gives this module's own output bit for bit on a probe input: Llama's
    formula (offset False) or Gemma's `(1 + w)` in fp32 (True); None for neither."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or not isinstance(eps, float) or weight.is_meta:
        return None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, weight.shape[0], generator=g) * 3).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            own = module(x)
            return next(((eps, o) for o in (False, True) if torch.equal(own, _rms_norm(x, weight, eps, o)[0])), None)
    except Exception:  # a different signature or formula: not this path
        return None


def install(model) -> int:
    """Route the model's Llama-style (and Gemma-style) RMSNorm modules through `_RMSNorm`; returns how many."""
    n = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or hasattr(module, "_plain_forward"):
            continue
        if found := _reproduces(module):
            module.tunelab_norm = found
            module._plain_forward = module.forward
            module.forward = types.MethodType(_fast_forward, module)
            n += 1
    return n
