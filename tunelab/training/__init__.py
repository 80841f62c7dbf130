"""The training loop, its loss and its checkpoints.

`train` and `RunResult` load the loop (torch, transformers, peft) on first use, not on `import tunelab.training.checkpoint`:
`tunelab compare`'s own process writes its files with that module and never trains.
"""

__all__ = ["RunResult", "train"]


def __getattr__(name: str):
    if name in __all__:
        from tunelab.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
