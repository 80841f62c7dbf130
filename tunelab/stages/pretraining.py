"""What stage pretrain (stages/lm.py) and stage mlm (stages/mlm.py) share when they pre-train on a plain-text
corpus (data.train: .txt files), from scratch or not (docs/pretraining.md):

  - the model from `model.architecture`, its tokenizer trained on the training text when asked;
  - the corpus as token blocks: its training part, and the held-out tail (data/corpus.py);
  - held-out perplexity per token and per character beside character unigram / bigram models (causal), or
    masked-token accuracy beside always predicting the most frequent token (masked);
  - generation samples at every evaluation (causal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunelab.config import ConfigError
from tunelab.data import DataBundle
from tunelab.data.bytebpe import ids_encoder
from tunelab.data.corpus import all_text_files, causal_blocks, corpus_split, mlm_blocks, pack_tails
from tunelab.metrics.char_ngram import char_ngram_baselines
from tunelab.models import resolve_device
from tunelab.models.generation import generate
from tunelab.models.loading import no_grad
from tunelab.models.scratch import build_model, scratch_tokenizer

if TYPE_CHECKING:  # torch is imported where a model runs: the config check reads this module without it
    pass

MASK_PROBABILITY = 0.15


@dataclass
class CorpusBundle(DataBundle):
    """A DataBundle that keeps the training and held-out text its blocks came from."""

    train_texts: list[str] = field(default_factory=list)
    heldout_texts: list[str] = field(default_factory=list)


def plain_text(cfg) -> bool:
    """Whether the run's data is a plain-text corpus (every data.train entry a .txt file)."""
    return all_text_files(cfg.data.train)


def check_corpus(cfg) -> None:
    """The corpus read and split (and a tokenizer folder found) before a model loads."""
    corpus_split(cfg.data)
    if cfg.model.architecture and isinstance(cfg.model.tokenizer, str):
        from pathlib import Path

        if not (Path(cfg.model.tokenizer).expanduser() / "tokenizer.json").is_file():
            raise ConfigError(f"model.tokenizer {cfg.model.tokenizer!r}: no tokenizer.json there; train one with "
                              "`tunelab tokenizer train` or give {train: {...}}")  # fmt: skip


def load_scratch(cfg, device, auto_class):
    """(model, tokenizer) built from `model.architecture`, seeded with training.seed; a tokenizer to train
    without a corpus of its own learns the run's training text (the held-out tail left out)."""
    texts = None
    source = cfg.model.tokenizer
    if not isinstance(source, str) and not source.train.corpus and plain_text(cfg):
        texts = [t for _, t in corpus_split(cfg.data)[0]]
    tokenizer = scratch_tokenizer(cfg.model, texts)
    model = build_model(cfg.model, tokenizer, auto_class, seed=cfg.training.seed, device=resolve_device(device),
                        max_length=cfg.data.max_length)  # fmt: skip
    return model, tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    # verbose=False: a whole book is one input here, cut into blocks afterwards; no length warning
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


# ------------------------------------------------------------------------------------------ causal
def build_causal(cfg, tokenizer) -> CorpusBundle:
    """Token blocks of data.max_length over each document, which starts with bos (else eos), so its first
    token is a target too; the held-out blocks cover every held-out token (data/corpus.causal_blocks)."""
    train_docs, heldout_docs = corpus_split(cfg.data)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    length = cfg.data.max_length
    train, val, counts = [], [], {"train": 0, "heldout": 0}
    encode = ids_encoder(tokenizer)
    for docs, out, key in ((train_docs, train, "train"), (heldout_docs, val, "heldout")):
        for _, text in docs:
            ids = encode(text)
            counts[key] += len(ids)
            out += causal_blocks(ids, length, start)
    if cfg.data.packing:
        train = pack_tails(train, length)
    stats = {"documents": len(train_docs), "train_characters": sum(len(t) for _, t in train_docs),
             "train_tokens": counts["train"], "train_rows": len(train), "heldout_characters":
             sum(len(t) for _, t in heldout_docs), "heldout_tokens": counts["heldout"], "val_rows": len(val)}  # fmt: skip
    return CorpusBundle(train=train, val=val, stats=stats, train_texts=[t for _, t in train_docs],
                        heldout_texts=[t for _, t in heldout_docs])  # fmt: skip


@no_grad
def heldout_nll(
    model, examples: list[dict], collate, loss_sum, pad_id: int, device, batch_size: int = 8
) -> tuple[float, int]:
    """(summed NLL in nats, target tokens) of a causal LM over every held-out block."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v
            for k, v in collate(examples[i : i + batch_size], pad_id).items()
        }
        loss, n = loss_sum(model, batch)[:2]
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count


def causal_metrics(model, tokenizer, data: CorpusBundle, device, collate, loss_sum) -> dict:
    """Held-out perplexity per token and per character (exp of the summed NLL over the held-out tokens,
    divided by the tokens, or by the characters of the held-out text), beside the character unigram and
    bigram models fitted on the training text."""
    if not data.val:
        return {}
    nll, tokens = heldout_nll(model, data.val, collate, loss_sum, tokenizer.pad_token_id, device)
    chars = sum(len(t) for t in data.heldout_texts)
    out = {"heldout_tokens": tokens, "heldout_characters": chars, "heldout_nll": nll,
           "ppl_per_token": math.exp(nll / tokens), "ppl_per_char": math.exp(nll / chars),
           "bits_per_char": nll / chars / math.log(2)}  # fmt: skip
    base = char_ngram_baselines(data.train_texts, data.heldout_texts)
    out.update({f"baseline_{k}": v for k, v in base.items() if k.endswith(("ppl_per_char", "bits_per_char"))})
    return out


def sample_prompts(cfg, data) -> list[str]:
    """training.sample_prompts, else (null) the first line of the held-out text."""
    if cfg.training.sample_prompts is not None:
        return list(cfg.training.sample_prompts)
    texts = getattr(data, "heldout_texts", None) or []
    first = next((line for t in texts for line in t.splitlines() if line.strip()), None)
    return [first] if first else []


@no_grad
def samples(model, tokenizer, cfg, data, step: int) -> list[dict]:
    """A greedy and a sampled continuation (training.sample_temperature, seeded with the seed and step; the
    training's random state is left as it was) of each sample prompt."""
    import torch

    prompts = sample_prompts(cfg, data)
    if not prompts or cfg.training.sample_tokens == 0:
        return []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [([start] if start is not None else []) + _ids(tokenizer, p) for p in prompts]
    was_training = model.training
    model.eval()
    out = []
    # no stop token: a pre-training corpus has no turns to end, and eos starts a document
    settings = dict(max_new_tokens=cfg.training.sample_tokens, eos_token_id=[])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed * 100003 + step)
        for temperature in (0.0, cfg.training.sample_temperature):
            gen = generate(model, tokenizer, ids, temperature=temperature, use_cache=True, **settings)
            for prompt, text in zip(prompts, gen.texts(skip_special_tokens=False)):
                out.append({"step": step, "temperature": temperature, "prompt": prompt, "text": text})
    model.train(was_training)
    if getattr(model.config, "use_cache", None):  # the loop trains with the cache off (packed attention)
        model.config.use_cache = False
    return out


# ------------------------------------------------------------------------------------------ masked
def build_masked(cfg, tokenizer) -> CorpusBundle:
    """Blocks of data.max_length tokens, [CLS] ... [SEP] (the tokenizer's), over the training and the
    held-out text, in the masked LM stage's example format (stages/mlm.py)."""
    train_docs, heldout_docs = corpus_split(cfg.data)
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    counts = {"train": 0, "heldout": 0}

    def encode(docs, key):
        rows = []
        for _, text in docs:
            ids = _ids(tokenizer, text)
            counts[key] += len(ids)
            rows += mlm_blocks(ids, cfg.data.max_length, first, last)
        return [{"input_ids": x, "maskable": [int(t not in special) for t in x], "mask_id": tokenizer.mask_token_id,
                 "vocab_size": len(tokenizer)} for x in rows if len(x) > 1]  # fmt: skip

    train, val = encode(train_docs, "train"), encode(heldout_docs, "heldout")
    stats = {"documents": len(train_docs), "train_characters": sum(len(t) for _, t in train_docs),
             "train_tokens": counts["train"], "train_rows": len(train), "heldout_tokens": counts["heldout"],
             "val_rows": len(val)}  # fmt: skip
    return CorpusBundle(train=train, val=val, stats=stats, train_texts=[t for _, t in train_docs],
                        heldout_texts=[t for _, t in heldout_docs])  # fmt: skip


def held_out_masks(examples: list[dict], seed: int, probability: float = MASK_PROBABILITY) -> list[list[int]]:
    """The positions masked in each held-out example: a fixed draw (seeded), so every evaluation and every
    run with the seed scores the same tokens; at least one per example."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for e in examples:
        maskable = torch.tensor(e["maskable"], dtype=torch.bool)
        chosen = (torch.rand(len(maskable), generator=g) < probability) & maskable
        if not chosen.any() and maskable.any():
            chosen[int(maskable.nonzero()[0])] = True
        out.append(chosen.nonzero().flatten().tolist())
    return out


@no_grad
def masked_metrics(model, tokenizer, cfg, data, device, batch_size: int = 16) -> dict:
    """Masked-token accuracy on the held-out blocks: each chosen token replaced by the mask token, the
    model's top prediction against it; beside always predicting the training text's most frequent
    (maskable) token at the same positions. Each with its Wilson 95% interval over the masked tokens, and
    the exact McNemar p-value of the two on the same positions."""
    if not data.val:
        return {}
    from collections import Counter

    import numpy as np

    from tunelab.data import pad
    from tunelab.metrics.stats import mcnemar_exact, wilson_interval

    freq = Counter(t for e in data.train for t, m in zip(e["input_ids"], e["maskable"]) if m)
    majority = freq.most_common(1)[0][0]
    positions = held_out_masks(data.val, cfg.training.seed)
    was_training = model.training
    model.eval()
    right, majority_right = [], []
    for i in range(0, len(data.val), batch_size):
        chunk, where = data.val[i : i + batch_size], positions[i : i + batch_size]
        ids, mask = pad([e["input_ids"] for e in chunk], tokenizer.pad_token_id)
        inputs = ids.clone()
        for row, cols in enumerate(where):
            inputs[row, cols] = tokenizer.mask_token_id
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        for row, cols in enumerate(where):
            truth = ids[row, cols]
            right += (logits[row, cols].argmax(-1).cpu() == truth).tolist()
            majority_right += (truth == majority).tolist()
    model.train(was_training)
    n, k, k_major = len(right), sum(right), sum(majority_right)
    (lo, hi), (b_lo, b_hi) = wilson_interval(k, n), wilson_interval(k_major, n)
    return {"masked_accuracy": k / n, "masked_accuracy_ci_low": lo, "masked_accuracy_ci_high": hi,
            "baseline_majority_token_accuracy": k_major / n, "baseline_majority_token_accuracy_ci_low": b_lo,
            "baseline_majority_token_accuracy_ci_high": b_hi,
            "mcnemar_p_vs_majority": mcnemar_exact(np.array(right), np.array(majority_right))["p"],
            "masked_tokens": n, "majority_token_id": majority}  # fmt: skip
