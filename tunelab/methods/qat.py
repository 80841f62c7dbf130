"""Quantisation-aware training: full fine-tuning whose forward pass sees 4-bit weights.

Every linear layer of the model body computes with fake_quant(W), the 4-bit per-group
quantise-dequantise of its weight (tunelab/models/quant.py; GGUF's Q4_1 at group 32, or Q4_0 with
`symmetric: true`). The backward pass treats the rounding as the identity (straight-through
estimator), so the latent full-precision W trains and keeps the small updates that a single step
would not move across a rounding boundary. The loss is thus the loss of the quantised model, and a
4-bit export of the result (`tunelab export RUN --format gguf --quant q4_1`) is exactly the model
that was trained and evaluated, instead of a rounded copy of it (post-training quantisation).

Why full fine-tuning and not LoRA + fake-quant of the merged weight: once the merged weight
W + BA is quantised in the forward pass, the backward pass needs the dense gradient of that weight
anyway, so LoRA saves only optimizer memory, not compute; and a rank-r update can move whole
rows/columns only, where every weight needs its own nudge to land on the right side of its own
rounding boundary. Embeddings, norms and the (tied) output head train in full precision; the export
keeps them at 8 bit or more.

Saving: the latent fp weights as a plain safetensors folder plus `tunelab_qat.json` (the group
settings and the fake-quantised layers); `load` re-applies the fake quantisation; `merge` writes
fake_quant(W) into the weights, giving a plain model whose logits are the trained ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab.methods.base import Capabilities, MethodConfig, MethodError, load_full_model, save_full_model

DESCRIPTION = "every weight; the body's linear weights are fake-quantised to 4 bit in the forward pass (STE)"
CAPABILITIES = Capabilities(mergeable=True, new_tokens=True)
INFERENCE_COST = "fake quantisation of every linear weight per forward; none once merged (the 4-bit weights)"

META_FILE = "tunelab_qat.json"
# torch (tunelab/models/quant.py, the layer in layers.py) is imported where the model is changed: the config
# reads `Config` above without it


class Config(MethodConfig):
    name: Literal["qat"] = "qat"
    group_size: int = Field(
        32, ge=8, description="Weights per quantisation group along the input dimension (GGUF blocks are 32)."
    )
    symmetric: bool = Field(
        False,
        description="false: scale + zero point per group (GGUF q4_1 at group 32); true: scale only (GGUF q4_0).",
    )


def _fake_quantize(model, names, group_size: int, symmetric: bool) -> None:
    from tunelab.methods.layers import FakeQuantLinear

    modules = dict(model.named_modules())
    for n in names:
        m = modules[n]
        m.__class__ = FakeQuantLinear
        m.qat_group_size, m.qat_symmetric = group_size, symmetric


def apply(model, cfg: Config):
    from tunelab.models.quant import quantizable_linears

    layers, _ = quantizable_linears(model, cfg.group_size)
    if not layers:
        raise MethodError(f"qat: no linear layer whose input width is a multiple of method.group_size {cfg.group_size}")
    for p in model.parameters():
        p.requires_grad_(True)
    _fake_quantize(model, [n for n, _ in layers], cfg.group_size, cfg.symmetric)
    return model


def _fake_quantized(model) -> list[str]:
    from tunelab.methods.layers import FakeQuantLinear

    return [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def save(model, out_dir) -> None:
    save_full_model(model, out_dir)
    layers = _fake_quantized(model)
    first = dict(model.named_modules())[layers[0]]
    meta = {"group_size": first.qat_group_size, "symmetric": first.qat_symmetric, "modules": layers}
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=2))


def load(base_model, out_dir):
    model = load_full_model(base_model, out_dir)
    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    _fake_quantize(model, meta["modules"], meta["group_size"], meta["symmetric"])
    return model


def merge(model):
    import torch

    from tunelab.methods.layers import FakeQuantLinear
    from tunelab.models.quant import fake_quant_4bit

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.copy_(fake_quant_4bit(m.weight, m.qat_group_size, m.qat_symmetric))
                m.__class__ = torch.nn.Linear
    return model


def settings(run_final_dir) -> dict | None:
    """The QAT settings of a saved result (None if it is no QAT result): used by export to pick the
    matching GGUF type."""
    path = Path(run_final_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None
