"""Stages: what is trained, on which rows, with which loss (see stages/base.py for the protocol).

    stage = get("classification", cfg)      # a Stage: load_model, build_data, collate, loss_sum, ...

Adding a stage: write `tunelab/stages/<name>.py` with a `stage(cfg) -> Stage` function and add one line
to STAGES (docs/architecture.md walks through an example). The config's `stage:` field accepts the
names listed here.
"""

from __future__ import annotations

import importlib

from tunelab.stages.base import Stage

# stage name -> module of tunelab.stages that builds it (imported when the stage is used)
STAGES = {
    "sft": "lm",
    "pretrain": "lm",
    "classification": "classification",
    "extractive_qa": "extractive_qa",
    "seq2seq": "seq2seq",
    "mlm": "mlm",
    "reward": "reward",
    "dpo": "dpo",
    "ppo": "ppo",
}


def get(name: str, cfg=None) -> Stage:
    """The Stage called `name`; stages whose loss reads the config (dpo, packed sft) need `cfg`."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(f"tunelab.stages.{STAGES[name]}").stage(cfg)


def names() -> list[str]:
    return list(STAGES)


__all__ = ["STAGES", "Stage", "get", "names"]
