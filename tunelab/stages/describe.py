"""What `tunelab data prepare` prints for a stage that reads its data itself: every stage but sft and pretrain
(and distill, whose rows are theirs), whose rows go through data/build.py's cached pipeline and its `describe`.

The rows are read and checked first (the stage's `check_data`, before the tokenizer loads: a bad file is named
before any download), then tokenised by the stage's own `build_data`, as `tunelab train` does; printed: the counts
the stage keeps (its DataBundle.stats), the tokens and rows cut at the length limit, a classification task's
classes, and a histogram of the training rows' lengths. These stages keep no on-disk cache: they read their files
each run."""

from __future__ import annotations

from collections import Counter

from tunelab.data.build import length_histogram
from tunelab.stages import get as get_stage
from tunelab.stages.base import task_of

# a stat's name as printed; others print their key with spaces
_NAMES = {
    "rows_read": "rows read", "skipped": "rows skipped (no usable pair)",
    "identical": "rows skipped (chosen = rejected)", "train_pairs": "train pairs", "val_pairs": "val pairs",
    "pairs_unpaired": "pairs split in two replies", "desirable": "desirable replies",
    "undesirable": "undesirable replies", "train_examples": "train replies", "val_examples": "val replies",
    "prompts_too_long": "prompts skipped (too long)", "eval_prompts": "held-out prompts",
}  # fmt: skip
PREFERENCE = ("dpo", "reward", "kto")
# stages whose length limit is task.max_length (the rest: data.max_length)
TASK_LENGTH = ("classification", "extractive_qa", "seq2seq")


def describe_data(cfg, tokenizer_of, source: str) -> str:
    """The report of `cfg`'s data for its stage; `tokenizer_of()` loads the tokenizer once the rows are checked."""
    stage = get_stage(cfg.stage, cfg)
    if stage.check_data is not None:
        stage.check_data(cfg)
    bundle = stage.build_data(cfg, tokenizer_of())
    s = bundle.stats
    kto, preference = cfg.stage == "kto", cfg.stage in PREFERENCE
    keys = ("chosen_input_ids", "rejected_input_ids") if preference and not kto else ("input_ids", "ids")  # ppo: ids
    lengths = [len(e[k]) for e in bundle.train for k in keys if k in e]
    limit, setting = (cfg.data.max_length, "data.max_length")
    if cfg.stage in TASK_LENGTH:
        limit, setting = cfg.task.max_length, "task.max_length"
    elif cfg.stage == "ppo":
        limit, setting = cfg.ppo.max_prompt_length, "ppo.max_prompt_length"
    unit = {"extractive_qa": "windows", "ppo": "prompts"}.get(cfg.stage, "rows")  # what a training example is
    rows = [(_NAMES.get(k, k.replace("_", " ")), v) for k, v in s.items() if k not in ("tokens", "truncated")]
    if preference:
        rows += [
            ("tokens", f"{s['tokens']} in the train rows" + (" and their mismatched KL rows" if kto else "")),
            ("truncated", f"{s['truncated']} {'replies' if kto else 'pairs'} (train and val) longer than "
                          f"{setting}={limit}: cut to it, the prompt's start first"),
        ]  # fmt: skip
    else:
        rows.append(("tokens", f"{sum(lengths)} in the train {unit}"))
        if "truncated" in s:
            rows.append(("truncated", f"{s['truncated']} rows (train and val) at {setting}={limit}: cut to it"))
        elif lengths:  # a stage that does not count its cuts: the train rows that reach the limit
            at = sum(n >= limit for n in lengths)
            rows.append(
                ("at the limit", f"{at} train {unit} reach {setting}={limit} (cut to it, or exactly that long)")
            )
    labels = [e["label"] for e in bundle.train if isinstance(e.get("label"), int)]
    if cfg.stage == "classification" and labels:
        names = list(task_of(cfg.task).labels) or None  # a preset's own, or the config's
        counts = Counter(labels)
        rows.append(("train classes", ", ".join(f"{names[c] if names and c < len(names) else c}: {counts[c]}"
                                                for c in sorted(counts))))  # fmt: skip
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"data of {source} (stage {cfg.stage}, seed {cfg.training.seed})"]
    lines += [f"{k:<{width}}{v}" for k, v in rows]
    what = "train rows, each reply its own" if preference else f"train {unit}"
    return "\n".join(lines + length_histogram(lengths, max(limit, max(lengths, default=1)), what))
