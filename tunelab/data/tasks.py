"""Evaluation task presets over the offline data sets in `shared_data_dir()` (see shared/data/README.md).

    task = get_task("sst2")
    rows = load_split(task, "dev")                     # [{"text": ..., "text_pair": None, "label": 1}, ...]
    rows = load_split("stsb", "train", limit=500)      # a seeded random sample, kept in file order
    rows = load_task_file(task, "my_reviews.csv")      # your own file, through the same fields

Rows are plain dicts, by task type:

- classification: {"text", "text_pair" (None for single sentences), "label": int} (label id indexes `Task.labels`)
- regression (stsb): {"text", "text_pair", "label": float}, similarity 0-5
- extractive_qa (squad): {"id", "question", "context", "answers": [str], "answer_starts": [int]};
  both lists are empty for a SQuAD v2 unanswerable question
- seq2seq (wmt14-en-de): {"source", "target"}
- instruction (lima, alpaca): the alpaca-style dict as stored ({"instruction", "input", "output", ...})
- preference (hh-rlhf): {"chosen", "rejected"}, the raw "\\n\\nHuman: ... \\n\\nAssistant: ..." strings

Splits where the offline copy has no train/dev pair are made deterministically (no randomness):

- sst2, cola, mrpc, stsb, rte, wnli: the official GLUE train and dev files.
- qnli: dev only (the GLUE validation set); "train" raises an error: pass your own file.
- squad: only the first 5 articles of SQuAD 2.0 dev exist. "train" = the questions of the first 4 articles
  (Normans ... Sky_(United_Kingdom), 1,160 questions), "dev" = the 5th (Victoria_(Australia), 247);
  split by article, so no context is shared between them.
- wmt14-en-de: only newstest2014 (3,003 lines). "train" = its first 2,003 lines, "dev" = the last 1,000.
- hh-rlhf: only harmless-base test (2,312 pairs). "train" = the first 80% (1,849), "dev" = the rest (463).
- lima (1,029), alpaca (the first 100 Alpaca records): "train" = the first 90%, "dev" = the last 10%.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunelab.data.errors import DataError, where
from tunelab.data.prompts import instruction_rows
from tunelab.data.readers import read_rows

TaskType = Literal["classification", "regression", "extractive_qa", "seq2seq", "causal_lm", "instruction", "preference"]
Split = Literal["train", "dev"]
SPLITS = ("train", "dev")
ENV_VAR = "TUNELAB_SHARED_DATA"


@dataclass(frozen=True)
class Task:
    name: str
    type: TaskType
    labels: tuple[str, ...] = ()  # class names in label-id order (classification)
    text_fields: tuple[str, ...] = ()  # the benchmark's own input field names, e.g. ("sentence1", "sentence2")
    main_metric: str = "accuracy"
    description: str = ""
    metrics: tuple[str, ...] = ()  # every metric the benchmark reports, main first

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2 and self.type in ("classification", "regression")


# ---------------------------------------------------------------------------------------- registry
_PAIR = ("sentence1", "sentence2")
_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "sst2",
            "classification",
            ("negative", "positive"),
            ("sentence",),
            "accuracy",
            "GLUE SST-2: movie-review sentence sentiment",
            ("accuracy",),
        ),
        Task(
            "cola",
            "classification",
            ("unacceptable", "acceptable"),
            ("sentence",),
            "mcc",
            "GLUE CoLA: grammatical acceptability (in-domain train/dev)",
            ("mcc", "accuracy"),
        ),
        Task(
            "mrpc",
            "classification",
            ("not_equivalent", "equivalent"),
            _PAIR,
            "f1",
            "GLUE MRPC: is sentence2 a paraphrase of sentence1",
            ("f1", "accuracy"),
        ),
        Task(
            "stsb",
            "regression",
            (),
            _PAIR,
            "pearson",
            "STS Benchmark (GLUE STS-B): sentence similarity 0-5",
            ("pearson", "spearman"),
        ),
        Task(
            "rte",
            "classification",
            ("entailment", "not_entailment"),
            _PAIR,
            "accuracy",
            "GLUE RTE: does sentence1 entail sentence2",
            ("accuracy",),
        ),
        Task(
            "wnli",
            "classification",
            ("not_entailment", "entailment"),
            _PAIR,
            "accuracy",
            "GLUE WNLI: Winograd pronoun resolution as entailment",
            ("accuracy",),
        ),
        Task(
            "qnli",
            "classification",
            ("entailment", "not_entailment"),
            ("question", "sentence"),
            "accuracy",
            "GLUE QNLI: does the sentence answer the question (dev only offline)",
            ("accuracy",),
        ),
        Task(
            "squad",
            "extractive_qa",
            (),
            ("question", "context"),
            "f1",
            "SQuAD 2.0 dev, first 5 articles: extractive QA with unanswerable questions",
            ("f1", "exact"),
        ),
        Task(
            "wmt14-en-de", "seq2seq", (), ("source",), "bleu", "WMT newstest2014 English-German translation", ("bleu",)
        ),
        Task(
            "lima",
            "instruction",
            (),
            ("instruction", "input"),
            "perplexity",
            "LIMA: 1,029 curated instruction-response pairs",
            ("perplexity",),
        ),
        Task(
            "alpaca",
            "instruction",
            (),
            ("instruction", "input"),
            "perplexity",
            "Stanford Alpaca, first 100 records",
            ("perplexity",),
        ),
        Task(
            "hh-rlhf",
            "preference",
            (),
            ("chosen", "rejected"),
            "preference_accuracy",
            "Anthropic HH-RLHF harmless-base test: chosen vs rejected dialogues",
            ("preference_accuracy",),
        ),
    )
}


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    if key not in _TASKS:
        raise DataError(f"unknown task {name!r}. Known tasks: {', '.join(_TASKS)}.")
    return _TASKS[key]


# -------------------------------------------------------------------------------------- loading
def load_split(
    task: Task | str,
    split: Split,
    limit: int | None = None,
    seed: int = 0,
    *,
    path: str | Path | None = None,
) -> list[dict]:
    """The rows of a preset's `split` ("train" or "dev"), or of your own file when `path` is given.

    `limit` keeps a seeded random sample of that many rows, in file order; the same seed gives the same
    rows, and a smaller limit gives a subset of a larger one.
    """
    task = get_task(task)
    if path is not None:
        return load_task_file(task, path, limit=limit, seed=seed)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for task {task.name!r}: use 'train' or 'dev'.")
    return _sample(_LOADERS[task.name](split), limit, seed)


def _sample(rows: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(rows):
        return rows
    if limit < 0:
        raise DataError(f"limit must be 0 or more, got {limit}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # a fixed permutation per seed: smaller limits are nested prefixes
    return [rows[i] for i in sorted(order[:limit])]


def shared_data_dir() -> Path:
    """The offline data sets folder: TUNELAB_SHARED_DATA when set, else the first `shared/data` found
    beside the repository of this package (an editable install, a clone), then in or beside the current
    folder (a wheel installed into site-packages has no repository around it). The first candidate
    when none exists, so that errors name where it was expected."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo.parent / "shared" / "data", repo / "shared" / "data",
                  Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]  # fmt: skip
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _shared_file(relative: str) -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        raise DataError(
            f"shared data folder not found: looked in {root}. Set {ENV_VAR} to the folder that holds "
            "glue/, squad/, wmt/ ... (see shared/data/README.md), or pass your own file (load_task_file)."
        )
    path = root / relative
    if not path.is_file():
        raise DataError(
            f"{path}: file not found in the shared data folder {root}. Restore it, or point {ENV_VAR} "
            "at a complete copy of the shared data."
        )
    return path


def _tsv(path: Path, header: bool, min_fields: int) -> list[tuple[str, int, list[str]]]:
    """(file, line, fields) per data line. QUOTE_NONE: GLUE text holds bare quote characters
    (MRPC, STS-B), which the csv default would take for field quoting and merge lines."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            next(reader, None)
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if len(fields) < min_fields:
                raise DataError(
                    f"{path} line {reader.line_num}: {len(fields)} tab-separated fields, expected at least "
                    f"{min_fields}. The file is damaged; restore it from the source named in shared/data/README.md."
                )
            out.append((str(path), reader.line_num, fields))
    return out


def _label_id(task: Task, value: str, file: str, number: int, field: str = "label") -> int:
    value = str(value).strip()
    if value in task.labels:
        return task.labels.index(value)
    try:
        as_float = float(value)
        label = int(as_float) if as_float.is_integer() else None
    except (ValueError, OverflowError):
        label = None
    if label is None or not 0 <= label < len(task.labels):
        choices = ", ".join(f"{i} ({name})" for i, name in enumerate(task.labels))
        raise DataError(
            f"{where(file, number)}: field {field!r} is {value!r}; task {task.name!r} expects a label id or "
            f"name: {choices}. Fix the label."
        )
    return label


def _score(value: str, file: str, number: int, field: str = "label") -> float:
    try:
        score = float(str(value).strip())
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{where(file, number)}: field {field!r} is {value!r}, not a number. Give a similarity score.")
    return score


def _glue(task_name: str, files: dict[str, str], header: bool, text: int, pair: int | None, label: int, n: int):
    def load(split: str) -> list[dict]:
        if split not in files:
            raise DataError(
                f"{task_name.upper()} {split} is not available offline (only "
                f"{', '.join(files)}); pass your own file: load_split({task_name!r}, {split!r}, path=...) "
                f"or `load_task_file`."
            )
        task = _TASKS[task_name]
        rows = []
        for file, line, f in _tsv(_shared_file(files[split]), header, n):
            y = _score(f[label], file, line) if task.type == "regression" else _label_id(task, f[label], file, line)
            rows.append({"text": f[text], "text_pair": f[pair] if pair is not None else None, "label": y})
        return rows

    return load


def _squad(split: str) -> list[dict]:
    path = _shared_file("squad/dev-v2.0.first5articles.json")
    articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    chosen = articles[:-1] if split == "train" else articles[-1:]
    return [row for article in chosen for row in _squad_rows(article)]


def _squad_rows(article: dict) -> list[dict]:
    rows = []
    for paragraph in article["paragraphs"]:
        for qa in paragraph["qas"]:
            answers = [] if qa.get("is_impossible") else qa.get("answers", [])
            rows.append(
                {
                    "id": qa["id"],
                    "question": qa["question"],
                    "context": paragraph["context"],
                    "answers": [a["text"] for a in answers],
                    "answer_starts": [int(a["answer_start"]) for a in answers],
                }
            )
    return rows


def _head_tail(rows: list, split: str, n_train: int) -> list:
    return rows[:n_train] if split == "train" else rows[n_train:]


def _wmt(split: str) -> list[dict]:
    src = _shared_file("wmt/en-de/newstest2014.en").read_text(encoding="utf-8").splitlines()
    tgt = _shared_file("wmt/en-de/newstest2014.de").read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise DataError(f"newstest2014.en has {len(src)} lines but .de has {len(tgt)}: the pair is not aligned.")
    rows = [{"source": s, "target": t} for s, t in zip(src, tgt)]
    return _head_tail(rows, split, len(rows) - 1000)


def _json_list(relative: str, train_fraction: float):
    def load(split: str) -> list[dict]:
        rows = json.loads(_shared_file(relative).read_text(encoding="utf-8"))
        return _head_tail(rows, split, round(len(rows) * train_fraction))

    return load


def _hh(split: str) -> list[dict]:
    with gzip.open(_shared_file("hh-rlhf/harmless-base/test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in map(json.loads, filter(str.strip, f))]
    return _head_tail(rows, split, int(len(rows) * 0.8))


_LOADERS: dict[str, Callable[[str], list[dict]]] = {
    "sst2": _glue("sst2", {"train": "glue/SST-2/train.tsv", "dev": "glue/SST-2/dev.tsv"}, True, 0, None, 1, 2),
    "cola": _glue(
        "cola",
        {
            "train": "glue/CoLA/cola_public/raw/in_domain_train.tsv",
            "dev": "glue/CoLA/cola_public/raw/in_domain_dev.tsv",
        },
        False,
        3,
        None,
        1,
        4,
    ),
    "mrpc": _glue("mrpc", {"train": "glue/MRPC/train.tsv", "dev": "glue/MRPC/dev.tsv"}, True, 3, 4, 0, 5),
    "stsb": _glue(
        "stsb",
        {"train": "glue/STS-B/stsbenchmark/sts-train.csv", "dev": "glue/STS-B/stsbenchmark/sts-dev.csv"},
        False,
        5,
        6,
        4,
        7,
    ),
    "rte": _glue("rte", {"train": "glue/RTE/train.tsv", "dev": "glue/RTE/dev.tsv"}, True, 1, 2, 3, 4),
    "wnli": _glue("wnli", {"train": "glue/WNLI/train.tsv", "dev": "glue/WNLI/dev.tsv"}, True, 1, 2, 3, 4),
    "qnli": _glue("qnli", {"dev": "glue/QNLI/dev.hf-format.tsv"}, True, 0, 1, 2, 3),
    "squad": _squad,
    "wmt14-en-de": _wmt,
    "lima": _json_list("lima/lima.json", 0.9),
    "alpaca": _json_list("alpaca/alpaca_tiny.json", 0.9),
    "hh-rlhf": _hh,
}


def read_source(source: str, *, hub_split: str = "train", hub_config: str | None = None) -> list[tuple[str, int, dict]]:
    """The rows of `data.train` / `data.validation`: a file or hub id (readers.read_rows), or `task:sst2`
    (train split) / `task:sst2:dev`, a classification preset phrased as instructions."""
    if not source.startswith("task:"):
        return read_rows(source, hub_split=hub_split, hub_config=hub_config)
    parts = source.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("train", "dev")):
        raise DataError(f"{source}: expected task:NAME or task:NAME:train|dev, e.g. task:sst2")
    task = get_task(parts[1])
    if task.type != "classification":
        raise DataError(f"{source}: only classification presets can be phrased as instructions")
    rows = instruction_rows(task, load_split(task, parts[2] if len(parts) == 3 else "train"))
    return [(source, i + 1, row) for i, row in enumerate(rows)]


# ------------------------------------------------------------------------------------ user files
def load_task_file(task: Task | str, path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of your own .csv/.tsv/.json/.jsonl(.gz) file, mapped to the task's row fields.

    classification/regression: columns `text`, optional `text_pair`, `label` (the task's own names,
    e.g. `sentence1`/`sentence2`, work too); a class label may be its id or its name.
    seq2seq: `source`, `target`. preference: `chosen`, `rejected`. instruction: `instruction`, `output`
    (other fields kept). extractive_qa: a SQuAD-format .json file, or rows with `question`, `context`,
    `answers` (a list, or one string; empty = unanswerable) and optional `answer_starts`.
    """
    task = get_task(task)
    source = str(path)
    if task.type == "extractive_qa" and source.lower().endswith(".json"):
        squad = _squad_file(Path(source).expanduser())
        if squad is not None:
            return _sample(squad, limit, seed)
    rows = [_user_row(task, file, n, row) for file, n, row in read_rows(source)]
    if not rows:
        raise DataError(f"{source}: no rows. Add examples to the file.")
    return _sample(rows, limit, seed)


def _squad_file(path: Path) -> list[dict] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_rows gives the precise error
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        return None
    try:
        return [row for article in data["data"] for row in _squad_rows(article)]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: not in the SQuAD schema ({type(e).__name__}: {e}). Expected "
            '{"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}.'
        ) from None


def _field(task: Task, file: str, n: int, row: dict, names: tuple[str, ...], required: bool = True):
    for name in names:
        if name in row and row[name] is not None and row[name] != "":
            return row[name]
    if required:
        present = ", ".join(map(repr, row)) or "none"
        raise DataError(
            f"{where(file, n)}: missing or empty field {names[0]!r} (task {task.name!r}; also accepted: "
            f"{', '.join(map(repr, names[1:])) or 'none'}). Fields present: {present}. Add or rename the column."
        )
    return None


def _user_row(task: Task, file: str, n: int, row: dict) -> dict:
    def get(*names: str, required: bool = True):
        return _field(task, file, n, row, names, required)

    if task.type in ("classification", "regression"):
        first = ("text", task.text_fields[0]) if task.text_fields else ("text",)
        second = ("text_pair", task.text_fields[1]) if task.is_pair else ("text_pair",)
        out = {"text": str(get(*first)), "text_pair": get(*second, required=task.is_pair), "label": None}
        out["text_pair"] = None if out["text_pair"] is None else str(out["text_pair"])
        raw = get("label")
        out["label"] = _score(raw, file, n) if task.type == "regression" else _label_id(task, raw, file, n)
        return out
    if task.type == "seq2seq":
        return {"source": str(get("source")), "target": str(get("target"))}
    if task.type == "preference":
        return {"chosen": str(get("chosen")), "rejected": str(get("rejected"))}
    if task.type == "extractive_qa":
        answers = row.get("answers") or []
        answers = [answers] if isinstance(answers, str) else list(answers)
        starts = row.get("answer_starts")
        out = {
            "id": str(row.get("id", n)),
            "question": str(get("question")),
            "context": str(get("context")),
            "answers": [str(a) for a in answers],
        }
        if starts is None:
            found = [out["context"].find(a) for a in out["answers"]]
            if -1 in found:
                missing = out["answers"][found.index(-1)]
                raise DataError(f"{where(file, n)}: answer {missing!r} is not in field 'context'. Fix the answer.")
            starts = found
        out["answer_starts"] = [int(s) for s in ([starts] if isinstance(starts, (int, str)) else starts)]
        return out
    if task.type == "instruction":
        get("instruction"), get("output")
        return dict(row)
    text = get("text")  # causal_lm
    return {"text": str(text)}
