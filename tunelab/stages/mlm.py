"""mlm: *ForMaskedLM; text -> 15% of tokens masked (80% [MASK], 10% random, 10% kept); summed CE over
the masked tokens.

On a plain-text corpus (data.train: .txt files) the text is cut into [CLS] ... [SEP] blocks of
data.max_length and the result reports held-out masked-token accuracy beside the most frequent token;
with `model.architecture` the encoder is built from scratch (stages/pretraining.py, docs/pretraining.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM

from tunelab.config import ConfigError
from tunelab.data import DataBundle, cap_validation, pad, read_rows
from tunelab.data.build import split_rows
from tunelab.data.errors import DataError
from tunelab.models import load_model
from tunelab.stages import pretraining as pt
from tunelab.stages.base import Stage


def load(cfg, device):
    if cfg.model.architecture:
        model, tok = pt.load_scratch(cfg, device, AutoModelForMaskedLM)
    else:
        model, tok = load_model(cfg.model, device=device, auto_class=AutoModelForMaskedLM)
    if tok.mask_token_id is None:
        raise ConfigError(f"stage: mlm needs a tokenizer with a mask token; {cfg.model.name!r} has none")
    return model, tok


def build(cfg, tokenizer):
    if pt.plain_text(cfg):
        return pt.build_masked(cfg, tokenizer)
    d = cfg.data
    if not d.train:
        raise DataError("data.train is not set: give a text file (.jsonl/.json/.csv/.tsv with a text column).")
    rows = read_rows(d.train, hub_split=d.hub_split, hub_config=d.hub_config)[: d.limit]
    if d.validation:
        val_rows = read_rows(d.validation, hub_split=d.hub_split, hub_config=d.hub_config)
        train_rows, val_rows = rows, cap_validation(val_rows, d.val_max_rows, cfg.training.seed)
    else:
        train_rows, val_rows = split_rows(rows, d.val_fraction, cfg.training.seed, d.val_max_rows)

    def encode(rs):
        texts = [str(r[d.columns.text]) for _, _, r in rs if r.get(d.columns.text)]
        ids = tokenizer(texts, truncation=True, max_length=d.max_length)["input_ids"]
        special = set(tokenizer.all_special_ids)
        # the masking mask (1 = may be masked): no special tokens ([CLS], [SEP])
        return [
            {
                "input_ids": x,
                "maskable": [int(t not in special) for t in x],
                "mask_id": tokenizer.mask_token_id,
                "vocab_size": len(tokenizer),
            }  # fmt: skip
            for x in ids
            if len(x) > 1
        ]

    train, val = encode(train_rows), encode(val_rows)
    stats = {"rows_read": len(rows), "train_rows": len(train), "val_rows": len(val),
             "tokens": sum(len(e["input_ids"]) for e in train)}  # fmt: skip
    return DataBundle(train=train, val=val, stats=stats)


def mlm_collate(examples, pad_id, probability: float = 0.15):
    """DataCollatorForLanguageModeling's recipe: choose `probability` of the maskable tokens as targets;
    of those 80% become the mask token, 10% a random token, 10% stay as they are.

    The draw comes from a torch.Generator seeded by one number taken from torch's global RNG, which the
    loop snapshots into every checkpoint, so a resumed run masks its batches exactly as the first one.
    Each example carries its tokenizer's mask id and vocabulary size (the collate gets no tokenizer)."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    maskable, _ = pad([e["maskable"] for e in examples], False, dtype=torch.bool)
    mask_id, vocab = examples[0]["mask_id"], examples[0]["vocab_size"]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    chosen = (torch.rand(ids.shape, generator=g) < probability) & maskable
    if not chosen.any() and maskable.any():  # at least one target per batch
        chosen.view(-1)[int(maskable.view(-1).nonzero()[0])] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(0, vocab, ids.shape, generator=g)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "attention_mask": mask, "labels": labels}


def loss_sum(model, batch):
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def stage(cfg=None) -> Stage:
    corpus = cfg is not None and pt.plain_text(cfg)
    return Stage(
        "mlm", load, build, mlm_collate, loss_sum, lambda b: int((b["labels"] != -100).sum()),
        pt.masked_metrics if corpus else None, reload=lambda manifest: {"auto_class": AutoModelForMaskedLM},
        check_data=pt.check_corpus if corpus else None,
    )  # fmt: skip
