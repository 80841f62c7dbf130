"""The one place where stages are registered: stage name -> the module that builds it.

A stage module has a function `stage(cfg) -> Stage` (tunelab/stages/base.py). The config's `stage:`
field accepts exactly these names, and the module is imported only when the stage is used. Adding a
stage: write its module, add one line below (docs/architecture.md walks through an example).
"""

from __future__ import annotations

STAGES: dict[str, str] = {
    "sft": "tunelab.stages.lm",
    "pretrain": "tunelab.stages.lm",
    "classification": "tunelab.stages.classification",
    "extractive_qa": "tunelab.stages.extractive_qa",
    "seq2seq": "tunelab.stages.seq2seq",
    "mlm": "tunelab.stages.mlm",
    "ppo": "tunelab.stages.ppo",
    "reward": "tunelab.stages.reward",
    "dpo": "tunelab.stages.dpo",
    "tagging": "tunelab.stages.tagging",
}


def names() -> list[str]:
    return list(STAGES)
