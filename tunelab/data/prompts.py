"""Classification tasks phrased as instructions for a causal LM: the same prompt is used to build SFT
rows (`data.train: task:sst2`) and to score the model zero-shot or after tuning (verbalizer)."""

from __future__ import annotations

# Per-task question and the one-word answer for each class (in label-id order).
_QUESTIONS = {
    "sst2": ("Is the sentiment of this movie review positive or negative?", ("negative", "positive")),
    "cola": ("Is this sentence grammatically acceptable? Answer yes or no.", ("no", "yes")),
    "mrpc": ("Do these two sentences mean the same thing? Answer yes or no.", ("no", "yes")),
    "rte": ("Does the first text entail the second? Answer yes or no.", ("yes", "no")),
    "wnli": ("Does the first sentence entail the second? Answer yes or no.", ("no", "yes")),
    "qnli": ("Does the sentence answer the question? Answer yes or no.", ("yes", "no")),
}


def label_words(task) -> tuple[str, ...]:
    """The answer word of each class, in label-id order."""
    if task.name in _QUESTIONS:
        return _QUESTIONS[task.name][1]
    return tuple(task.labels)


def instruction(task, row: dict) -> str:
    """The user message asking the model to classify one row."""
    words = label_words(task)
    question = _QUESTIONS.get(task.name, (f"Classify the text as one of: {', '.join(words)}.", words))[0]
    body = f"Text: {row['text']}"
    if row.get("text_pair") is not None:
        body = f"First: {row['text']}\nSecond: {row['text_pair']}"
    return f"{question}\n\n{body}\n\nAnswer with one word: {' or '.join(words)}."


def instruction_rows(task, rows: list[dict]) -> list[dict]:
    """Alpaca-style rows (instruction / input / output) for SFT on a classification task."""
    words = label_words(task)
    return [{"instruction": instruction(task, r), "input": "", "output": words[int(r["label"])]} for r in rows]
