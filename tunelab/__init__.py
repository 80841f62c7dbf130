"""tunelab: every fine-tuning method on one harness — train, evaluate, compare and export.

Python API (the CLI calls the same functions):

    import tunelab
    cfg = tunelab.load_config("examples/lora-sft.yaml", overrides=["training.max_steps=10"])
    result = tunelab.train(cfg)
"""

from __future__ import annotations

__version__ = "0.1.0"

_BNB_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _drop_bnb_hub_kernel_notice() -> None:
    """bitsandbytes (0.50) on a CPU with avx512_bf16 tries, whenever it is imported (peft imports it), to fetch a
    4-bit matmul kernel from the Hugging Face Hub (kernels-community), and where that code is refused as untrusted
    it logs a warning in every process that suggests `trust_remote_code=True`. tunelab keeps remote code off and
    needs no such kernel (its 4-bit layers dequantise with bitsandbytes' own kernel: accel/fast_lora.py), so that
    one notice is dropped; everything else bitsandbytes logs passes. Installed at import: compare's cell
    processes import tunelab before peft."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith(_BNB_HUB_KERNEL_NOTICE)
    )


_drop_bnb_hub_kernel_notice()


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
