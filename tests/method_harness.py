"""One acceptance check for every method x architecture (issue: methods on one harness).

`check_method` asserts, for a method config on a tiny random model:
  - training 20 steps on a fixed batch lowers the loss by a clear margin;
  - only the parameters the method makes trainable change; everything else stays bit-identical
    (and `expect_trainable(name)` says which names those should be);
  - save -> load into a fresh base model reproduces the logits (< 1e-5);
  - a mergeable method's merged model gives the unmerged logits (< 1e-4);
  - a zero-initialised method gives the base model's logits at step 0 (`identity_at_init`).
"""

from __future__ import annotations

import copy

import torch

from tunelab.methods import get
from tunelab.testing import TINY_MODELS, tiny_batch


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def fit_steps(model, batch: dict, steps: int = 20, lr: float = 1e-2, before_step=None) -> list[float]:
    """AdamW on a fixed batch for `steps` steps (train mode); returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def check_method(
    name: str,
    arch: str,
    tmp_path,
    expect_trainable=None,
    identity_at_init: bool = False,
    steps: int = 20,
    lr: float = 1e-2,
    min_drop: float = 0.2,
    device: str = "cpu",
    **cfg_kwargs,
):
    mod = get(name)
    cfg = mod.Config(**cfg_kwargs)
    base = TINY_MODELS[arch]().to(device)
    batch = {k: v.to(device) for k, v in tiny_batch(arch).items()}
    base_logits = _logits(base, batch)

    model = mod.apply(copy.deepcopy(base), cfg)
    if identity_at_init:
        assert (_logits(model, batch) - base_logits).abs().max() < 1e-6, "step 0 must equal the base model"

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method made nothing trainable"
    if expect_trainable is not None:
        wrong = [n for n in trainable if not expect_trainable(n)]
        assert not wrong, f"unexpected trainable parameters: {wrong[:5]}"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    on_step = (lambda step: mod.on_step(model, cfg, step)) if mod.CAPABILITIES.changes_trainables else None
    losses = fit_steps(model, batch, steps, lr, before_step=on_step)
    assert losses[-1] < (1 - min_drop) * losses[0], f"loss did not fall enough: {losses[0]:.4f} -> {losses[-1]:.4f}"

    trainable_now = {n for n, p in model.named_parameters() if p.requires_grad} | trainable
    for n, p in model.named_parameters():
        if n not in trainable_now:
            assert torch.equal(before[n], p.detach()), f"frozen parameter changed: {n}"

    trained_logits = _logits(model, batch)
    mod.save(model, tmp_path)
    reloaded = mod.load(TINY_MODELS[arch]().to(device), tmp_path)
    assert (_logits(reloaded, batch) - trained_logits).abs().max() < 1e-5, "save -> load changed the logits"

    if mod.CAPABILITIES.mergeable:
        merged = mod.merge(reloaded)
        assert (_logits(merged, batch) - trained_logits).abs().max() < 1e-4, "merge changed the logits"
    return losses
