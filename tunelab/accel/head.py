"""The LM head and its cross-entropy in one pass for training: the gradient made in the forward, no logits kept.

The plain loss (models/loss.py) already applies the head at label positions only, in chunks; autograd
then keeps every chunk's [chunk, vocab] logits (or their log-softmax) until the backward pass: ~150 MB
for one SmolLM2 batch of 4 x 256, the largest single activation. `install(model)` plugs
`fused_loss` into that loss (models/loss.py: FUSED_HEAD) for a model trained with `training.accelerate:
auto`; the loss calls it while gradients are on.

In a bf16 pass (bf16 head and hidden states, no autocast) the two products run in bf16 and everything
between them in fp32: each chunk's bf16 logits are widened into an fp32 buffer for the log-sum-exp and the
softmax, as transformers upcasts logits before its cross-entropy, and the gradient is narrowed back into the
bf16 buffer for its product. A softmax in bf16 would round each of the loss's terms to 8 bits.

Under a CPU's bf16 autocast (full fine-tuning in bf16 keeps fp32 master weights, so its passes keep autocast) the
hidden states and the head's weight are cast to bf16 for the same bf16 products, as autocast casts them for the
plain loss, and dW is summed in fp32, chunk by chunk, as autograd sums it into the master weight's gradient.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from tunelab.accel import token_rows
from tunelab.accel.compact import CompactLinear, times_weight, weight_times
from tunelab.accel.memory import shape_bucket
from tunelab.models import loss
from tunelab.models.loading import unwrap

# label positions per chunk of logits. Each chunk decodes a compact head once per product, so fewer chunks are
# faster: 128 made the head ~30% slower on a CPU core (380 label positions: 1.15 s vs 0.85). 192 takes as many
# chunks as 256 for 257-384 label positions (a 2-row pass of SmolLM2 SFT holds ~360), one more for 193-256
# (some 1-row passes), and keeps each thread's logits buffer at 36 MB instead of 48
FUSED_CHUNK = 192
# a bf16 pass's logits are widened to fp32 for the softmax this many columns at a time: the fp32 buffer a thread
# keeps is 6 MB for SmolLM2's vocabulary instead of a whole chunk's 38 MB (two threads: 63 MB of the QLoRA bench's
# peak), and the head is no slower (103-106 ms against 104-115 for 384 labels on a core; 16 columns: 186 ms)
WIDE_CHUNK = 32
# label positions per chunk where the logits are bf16 from a plain weight on a CPU and the weight takes no
# gradient (LoRA, QLoRA, prompt and prefix tuning in bf16): no block is decoded per chunk, and each thread's bf16
# buffer is 6 MB instead of 18 (the QLoRA bench's peak 1,231 -> 1,199 MB). Each chunk streams the head's weight
# twice, so the head alone is slower (160 against 122 ms for 384 labels on a core), ~2% of a step; where dW is
# summed (full fine-tuning), a chunk's [vocab, hidden] product costs more and FUSED_CHUNK stays
BF16_CHUNK = 64

# One [chunk, vocab] logits buffer per CPU dtype and thread (the shares of a pass may run in
# threads: accel/threads.py), reused by every training pass. A fresh block of tens of MB can be above
# glibc's mmap threshold, so each pass would map it anew and take a page fault per 4 KiB while writing
# it: the head's matmul ran at half speed (61 GFLOP/s against 115, SmolLM2 LoRA SFT).
# GPU allocators cache blocks themselves; there the buffer is not kept.
_LOGITS: dict[tuple[torch.dtype, int], torch.Tensor] = {}


def install(model) -> None:
    """Let the training loss of `model` take the fused head (models/loss.py reads the attribute)."""
    setattr(unwrap(model), loss.FUSED_HEAD, fused_loss)


def fused_loss(head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """sum CE(head(hidden), target), its gradient computed in the forward pass; None where the head is not a
    bias-free linear map in the hidden states' dtype (then the plain chunks run). A head PEFT trains new tokens' rows
    of (accel/token_rows.py) is taken as its frozen map and those rows. Under a CPU's bf16 autocast
    (full fine-tuning in bf16: fp32 master weights) the products run in bf16 as autocast would run them."""
    device = hidden.device.type
    rows = ()
    if (found := token_rows.head_rows(head)) is not None:  # new tokens' rows trained beside a frozen head
        head, rows = found
    if type(head) not in (torch.nn.Linear, CompactLinear) or head.bias is not None:
        return None
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
        if device != "cpu" or type(head) is CompactLinear or compute != torch.bfloat16 or rows:
            return None
        return _HeadCrossEntropy.apply(hidden, head.weight, target, compute)
    if hidden.dtype != (torch.float32 if type(head) is CompactLinear else head.weight.dtype):
        return None
    weight = head.compact if type(head) is CompactLinear else head.weight
    return _HeadCrossEntropy.apply(hidden, weight, target, None, *rows)


def _logits_buffer(vocab: int, rows: int, like: torch.Tensor, dtype: torch.dtype | None = None, least: int = 0):
    """A [vocab, rows] buffer in `dtype` (default: like's): the logits transposed (see _HeadCrossEntropy), made for
    `least` columns (a chunk's) or more."""
    dtype = dtype or like.dtype
    if like.device.type != "cpu":
        return like.new_empty(vocab, rows, dtype=dtype)
    key = (dtype, threading.get_ident())
    buf = _LOGITS.get(key)
    if buf is None or buf.numel() < rows * vocab:
        _LOGITS[key] = buf = like.new_empty(max(rows, least) * vocab, dtype=dtype)
    return buf[: rows * vocab].view(vocab, rows)


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """The logits in fp32: themselves, or copied into this thread's fp32 buffer (a bf16 pass)."""
    if logits.dtype == torch.float32:
        return logits
    return _logits_buffer(logits.shape[0], logits.shape[1], logits, torch.float32, WIDE_CHUNK).copy_(logits)


def _head_logits(weight, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """W h^T, [vocab, len(h)], in the reused buffer; W a tensor or a CompactWeight (decoded block by block).
    On a CPU the columns are computed padded to a multiple of 8 (zero rows of h) and the view returned
    leaves the padding out: MKL runs this product at ~40 GFLOP/s a core for an odd count such as 215
    label positions and at ~64 for 216 (SmolLM2's head)."""
    n = len(h)
    if h.device.type == "cpu" and n % 8:
        padded = h.new_zeros(-(-n // 8) * 8, h.shape[1])
        padded[:n] = h
        return _head_logits(weight, padded, chunk)[:, :n]
    return weight_times(weight, h.t(), _logits_buffer(weight.shape[0], n, h, least=chunk))


def free_buffers() -> None:
    """Drop the reused logits buffers (accel's release, when a training run ends)."""
    _LOGITS.clear()


class _HeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden W^T, target) with its gradient computed chunk by chunk in the forward pass.

    Each chunk's logits become dCE/dlogits = softmax - onehot in place, are multiplied into the input
    (and weight) gradient at once and freed; only [labels, hidden] survives to the backward pass. Same
    FLOPs as autograd's forward + backward, exact to rounding (tests/test_loss.py). Liger-Kernel's fused
    linear cross-entropy does this on GPUs with Triton; nothing maintained does it for CPU tensors.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, compute=None, index=None, rows=None):
        ctx.grad_rows = None
        if rows is not None:  # new tokens' rows (accel/token_rows.py): their logits theirs, their gradient apart
            loss, grad_hidden, grad_weight, ctx.grad_rows = _loss_and_grads(
                hidden, weight, target, ctx.needs_input_grad[1], rows=(index, rows)
            )
        elif compute is None:
            loss, grad_hidden, grad_weight = _loss_and_grads(hidden, weight, target, ctx.needs_input_grad[1])
        else:  # under autocast: the products in `compute` (bf16), dW accumulated in the master weight's dtype
            with torch.autocast(hidden.device.type, enabled=False):
                loss, grad_hidden, grad_weight = _loss_and_grads(
                    hidden.to(compute), weight.to(compute), target, ctx.needs_input_grad[1], weight.dtype
                )
            grad_hidden = grad_hidden.to(hidden.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_rows = None if ctx.grad_rows is None else ctx.grad_rows * grad_loss
        # in place: a new tensor the size of the head (28M weights for SmolLM2) would be a fresh allocation's page
        # faults each step; a second backward through the graph meets autograd's error for a changed saved tensor
        return (grad_hidden.mul_(grad_loss), None if grad_weight is None else grad_weight.mul_(grad_loss), None, None,
                None, grad_rows)  # fmt: skip


def _softmax_minus_onehot_(logits: torch.Tensor, t: torch.Tensor, real: int) -> torch.Tensor:
    """The summed CE of the first `real` columns of fp32 `logits` [vocab, n] against `t`; `logits` becomes
    dCE/dlogits = softmax - onehot in place: one pass over the buffer, 2.5x faster on a CPU than logsumexp and a
    second exp, its log-normaliser lse = max + log(sum) kept for the loss."""
    picked = logits.gather(0, t[None, :])
    top = logits.amax(dim=0, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(dim=0, keepdim=True)
    loss = (top + total.log() - picked)[:, : max(real, 0)].sum()
    probs.div_(total)
    probs[t, torch.arange(len(t), device=t.device)] -= 1.0
    return loss


def _loss_and_grads(hidden, weight, target, want_weight_grad: bool, weight_grad_dtype=None, rows=None):
    """(summed CE, dCE/dhidden, dCE/dW or None) chunk by chunk (_HeadCrossEntropy). `weight_grad_dtype`: dW summed
    in it (fp32 master weights under autocast: each chunk's bf16 product added in fp32, as autograd would).
    `rows`: (ids, trained rows) that stand in for those rows of `weight` (new tokens, accel/token_rows.py); their
    gradient, summed in their dtype, is returned fourth."""
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    labels = target.numel()
    # in bf16 the label count is rounded up (memory.shape_bucket) with zero rows: they add nothing to dW, their
    # loss is left out and their dh dropped
    if (bucket := shape_bucket(labels, hidden)) != labels:
        hidden, target = F.pad(hidden, (0, 0, 0, bucket - labels)), F.pad(target, (0, bucket - labels))
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight, dtype=weight_grad_dtype) if want_weight_grad else None
    plain_bf16 = isinstance(weight, torch.Tensor) and weight.dtype != torch.float32 and hidden.device.type == "cpu"
    chunk = BF16_CHUNK if plain_bf16 and not want_weight_grad else FUSED_CHUNK
    if rows is not None:
        index, trained = rows
        own = trained.to(hidden.dtype)  # as PEFT's layer casts them into the table it multiplies by
        frozen = weight.rows(index) if not isinstance(weight, torch.Tensor) else weight[index]
        change = own - frozen.to(hidden.dtype)  # what the new rows add to dh over the frozen table's product
        grad_rows = torch.zeros_like(trained)
    for i in range(0, target.numel(), chunk):
        h, t = hidden[i : i + chunk], target[i : i + chunk]
        real = min(len(t), labels - i)  # the chunk's columns before the bucket's padding
        # logits transposed, [vocab, chunk] = W h^T: with the vocabulary as the long dimension of the
        # left operand the matmul runs ~1.4x faster on a CPU than h W^T (MKL, 2 cores, SmolLM2's head)
        probs = _head_logits(weight, h, chunk)
        if rows is not None:
            probs[index] = (own @ h.t()).to(probs.dtype)
        if probs.dtype == torch.float32:
            loss += _softmax_minus_onehot_(probs, t, real)
        else:  # a bf16 pass: widened to fp32 a few columns at a time, the gradient narrowed back in place
            for j in range(0, len(t), WIDE_CHUNK):
                cols = probs[:, j : j + WIDE_CHUNK]
                wide = _widened(cols)
                loss += _softmax_minus_onehot_(wide, t[j : j + WIDE_CHUNK], real - j)
                cols.copy_(wide)
        times_weight(probs.t(), weight, out=grad_hidden[i : i + chunk])
        if rows is not None:
            picked = probs[index]
            grad_hidden[i : i + chunk].addmm_(picked.t(), change)
            grad_rows += (picked.float() @ h.float()).to(grad_rows.dtype)
        if grad_weight is None:
            continue
        if grad_weight.dtype == probs.dtype:
            grad_weight.addmm_(probs, h)
        else:
            grad_weight += probs @ h
    if rows is not None:
        return loss, grad_hidden[:labels], grad_weight, grad_rows
    return loss, grad_hidden[:labels], grad_weight
