"""Data: read rows, map them to chat messages, tokenize with the chat template and a loss mask,
split, truncate, pack and collate.

    bundle = build_datasets(cfg.data, tokenizer, seed=cfg.training.seed, stage=cfg.stage)
    batch = collate(bundle.train[:4], pad_id=tokenizer.pad_token_id)
    ids, mask = pad([[5, 6, 7], [8]], tokenizer.pad_token_id, side="left")   # any padded batch
"""

from __future__ import annotations

from tunelab.data.build import DataBundle, build_datasets, check_rows, split_rows
from tunelab.data.collate import collate, pad
from tunelab.data.errors import DataError
from tunelab.data.packing import pack
from tunelab.data.readers import read_rows
from tunelab.data.sources import cap_validation
from tunelab.data.tasks import read_source, shared_data_dir
from tunelab.data.templating import IGNORE, build_prompt_ids, encode_messages, render_example

__all__ = [
    "IGNORE",
    "DataBundle",
    "DataError",
    "build_datasets",
    "build_prompt_ids",
    "cap_validation",
    "check_rows",
    "collate",
    "encode_messages",
    "pack",
    "pad",
    "read_rows",
    "read_source",
    "render_example",
    "shared_data_dir",
    "split_rows",
]
