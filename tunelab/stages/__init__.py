"""Stages: what is trained, on which rows, with which loss (stages/base.py has the protocol).

    stage = get("classification", cfg)      # a Stage: load_model, build_data, collate, loss_sum, ...

The plug-in table (tunelab/plugins.py, STAGES) maps each name to its module.
"""

from __future__ import annotations

import importlib

from tunelab.plugins import STAGES
from tunelab.stages.base import Stage


def get(name: str, cfg=None) -> Stage:
    """The Stage called `name`; stages whose loss reads the config (dpo, packed sft) need `cfg`."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).stage(cfg)


def names() -> list[str]:
    return list(STAGES)


__all__ = ["STAGES", "Stage", "get", "names"]
