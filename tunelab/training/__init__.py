"""The training loop, its loss and its checkpoints."""

from tunelab.training.loop import RunResult, train

__all__ = ["RunResult", "train"]
