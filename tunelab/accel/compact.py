"""Frozen fp32 weights kept in the compact form their values came from, decoded exactly when used.

A model read from a GGUF file reaches tunelab as fp32, yet its values are not arbitrary floats: a
Q4_1 / Q8_0 tensor holds, in every block of 32 weights, at most 16 (256) values `m + d q` with one
offset `m` and one step `d` per block. The default model, SmolLM2-135M-Instruct.Q4_1, is such a
file: its 210 linear weights are 425 MB as fp32 and 133 MB as one byte per weight plus a step and
an offset per block. Likewise a hub checkpoint stored in bf16 and loaded as fp32 has values that
bf16 holds exactly. For a frozen base (LoRA), keeping those bytes and decoding each weight when a
matmul needs it gives the very same fp32 numbers, so training is bit-identical, for ~300 MB less
memory on SmolLM2 and one elementwise pass per weight use.

Nothing is assumed: `encode` finds a block step and offset and keeps them only if decoding gives
back every value bit for bit; a weight that does not decode exactly stays as it is.

Why by hand: bitsandbytes and torchao quantize (lossy, NF4 / int8 / int4) and compute in their own
kernels; none stores an already-quantized fp32 tensor losslessly and hands back the exact fp32
weight for an fp32 matmul.
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.accel import compiled

BLOCK = 32
ROWS_AT_ONCE = 4096  # a weight with more rows (an LM head: 49k) is encoded and decoded this many rows at a time


class CompactWeight:
    """An fp32 weight as (codes, step, offset): w = offset + step * codes per block of BLOCK, or as bf16."""

    def __init__(
        self, shape, codes: torch.Tensor, step: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ):
        self.shape, self.codes, self.step, self.offset = torch.Size(shape), codes, step, offset

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.step, self.offset) if t is not None)

    def dense(self, scratch: bool = False) -> torch.Tensor:
        """The fp32 weight, decoded into a new tensor, or (scratch=True) into this thread's reused buffer,
        valid until the next scratch request in the thread: for a weight used once, at once."""
        if scratch:
            return self.block(0, self.shape[0])
        return self._decode_rows(0, self.shape[0], torch.empty(self.shape, device=self.codes.device))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The rows `index` (any shape) of the fp32 weight, decoded: an embedding lookup."""
        flat = index.reshape(-1)
        if self.step is None:
            out = self.codes[flat].float()
        else:
            per = self.shape[1] // BLOCK  # a row is `per` blocks
            codes = self.codes.view(self.shape[0], per, BLOCK)[flat]
            step, offset = (t.view(self.shape[0], per, 1)[flat] for t in (self.step, self.offset))
            out = _decode(codes, step, offset, torch.empty(codes.shape, device=codes.device))
        return out.view(*index.shape, self.shape[1])

    def block(self, start: int, end: int) -> torch.Tensor:
        """Rows start..end of the fp32 weight, decoded into this thread's reused buffer, valid until the next
        scratch request in the thread: a product with a weight too large to decode whole at once."""
        return self._decode_rows(start, end, scratch(torch.Size([end - start, self.shape[1]]), self.codes.device))

    def _decode_rows(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        if self.step is None:
            return out.copy_(self.codes[start:end])
        per = self.shape[1] // BLOCK  # a row is `per` blocks
        at = slice(start * per, end * per)
        return _decode(self.codes[at], self.step[at], self.offset[at], out.view(-1, BLOCK)).view(out.shape)

    def to(self, device) -> CompactWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return CompactWeight(self.shape, move(self.codes), move(self.step), move(self.offset))


def _decode(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """offset + step * codes, per block. step * code is exact (a code has at most 8 bits, a GGUF step
    11), so this rounds once, like the GGUF decoder. On a CPU one compiled pass (`DECODE`) where it builds, else
    three fast PyTorch passes (4x quicker than one type-promoting addcmul); the same bits either way."""
    if out.device.type == "cpu" and codes.dtype == torch.uint8 and (fn := _decoder()) is not None:
        codes, step, offset = codes.contiguous(), step.contiguous(), offset.contiguous()
        if out.is_contiguous() and step.numel() * BLOCK == codes.numel() == out.numel():
            compiled.run(fn, step.numel(), codes.data_ptr(), step.data_ptr(), offset.data_ptr(), out.data_ptr(),
                         threads=torch.get_num_threads(), per=BLOCK)  # fmt: skip
            return out
    return out.copy_(codes).mul_(step).add_(offset)


# The decode as one pass: the three PyTorch passes each write the whole fp32 weight (a SwiGLU weight of SmolLM2 is
# 3.5 MB, past a core's L2), ~0.41 ms for 1,536 x 576 on this AVX2 host against ~0.1 here; every frozen weight is
# decoded twice a pass (forward and backward), per thread share. Code times step is exact and -ffp-contract=off
# (compiled.FLAGS) keeps the add a rounding of its own: the bits of the PyTorch passes.
DECODE = r"""
#include <stdint.h>
void decode(int64_t start, int64_t stop, const uint8_t *codes, const float *step, const float *offset, float *out) {
    for (int64_t b = start; b < stop; b++) {
        const uint8_t *c = codes + b * 32;
        float *o = out + b * 32;
        const float s = step[b], m = offset[b];
        for (int i = 0; i < 32; i++) o[i] = (float)c[i] * s + m;
    }
}
"""


def _decoder():
    """The compiled decode (a ctypes function), or None where it does not build (the PyTorch passes run)."""
    lib = compiled.load("compact_decode", DECODE, {"decode": [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 4})
    return None if lib is None else lib.decode


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(shape, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A view of `shape` into the one reused buffer of this (device, dtype, thread), as large as the largest shape
    asked for: valid until the next scratch request in this thread (every caller uses it for one matmul
    at once). Why: a decoded weight lives for one matmul; a fresh multi-MB tensor per use is mapped and
    faulted in anew, or leaves holes in malloc's heap between the activations a pass keeps. One buffer
    rather than one per shape: SmolLM2's five shapes held 18 MB a thread, the largest alone 9 MB. Also the
    attention products' probabilities (attention_backward.py, bf16). All are dropped by free_scratch (Speed.release)."""
    key = (device, dtype, threading.get_ident())
    buf = _SCRATCH.get(key)
    n = math.prod(shape)
    if buf is None or buf.numel() < n:
        _SCRATCH.pop(key, None)  # the smaller one goes before the larger is made
        buf = _SCRATCH[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def free_scratch() -> None:
    _SCRATCH.clear()


def encode(weight: torch.Tensor, max_tries: int = 15) -> CompactWeight | None:
    """The compact form that decodes to exactly `weight` (fp32), or None when there is none smaller."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2:
        return None
    if len(w) > ROWS_AT_ONCE:  # rows at a time: the search's temporaries are weight-sized (a 49k-word table)
        parts = [_encode(w[i : i + ROWS_AT_ONCE], max_tries) for i in range(0, len(w), ROWS_AT_ONCE)]
        if any(p is None for p in parts) or len({p.step is None for p in parts}) > 1:
            return None
        fields = [[getattr(p, k) for p in parts] for k in ("codes", "step", "offset")]
        return CompactWeight(w.shape, *(None if f[0] is None else torch.cat(f) for f in fields))
    return _encode(w, max_tries)


def _encode(w: torch.Tensor, max_tries: int) -> CompactWeight | None:
    half = w.to(torch.bfloat16)
    if torch.equal(half.float(), w):
        return CompactWeight(w.shape, half)
    if w.shape[1] % BLOCK:
        return None
    v = w.reshape(-1, BLOCK)
    offset = v.amin(1, keepdim=True)
    diff = v - offset
    # the smallest gap above the block minimum is the step, or a multiple of it when code 1 is unused
    gap = torch.where(diff > 0, diff, torch.full_like(diff, float("inf"))).amin(1, keepdim=True)
    gap = torch.where(torch.isinf(gap), torch.ones_like(gap), gap)  # a constant block: any step
    step = torch.empty_like(gap)
    codes = torch.empty(v.shape, dtype=torch.uint8, device=w.device)
    todo = torch.arange(v.shape[0], device=w.device)
    top = diff.amax(1, keepdim=True)
    # candidate steps, cheapest first: range / 15 (a 4-bit block using its top code, most Q4_1 blocks),
    # the smallest gap / k for a small k, then the gcd of the gaps (sparse 8-bit codes)
    candidates = [lambda i: torch.where(top[i] > 0, top[i] / 15, gap[i])]
    # symmetric blocks w = d q (GGUF Q8_0 / Q4_0 / Q5_0: d = the largest |w| over 127 / 8 / 16): the step
    # from the block's largest magnitude; the 49k-word Q8_0 table of the default model in 0.6 s, not 3 s
    big = v.abs().amax(1, keepdim=True)
    candidates += [lambda i, k=k: torch.where(big[i] > 0, big[i] / k, gap[i]) for k in (127, 8, 16)]
    candidates += [lambda i, k=k: gap[i] / k for k in range(1, max_tries + 1)]
    candidates.append(lambda i: _gcd(diff[i]))
    for candidate in candidates:
        s = candidate(todo)
        q = torch.round(diff[todo] / s)
        ok = (q <= 255).all(1) & torch.eq(_decode(q, s, offset[todo], torch.empty_like(q)), v[todo]).all(1)
        done = todo[ok]
        step[done], codes[done] = s[ok], q[ok].to(torch.uint8)
        todo = todo[~ok]
        if todo.numel() == 0:
            return CompactWeight(w.shape, codes, step, offset)
    return None


def _gcd(x: torch.Tensor) -> torch.Tensor:
    """Per row, the largest step of which every entry of x (>= 0) is a whole multiple: Euclid with fmod,
    which is exact in floating point, reducing the columns pairwise."""
    while x.shape[1] > 1:
        if x.shape[1] % 2:
            x = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        a, b = x[:, 0::2].clone(), x[:, 1::2].clone()
        for _ in range(64):  # 8-bit codes: Euclid ends within a dozen rounds
            live = b > 0
            if not live.any():
                break
            a, b = torch.where(live, b, a), torch.where(live, torch.fmod(a, torch.where(live, b, 1.0)), 0.0)
        x = a
    return torch.where(x > 0, x, torch.ones_like(x))


def blocks(weight: CompactWeight):
    """(start, end, decoded rows) over `weight`: whole if small, else ROWS_AT_ONCE rows at a time, so that
    no fp32 copy of a vocabulary-sized weight is ever made (SmolLM2's head: 113 MB)."""
    rows = weight.shape[0]
    if rows <= ROWS_AT_ONCE:
        yield 0, rows, weight.dense(scratch=True)
        return
    for start in range(0, rows, ROWS_AT_ONCE):
        end = min(start + ROWS_AT_ONCE, rows)
        yield start, end, weight.block(start, end)


def weight_times(weight, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """W m into `out`, W a tensor or a CompactWeight (decoded a block of rows at a time)."""
    if not isinstance(weight, CompactWeight):
        return torch.mm(weight, m, out=out)
    for start, end, w in blocks(weight):
        torch.mm(w, m, out=out[start:end])
    return out


def times_weight(m: torch.Tensor, weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """m W (into `out` if given), W a tensor or a CompactWeight (its row blocks' products summed)."""
    if not isinstance(weight, CompactWeight):
        return torch.mm(m, weight, out=out) if out is not None else m @ weight
    for start, end, w in blocks(weight):
        if start == 0:
            out = torch.mm(m[:, :end], w, out=out) if out is not None else m[:, :end] @ w
        else:
            out.addmm_(m[:, start:end], w)
    return out


class _Decoded(torch.autograd.Function):
    """x W^T + b for a frozen compact W: decoded in the forward pass and again in the backward pass,
    so no fp32 copy of W is kept in between."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        if weight.shape[0] <= ROWS_AT_ONCE:
            return F.linear(x, weight.dense(scratch=True), bias)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2.new_empty(len(x2), weight.shape[0])
        for start, end, w in blocks(weight):
            out[:, start:end] = x2 @ w.t()
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        grad_x = times_weight(grad.reshape(-1, grad.shape[-1]), ctx.weight)
        return grad_x.view(*grad.shape[:-1], -1), None, None


class _Compact(nn.Module):
    """A frozen module whose weight is the CompactWeight `self.compact`. `.weight` decodes a fresh fp32 copy
    (read only: writing into it changes nothing, so merge adapters into a model loaded from disk)."""

    compact: CompactWeight

    @property
    def weight(self) -> torch.Tensor:
        return self.compact.dense()

    def _apply(self, fn, recurse=True):  # .to(device) moves the codes; a dtype cast is refused
        probe = fn(torch.zeros((), dtype=torch.float32, device=self.compact.codes.device))
        if probe.dtype != torch.float32:
            raise TypeError("a compacted model is fp32: cast the model before compact_frozen_linears")
        self.compact = self.compact.to(probe.device)
        return super()._apply(fn, recurse)


class CompactLinear(_Compact, nn.Linear):
    """A frozen nn.Linear whose weight is a CompactWeight. An nn.Linear to PEFT (`isinstance`), so a layer made
    compact while the model loads (`load_plan`) gets its LoRA layer as a dense one would: PEFT reads `.weight`
    (a fresh decode) only for its device and dtype."""

    def __init__(self, linear: nn.Linear, weight: CompactWeight):
        nn.Module.__init__(self)  # not nn.Linear's: it would make the dense weight this class exists to avoid
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compact = weight
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # e.g. under autocast: the plain path on the decoded weight
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return _Decoded.apply(x, self.bias, self.compact)

    def extra_repr(self) -> str:
        kind = "bf16" if self.compact.step is None else f"{BLOCK}-blocks of 8-bit codes"
        return f"in_features={self.in_features}, out_features={self.out_features}, exact {kind}"


class CompactEmbedding(_Compact):
    """A frozen nn.Embedding whose table is a CompactWeight: a lookup decodes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, weight: CompactWeight):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.compact = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.compact.rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, exact compact"


def compact_frozen_linears(model, only: list[str] | None = None) -> tuple[int, int]:
    """Replace every frozen fp32 nn.Linear under a PEFT LoRA layer (its base layer) whose weight has an
    exact compact form by a CompactLinear, and then the frozen token table (with a head tied to it); in a
    prompt- or prefix-tuned model, every frozen linear layer of the body (`soft_prompt_body`).
    `only`: compact just the modules with one of these names in their dotted path (`down_proj`, `mlp`,
    `embed_tokens`; `lm_head` names a tied table too): less memory saved, fewer decodes per step.
    A base made compact while the model loaded (`load_plan`) counts as compacted here; one that no LoRA layer
    wraps gets its dense weight back. Returns (weights compacted, a tied table and head counting once; bytes
    saved)."""
    from peft.tuners.lora.layer import LoraLayer

    if only is not None:
        _check_names(model, only)
    n = saved = 0
    lora = False  # a LoRA model with a frozen base: its token table is frozen weight too
    wrapped = set()
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None) if isinstance(module, LoraLayer) else None
        if type(base) is CompactLinear:  # made compact while loading (load_plan)
            lora = True
            wrapped.add(id(base))
            n, saved = n + 1, saved + base.compact.shape.numel() * 4 - base.compact.nbytes
            continue
        if type(base) is not nn.Linear or base.weight.requires_grad:
            continue
        lora = True
        compact = encode(base.weight) if _named(name, only) else None
        if compact is None:
            continue
        saved += base.weight.numel() * 4 - compact.nbytes
        module.base_layer = CompactLinear(base, compact)
        wrapped.add(id(module.base_layer))
        n += 1
    _expand_unwrapped(model, wrapped)
    table = _compact_embeddings(model, only) if lora else 0
    n, saved = n + (table > 0), saved + table
    body = soft_prompt_body(model, only) if not lora else (0, 0)
    n, saved = n + body[0], saved + body[1]
    if saved:
        _own_storage(model)
    return n, saved


def soft_prompt_body(model, only: list[str] | None = None) -> tuple[int, int]:
    """In a prompt- or prefix-tuned model, every frozen fp32 nn.Linear of the body but the output head made a
    CompactLinear (their weights are read by their own forward only; the MLPs around them must run fast_lora's
    SwiGLU function, which decodes a compact weight where used, not swiglu.py's, which would keep each decoded
    weight for the backward pass). The token table stays: PEFT keeps a reference of its own to it for the virtual
    tokens. Returns (weights compacted, bytes saved)."""
    from tunelab.models.loading import soft_prompt, unwrap

    if soft_prompt(model) is None:
        return 0, 0
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return _compact_linears(inner, head, only)


def frozen_model(model, only: list[str] | None = None) -> tuple[int, int]:
    """A model that only ever runs without gradients (dpo / kto's frozen reference copy, methods/reference.py): its
    token table (with a head tied to it) and every frozen fp32 nn.Linear, an untied head too, made compact. Its
    passes decode each weight where used and keep nothing for a backward pass, so it holds ~1 byte a weight (GGUF
    8-bit blocks) or 2 (bf16 values) instead of 4. Returns (weights compacted, bytes saved)."""
    from tunelab.models.loading import unwrap

    inner = unwrap(model)
    table = _compact_embeddings(inner, only)
    n, saved = _compact_linears(inner, None, only)
    return n + (table > 0), saved + table


def _compact_linears(inner, head, only: list[str] | None) -> tuple[int, int]:
    """Every frozen fp32 nn.Linear of `inner` but `head` made a CompactLinear where it has an exact compact form."""
    n = saved = 0
    for name, module in list(inner.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child is head or child.weight.requires_grad:
                continue
            if child.weight.dtype != torch.float32 or not _named(f"{name}.{child_name}", only):
                continue
            compact = encode(child.weight)
            if compact is None:
                continue
            setattr(module, child_name, _with_hooks(CompactLinear(child, compact), child))
            n, saved = n + 1, saved + child.weight.numel() * 4 - compact.nbytes
    return n, saved


def load_plan(only: list[str] | None = None, counted: list | None = None):
    """A plan for models/streaming.py: every linear layer but the output head made a CompactLinear as soon as
    its weights are read, so the frozen base of a LoRA run never exists whole in fp32 (a bf16 checkpoint's
    1.7B model: 3.2 GB of bf16 instead of 6.4 GB of fp32, the same numbers). A layer without an exact compact
    form stays as it is. Which layers PEFT then wraps is PEFT's choice (target_modules): the compact layers it
    leaves get their dense weight back in `compact_frozen_linears`, so the model trains as load-then-compact
    does. `only`: training.compact_frozen's names. `counted`: receives each compacted weight's element count
    (they are no parameters: the run's parameter total adds them)."""

    def convert(linear: nn.Linear) -> nn.Module:
        compact = encode(linear.weight.detach())
        if compact is None:
            return linear
        if counted is not None:
            counted.append(linear.weight.numel())
        return CompactLinear(linear, compact)

    def plan(model) -> dict:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head and _named(n, only)]
        return dict.fromkeys(names, convert)

    return plan


def _expand_unwrapped(model, wrapped: set[int]) -> None:
    """Give a CompactLinear made at load that no LoRA layer wrapped (target_modules left it) its dense weight:
    only a LoRA base is compacted (a frozen layer elsewhere may be a head that is read as a whole)."""
    from tunelab.models.loading import unwrap

    inner = unwrap(model)
    tied = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is CompactLinear and id(module) not in wrapped and module is not tied:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _dense_linear(module))


def _dense_linear(module: CompactLinear) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.compact.dense(), requires_grad=False)
    linear.bias = module.bias
    return linear


def _check_names(model, only: list[str]) -> None:
    """A name that no module of `model` has is a typo: say so, with the names there are."""
    parts = {p for name, _ in model.named_modules() for p in name.split(".")}
    unknown = [p for p in only if p not in parts]
    if unknown:
        from peft.tuners.lora.layer import LoraLayer

        names = {p for name, m in model.named_modules() if isinstance(m, LoraLayer) for p in name.split(".")[-2:]}
        names |= {"embed_tokens", "lm_head"} & parts
        raise ValueError(
            f"training.compact_frozen: no module named {', '.join(map(repr, unknown))} in this model; "
            f"names of its frozen weights' modules: {', '.join(sorted(n for n in names if not n.isdigit()))}"
        )


def _named(path: str, only: list[str] | None) -> bool:
    """Whether the module at dotted `path` is one `only` names (None: every module)."""
    return only is None or any(p in path.split(".") for p in only)


def _with_hooks(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` in `old`'s place keeps the hooks registered on it (e.g. transformers' enable_input_require_grads)."""
    new._forward_hooks.update(old._forward_hooks)
    new._forward_pre_hooks.update(old._forward_pre_hooks)
    return new


def _compact_embeddings(model, only: list[str] | None = None) -> int:
    """Compact a frozen token embedding and an output head that shares its weight (tied, SmolLM2 / Llama
    3.2 / Qwen2.5 small models) if `only` names either; bytes saved. The head then computes its logits
    block by block."""
    from tunelab.models.loading import unwrap

    inner = unwrap(model)
    try:
        (emb, set_emb), (head, set_head) = _tables(inner)
    except (AttributeError, NotImplementedError):
        return 0
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.max_norm is not None:
        return 0
    tied = type(head) is nn.Linear and head.weight is emb.weight and head.bias is None
    if head is not None and not tied and head.weight is emb.weight:
        return 0
    if only is not None:
        names = {id(m): name for name, m in inner.named_modules()}
        if not any(_named(names.get(id(m), ""), only) for m in (emb, head) if m is not None):
            return 0
    compact = encode(emb.weight)
    if compact is None:
        return 0
    set_emb(_with_hooks(CompactEmbedding(emb, compact), emb))
    if tied:
        set_head(_with_hooks(CompactLinear(head, compact), head))
    return emb.weight.numel() * 4 - compact.nbytes


def _tables(inner):
    """((the token table, what puts another in its place), (the output head or None, likewise)): the model's own, or,
    where PEFT trains new tokens' rows beside them (model.new_special_tokens: its trainable-token layers), the frozen
    table and head inside those layers (accel/token_rows.py reads them there)."""

    def inside(module, put):
        layer = getattr(module, "token_adapter", None)
        if layer is not None and hasattr(layer, "base_layer"):
            return layer.base_layer, lambda new: setattr(layer, "base_layer", new)
        return module, put

    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return (inside(inner.get_input_embeddings(), inner.set_input_embeddings),
            inside(head, inner.set_output_embeddings) if head is not None else (None, None))  # fmt: skip


def expand_compact(model) -> int:
    """Give every CompactLinear of `model` its dense fp32 weight back (a frozen nn.Linear), and a compact
    embedding (and the head tied to it) theirs; returns how many layers. For after training: generation
    decodes every weight at every token, which a dense weight does not."""
    from tunelab.models.loading import unwrap

    n = 0
    inner = unwrap(model)
    (emb, set_emb), (head, set_head) = _tables(inner) if hasattr(inner, "get_input_embeddings") else ((None,) * 2,) * 2
    if type(emb) is CompactEmbedding:
        table = nn.Embedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        table.weight = nn.Parameter(emb.compact.dense(), requires_grad=False)
        set_emb(table)
        if type(head) is CompactLinear and head.compact is emb.compact:  # tied again: one tensor
            linear = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
            linear.weight = table.weight
            set_head(linear)
        n += 1
    for module in list(model.modules()):  # LoRA's base layers, a soft-prompt model's body
        for name, child in list(module.named_children()):
            if type(child) is CompactLinear:
                setattr(module, name, _with_hooks(_dense_linear(child), child))
                n += 1
    return n


def _own_storage(model) -> None:
    """Copy the frozen CPU tensors left (embeddings, norms) out of the file they were loaded from.

    transformers maps a safetensors file into memory and every weight is a view of that one mapping,
    so the pages of the weights just compacted stay resident until no view of the file is left."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and not t.requires_grad:
            t.data = t.data.clone()
