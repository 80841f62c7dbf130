"""Weight quantisation in PyTorch: int8 per channel, 4-bit per group, fake quantisation for QAT.

Written by hand (a few tensor operations) rather than taken from a library, because the point is to
reproduce *exactly* what the exported GGUF file will hold: the 4-bit group formulas below are GGUF's
Q4_1 (asymmetric) and Q4_0 (symmetric) at group size 32, bit for bit, including GGUF's rounding
(half away from zero) and its fp16 scales. So a model trained with `method: qat` and exported with
the matching `--quant` runs in llama.cpp with the very weights it was trained and evaluated with.
(torchao's quantisers use other rounding and keep fp32 scales; bitsandbytes' NF4 is no GGUF type.)

Groups run along the input dimension of a linear weight [out, in] (each row is cut into runs of
`group_size` consecutive values), which is how GGUF lays out its blocks.

  asymmetric (Q4_1):  z = min(g), s = (max(g) - min(g)) / 15,  q = round((w - z) / s) in 0..15,
                      w_hat = s16 * q + z16            (s16, z16: s and z stored as fp16)
  symmetric  (Q4_0):  s = m / -8 with m the value of largest magnitude in g,
                      q = clamp(round(w / s) + 8, 0, 15),  w_hat = s16 * (q - 8)
  int8 per channel:   s = max|w_row| / 127, q = round(w / s) in -127..127, w_hat = s * q
"""

from __future__ import annotations

import torch

from tunelab.models.loading import TASK_HEADS


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # torch.round rounds half to even; GGUF (ggml) rounds half away from zero
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    if w.shape[-1] % group_size:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of the group size {group_size}")
    return w.reshape(-1, group_size)


def quantize_4bit(w: torch.Tensor, group_size: int = 32, symmetric: bool = False):
    """4-bit codes of `w` (uint8 in 0..15, same shape), with per-group fp16 scale and zero point.

    The zero point is the group minimum (asymmetric) or the constant -8 * scale (symmetric), so that
    dequantisation is always w_hat = scale * q + zero.
    """
    g = _groups(w.detach().float(), group_size)
    if symmetric:
        idx = g.abs().argmax(dim=1, keepdim=True)
        d = torch.gather(g, 1, idx) / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(g * inv + 8.5).clamp(0, 15)
        scale = d.half()
        zero = (scale.float() * -8).half()
    else:
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((g - lo) * inv + 0.5).clamp(0, 15)
        scale, zero = d.half(), lo.half()
    return q.to(torch.uint8).reshape(w.shape), scale.squeeze(1), zero.squeeze(1)


def dequantize_4bit(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    g = q.float().reshape(-1, group_size)
    return (scale.float()[:, None] * g + zero.float()[:, None]).reshape(q.shape)


def fake_quant_4bit(w: torch.Tensor, group_size: int = 32, symmetric: bool = False) -> torch.Tensor:
    """quantise then dequantise: the weights a 4-bit export holds, as a float tensor like `w`."""
    return dequantize_4bit(*quantize_4bit(w, group_size, symmetric), group_size).to(w.dtype)


def quantize_int8(w: torch.Tensor):
    """int8 codes per output channel (row) with an fp32 scale each: w_hat = scale[:, None] * q."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    scale = w2.abs().amax(dim=1) / 127
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    q = _round_half_away(w2 * inv[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def fake_quant_int8(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8(w)
    return (q.float().reshape(w.shape[0], -1) * scale[:, None]).reshape(w.shape).to(w.dtype)


class _STE(torch.autograd.Function):
    """Forward: the quantised weight. Backward: the gradient as if quantisation were the identity
    (straight-through estimator, Bengio et al. 2013), so the latent full-precision weight trains."""

    @staticmethod
    def forward(ctx, w, group_size, symmetric):
        return fake_quant_4bit(w, group_size, symmetric)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quant_ste(w: torch.Tensor, group_size: int = 32, symmetric: bool = False) -> torch.Tensor:
    return _STE.apply(w, group_size, symmetric)


# ----------------------------------------------------------------------------------- model level
def quantizable_linears(model, group_size: int | None = None) -> tuple[list[tuple[str, torch.nn.Linear]], dict]:
    """The linear layers of the model body that get quantised, and {name: reason} for those skipped.

    The output head (often tied to the input embedding) and task heads stay in higher precision, as
    llama.cpp does; a layer whose input width is not a multiple of `group_size` cannot be grouped.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        if module is out or any(p in TASK_HEADS for p in parts):
            skipped[name] = "output or task head"
        elif group_size and module.in_features % group_size:
            skipped[name] = f"in_features {module.in_features} is not a multiple of group_size {group_size}"
        else:
            chosen.append((name, module))
    return chosen, skipped


@torch.no_grad()
def quantize_model_(model, bits: int = 4, group_size: int = 32, symmetric: bool = False) -> dict:
    """Post-training quantisation, simulated: every body linear weight is replaced in place by its
    quantise-dequantise (4-bit per group, or 8-bit per channel). Returns a size report."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    layers, skipped = quantizable_linears(model, group_size if bits == 4 else None)
    for _, module in layers:
        w = module.weight
        w.copy_(fake_quant_4bit(w, group_size, symmetric) if bits == 4 else fake_quant_int8(w))
    return {**size_report(model, [n for n, _ in layers], bits, group_size, symmetric), "skipped": skipped}


def size_report(model, quantized: list[str], bits: int, group_size: int = 32, symmetric: bool = False) -> dict:
    """Bytes of the model stored dense (fp32, fp16) and with the named linear layers quantised
    (codes + fp16 scale, + fp16 zero point when asymmetric; int8: fp32 scale per row); the other
    parameters counted in fp16. Tied weights are counted once."""
    modules = dict(model.named_modules())
    qparams = {id(modules[n].weight) for n in quantized}
    seen: set[int] = set()
    n_total = n_quant = 0
    q_bytes = 0.0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n_total += p.numel()
        if id(p) in qparams:
            n_quant += p.numel()
            if bits == 4:
                q_bytes += p.numel() / 2 + (p.numel() // group_size) * (2 if symmetric else 4)
            else:
                q_bytes += p.numel() + 4 * p.shape[0]
        else:
            q_bytes += 2 * p.numel()
    return {
        "parameters": n_total,
        "quantized_parameters": n_quant,
        "layers": len(quantized),
        "bytes_fp32": 4 * n_total,
        "bytes_fp16": 2 * n_total,
        "bytes_quantized": int(q_bytes),
        "bits": bits,
        "group_size": group_size if bits == 4 else None,
        "symmetric": symmetric if bits == 4 else True,
    }
