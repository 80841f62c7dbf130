"""tunelab: every fine-tuning method on one harness — train, evaluate, compare and export.

Python API (the CLI calls the same functions):

    import tunelab
    cfg = tunelab.load_config("examples/lora-sft.yaml", overrides=["training.max_steps=10"])
    result = tunelab.train(cfg)
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_config(source=None, overrides=None):
    from tunelab.config import load_config as _load

    return _load(source, overrides)


def train(config, resume: bool = False, callbacks=None, force: bool = False):
    """Train from a Config, a dict, or a YAML path. Returns a RunResult (run_dir, final_dir, metrics).
    `force` lets a resume continue with changed settings (seed, model, method, batch, data)."""
    from tunelab.config import load_config as _load
    from tunelab.training import train as _train

    if not hasattr(config, "model_dump"):
        config = _load(config)
    return _train(config, resume=resume, callbacks=callbacks, force=force)


__all__ = ["__version__", "load_config", "train"]
