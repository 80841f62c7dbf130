"""Data: read rows, map them to chat messages, tokenize with the chat template and a loss mask,
split, truncate, pack and collate.

    bundle = build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage)
    batch = collate(bundle.train[:4], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.data.build import DataBundle, build_datasets, split_rows
from tunelab.data.collate import collate
from tunelab.data.errors import DataError
from tunelab.data.packing import pack
from tunelab.data.readers import read_rows
from tunelab.data.templating import IGNORE, build_prompt_ids, encode_messages, render_example


def shared_data_dir() -> Path:
    """The offline data sets folder (shared/data beside the repo); TUNELAB_SHARED_DATA overrides it."""
    env = os.environ.get("TUNELAB_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


__all__ = [
    "IGNORE",
    "DataBundle",
    "DataError",
    "build_datasets",
    "build_prompt_ids",
    "collate",
    "encode_messages",
    "pack",
    "read_rows",
    "render_example",
    "shared_data_dir",
    "split_rows",
]
