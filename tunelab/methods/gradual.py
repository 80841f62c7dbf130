"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT): thaw the network from the top, one block at a time.

Step 0 trains the head and the top `start_blocks` blocks; every `every_steps` optimizer steps one
more block below joins, until every block trains (then, with `unfreeze_embeddings`, the embedding
tables too). Updating the top first lets the randomly-placed / task-specific top settle before the
general-purpose lower layers see large gradients, which guards against catastrophic forgetting.

"Head" means the parameters above the last block that are not the input embedding: the final norm,
an untied LM head, a task head (BERT's pooler + classifier). On tied-embedding causal LMs (SmolLM2,
the tiny test Llama) and T5, the LM head *is* the input embedding, so it is frozen until
`unfreeze_embeddings` thaws it at the very end.

The schedule is a pure function of the step, so a resumed run (the loop calls `on_step(step)`
again after loading a checkpoint) trains exactly what the uninterrupted run trained. T5's blocks
are numbered per stack; "block i" is encoder block i and decoder block i together.

The ULMFiT paper unfreezes one layer per *epoch*: `every_epochs: 1` does that (the loop passes the
number of optimizer steps per epoch to `on_step`); `every_steps` sets the interval in steps.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.base import (
    Capabilities,
    MethodConfig,
    MethodError,
    freeze_all,
    load_full_model,
    num_blocks,
    save_full_model,
    unchanged,
)
from tunelab.methods.freeze import part_of
from tunelab.models.blocks import block_index

DESCRIPTION = "head + top block first, then one more block from the top every K steps or epochs"
CAPABILITIES = Capabilities(changes_trainables=True, mergeable=True)
INFERENCE_COST = "none"


class Config(MethodConfig):
    name: Literal["gradual"] = "gradual"
    every_steps: int | None = Field(
        100, ge=1, description="Unfreeze one more block (from the top) every this many optimizer steps."
    )
    every_epochs: float | None = Field(
        None, gt=0, description="Or every this many epochs (ULMFiT: 1); replaces every_steps when set."
    )
    start_blocks: int = Field(1, ge=0, description="Blocks (from the top) that train from step 0, with the head.")
    unfreeze_embeddings: bool = Field(
        False,
        description="After the last block, also unfreeze the embedding tables (and a tied LM head) one "
        "interval later. Off: embeddings never train.",
    )

    @model_validator(mode="after")
    def _one_interval(self):
        if self.every_epochs is not None:
            object.__setattr__(self, "every_steps", None)  # every_epochs wins over the default every_steps
        if self.every_steps is None and self.every_epochs is None:
            raise ValueError("gradual: set every_steps or every_epochs")
        return self


def interval(cfg: Config, steps_per_epoch: int | None) -> int:
    """Optimizer steps between two thaws."""
    if cfg.every_steps is not None:
        return cfg.every_steps
    if not steps_per_epoch:
        raise ValueError("gradual: every_epochs needs the number of steps per epoch (the training loop passes it)")
    return max(1, round(cfg.every_epochs * steps_per_epoch))


def _groups(model):
    """(head, blocks top-down, embeddings): parameter lists in the order they thaw."""
    n = num_blocks(model)
    head, embeddings = [], []
    blocks: list[list] = [[] for _ in range(n)]
    for name, p in model.named_parameters():  # tied weights once, under the first (embedding) name
        idx = block_index(name)
        if idx is not None:
            blocks[n - 1 - idx].append(p)
        elif part_of(name) == "embeddings":
            embeddings.append(p)
        else:
            head.append(p)
    return head, blocks, embeddings


def _stages(model, cfg: Config) -> int:
    return num_blocks(model) + (1 if cfg.unfreeze_embeddings else 0)


def stage_at(step: int, cfg: Config, n_stages: int, every: int | None = None) -> int:
    """How many thaw stages (blocks from the top, then the embeddings) are open before `step`."""
    return min(n_stages, cfg.start_blocks + step // (every or interval(cfg, None)))


def _set(model, cfg: Config, step: int, every: int) -> int:
    head, blocks, embeddings = _groups(model)
    k = stage_at(step, cfg, _stages(model, cfg), every)
    freeze_all(model)
    for p in head:
        p.requires_grad_(True)
    for group in blocks[:k]:
        for p in group:
            p.requires_grad_(True)
    if k > len(blocks):
        for p in embeddings:
            p.requires_grad_(True)
    return k


def _note(k: int, n: int) -> str:
    if k > n:
        return f"unfroze the embeddings ({n}/{n} blocks trainable)"
    return f"unfroze block {n - k} ({k}/{n} blocks trainable)"


def apply(model, cfg: Config):
    k = _set(model, cfg, 0, 1)
    if k == 0 and not any(p.requires_grad for p in model.parameters()):
        raise MethodError(
            "gradual: start_blocks 0 and the model has no head outside the blocks: nothing trains at step 0"
        )
    return model


def on_step(model, cfg: Config, step: int, steps_per_epoch: int | None = None) -> str | None:
    """Set what trains before optimizer step `step`; a note on the steps where a block thaws."""
    every = interval(cfg, steps_per_epoch)
    k = _set(model, cfg, step, every)
    n_stages = _stages(model, cfg)
    if step > 0 and k > stage_at(step - 1, cfg, n_stages, every):
        return _note(k, num_blocks(model))
    return None


def optimizer_parameters(model, cfg: Config) -> list:
    """Every parameter that trains at some point (frozen ones get no gradient until they thaw)."""
    head, blocks, embeddings = _groups(model)
    ever = head + [p for g in blocks for p in g] + (embeddings if cfg.unfreeze_embeddings else [])
    ids = {id(p) for p in ever}
    return [p for p in model.parameters() if id(p) in ids]  # model order: stable for optimizer state


def schedule(model, cfg: Config, total_steps: int, steps_per_epoch: int | None = None) -> list[tuple[int, str]]:
    """[(step, what happens)] over a run of `total_steps` optimizer steps, for docs and logs."""
    n = num_blocks(model)
    n_stages = _stages(model, cfg)
    every = interval(cfg, steps_per_epoch)
    k0 = stage_at(0, cfg, n_stages, every)
    first = f"head + top {k0} block(s) trainable ({min(k0, n)}/{n} blocks trainable)"
    events = [(0, first)]
    for k in range(k0 + 1, n_stages + 1):
        step = (k - cfg.start_blocks) * every
        if step >= total_steps:
            break
        events.append((step, _note(k, n)))
    return events


save, load, merge = save_full_model, load_full_model, unchanged
