"""From a grid to cells: one (model, method, task) -> one resolved tunelab Config and an eval spec.

The mapping (docs/compare.md):

  task type         encoder model (no causal-LM head)        causal LM
  ----------------  ---------------------------------------  ------------------------------------------
  classification    stage: classification, task section;     stage: sft on the train rows phrased as
                    scored by the head (the run's own dev_*  instructions (evaluation/prompts.py), dev
                    metrics at the end of training)          rows as validation; scored by the verbalizer
                                                             (tunelab.evaluation.runner)
  regression        stage: classification (1 output, MSE)    not applicable (no verbalizer for scores)
  instruction       not applicable                           stage: sft on the train rows, dev rows as
                                                             validation; scored by response perplexity

Every cell of a task sees the same rows: train and dev are seeded samples (`train_limit`, `dev_limit`,
`training.seed`) drawn the same way for the head, the verbalizer and the TF-IDF baseline. For causal
LMs the sampled rows are written once under `OUTPUT_DIR/data/` and named in `data.train` /
`data.validation`.

A cell's key is a hash of its resolved config (minus output_dir and progress) and its eval spec, plus
the content hash of any of your own data files: change anything that changes the result and the cell
runs again; rerun the same grid and finished cells are reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.compare.grid import Grid, MethodEntry, ModelEntry, TaskEntry
from tunelab.config import ConfigError

# Keys that do not change a cell's result (left out of its hash).
# Data paths are covered by the eval spec's fingerprint (the task, its limits, seed and file contents), so
# a grid folder can be moved without invalidating its cells.
_NOT_HASHED = (
    ("output_dir",),
    ("training", "progress"),
    ("training", "tensorboard"),
    ("training", "log_every"),
    ("data", "train"),
    ("data", "validation"),
    ("task", "train_file"),
    ("task", "dev_file"),
)

LOWER_IS_BETTER = {"perplexity", "loss", "eval_loss", "train_loss"}


@dataclass
class Cell:
    key: str
    model: str  # shown labels
    method: str
    task: str
    model_name: str
    method_name: str
    task_name: str
    kind: str  # causal | encoder
    mode: str  # head | verbalizer | perplexity | n/a
    config: dict | None  # the resolved config (json-mode), None when not applicable / invalid
    eval: dict = field(default_factory=dict)
    note: str | None = None  # why not applicable, or the config error

    @property
    def label(self) -> str:
        return f"{self.model} × {self.method} × {self.task}"

    def spec(self, cell_dir: Path, hooks: dict | None = None) -> dict:
        """What `python -m tunelab.compare.cell CELL.json` runs."""
        return {
            "key": self.key,
            "label": self.label,
            "cell_dir": str(cell_dir),
            "config": self.config,
            "eval": self.eval,
            "hooks": hooks or {},
        }


# ------------------------------------------------------------------------------------ helpers
def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def digest(obj, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _drop(d: dict, path: tuple) -> None:
    for k in path[:-1]:
        d = d.get(k) or {}
    if isinstance(d, dict):
        d.pop(path[-1], None)


def _causal_architecture(arches: list[str], model_type: str | None) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arches or [])


def model_kind(entry: ModelEntry) -> str:
    """causal or encoder, from `kind:` or the model's own config (architectures)."""
    if entry.kind != "auto":
        return entry.kind
    from tunelab.models import NAMED, resolve

    if entry.name in NAMED:
        return "causal" if NAMED[entry.name].kind.startswith("causal") else "encoder"
    where = resolve(entry.name)
    cfg_file = Path(where) / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        return "causal" if _causal_architecture(raw.get("architectures") or [], raw.get("model_type")) else "encoder"
    from transformers import AutoConfig  # a hub id: its config only (cached, or one small download)

    hub = AutoConfig.from_pretrained(where, trust_remote_code=bool(entry.model.get("trust_remote_code", False)))
    return "causal" if _causal_architecture(getattr(hub, "architectures", None) or [], hub.model_type) else "encoder"


def task_object(t: TaskEntry):
    """The tunelab Task behind a grid task entry (a preset, or one built for your own files)."""
    from tunelab.evaluation.tasks import Task, get_task

    if t.is_preset:
        return get_task(t.name)
    kind = t.task_type
    main = {"classification": "accuracy", "regression": "pearson", "instruction": "perplexity"}[kind]
    return Task(name=t.name, type=kind, labels=tuple(t.labels) if kind == "classification" else (), main_metric=main)


def task_rows(t: TaskEntry, split: str, seed: int) -> list[dict]:
    """The seeded sample of a task's split that every cell (and the baseline) of this grid uses."""
    from tunelab.evaluation.tasks import load_split, load_task_file

    limit = t.train_limit if split == "train" else t.dev_limit
    own = t.train_file if split == "train" else t.dev_file
    task = task_object(t)
    if own:
        return load_task_file(task, own, limit=limit, seed=seed)
    return load_split(task, split, limit=limit, seed=seed)


def task_fingerprint(t: TaskEntry, seed: int) -> dict:
    """Everything that decides a task's rows (the content of your own files included)."""
    fp = t.model_dump(exclude={"label", "model", "data", "task", "training"})
    fp["seed"] = seed
    for f in ("train_file", "dev_file"):
        if fp.get(f):
            path = Path(fp[f]).expanduser().resolve()
            fp[f], fp[f + "_sha"] = path.name, file_sha(path)  # the content, not where it lies
    return fp


def _materialise(t: TaskEntry, seed: int, out: Path) -> tuple[str, str]:
    """Write the task's sampled train / dev rows as SFT rows (instruction format) once; their paths."""
    from tunelab.evaluation.prompts import instruction_rows

    fp = task_fingerprint(t, seed)
    folder = out / "data" / f"{_safe(t.shown)}-{digest(fp, 10)}"
    paths = (folder / "train.jsonl", folder / "dev.jsonl")
    if all(p.is_file() for p in paths):
        return str(paths[0].resolve()), str(paths[1].resolve())
    folder.mkdir(parents=True, exist_ok=True)
    task = task_object(t)
    for split, path in zip(("train", "dev"), paths):
        rows = task_rows(t, split, seed)
        if task.type == "classification":
            rows = instruction_rows(task, rows)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return str(paths[0].resolve()), str(paths[1].resolve())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "x"


def seed_for(grid: Grid, t: TaskEntry) -> int:
    merged = deep_merge(grid.base, t.overrides())
    return int((merged.get("training") or {}).get("seed", 42))


# ------------------------------------------------------------------------------------ resolving
def resolve_cells(grid: Grid, out: Path, materialise: bool = True) -> list[Cell]:
    """Every cell of the grid, in models × methods × tasks order. Raises ConfigError for a grid whose
    entries give an invalid config (naming the cell), so nothing runs on a grid with a typo."""
    from tunelab.config import load_config

    kinds: dict[int, str | Exception] = {}
    for i, m in enumerate(grid.models):
        try:
            kinds[i] = model_kind(m)
        except Exception as e:  # noqa: BLE001 - recorded on each of its cells
            kinds[i] = e
    cells: list[Cell] = []
    errors: list[str] = []
    for i, m in enumerate(grid.models):
        for meth in grid.methods:
            for t in grid.tasks:
                kind = kinds[i]
                cell = _resolve_one(grid, out, m, kind, meth, t, materialise)
                if cell.config is not None:
                    try:
                        cfg = load_config(copy.deepcopy(cell.config))
                        cell.config = cfg.model_dump(mode="json")
                    except ConfigError as e:
                        errors.append(f"cell {cell.label}:\n{e}")
                        continue
                    hashed = copy.deepcopy(cell.config)
                    for path in _NOT_HASHED:
                        _drop(hashed, path)
                    ev = {k: v for k, v in cell.eval.items() if k not in ("train_file", "dev_file")}
                    cell.key = digest({"config": hashed, "eval": ev})
                    cell.config["output_dir"] = str(out / "cells" / cell.key / "run")
                    cell.config["training"]["progress"] = False
                else:
                    cell.key = digest(
                        {"model": m.name, "method": meth.model_dump(), "task": t.model_dump(), "note": cell.note}
                    )
                cells.append(cell)
    if errors:
        raise ConfigError("grid: invalid cell config\n" + "\n".join(dict.fromkeys(errors)))
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.key in seen:
            raise ConfigError(
                f"grid: cells {seen[c.key].label!r} and {c.label!r} have the same settings; "
                "drop one of the duplicate entries"
            )
        seen[c.key] = c
    return cells


def _resolve_one(grid, out, m: ModelEntry, kind, meth: MethodEntry, t: TaskEntry, materialise: bool) -> Cell:
    task = task_object(t)
    seed = seed_for(grid, t)
    base = Cell(
        key="",
        model=m.shown,
        method=meth.shown,
        task=t.shown,
        model_name=m.name,
        method_name=meth.name,
        task_name=t.name,
        kind=kind if isinstance(kind, str) else "?",
        mode="n/a",
        config=None,
    )
    if isinstance(kind, Exception):
        base.note = f"model {m.name!r}: {type(kind).__name__}: {kind}"
        return base
    ev = {
        "task": t.shown,
        "preset": task.name if t.is_preset else None,
        "type": task.type,
        "labels": list(task.labels),
        "main_metric": task.main_metric,
        "dev_limit": t.dev_limit,
        "seed": seed,
        "fingerprint": task_fingerprint(t, seed),
        # where your own files lie (not hashed: the fingerprint holds their content hash)
        "train_file": str(Path(t.train_file).expanduser().resolve()) if t.train_file else None,
        "dev_file": str(Path(t.dev_file).expanduser().resolve()) if t.dev_file else None,
    }
    cfg: dict = deep_merge({}, grid.base)
    if kind == "encoder":
        if task.type == "instruction":
            base.note = "not applicable: an encoder has no LM head for instruction tasks"
            return base
        section = {"train_limit": t.train_limit, "dev_limit": t.dev_limit}
        if t.is_preset:
            section["name"] = task.name
        else:
            section.update(name=None, type=task.type, labels=list(t.labels))
        if t.train_file:
            section["train_file"] = str(Path(t.train_file).expanduser().resolve())
            section["dev_file"] = str(Path(t.dev_file).expanduser().resolve())
        if t.max_length:
            section["max_length"] = t.max_length
        cfg = deep_merge(cfg, {"stage": "classification", "task": section})
        mode = "head"
    else:
        if task.type == "regression":
            base.note = "not applicable: a causal LM is scored with a verbalizer, which has no regression form"
            return base
        if materialise:
            train_file, dev_file = _materialise(t, seed, out)
        else:  # the paths only (tests / --only-report)
            folder = out / "data" / f"{_safe(t.shown)}-{digest(task_fingerprint(t, seed), 10)}"
            train_file, dev_file = str((folder / "train.jsonl").resolve()), str((folder / "dev.jsonl").resolve())
        data = {"train": train_file, "validation": dev_file, "format": "instruction"}
        if t.max_length:
            data["max_length"] = t.max_length
        cfg = deep_merge(cfg, {"stage": "sft", "data": data})
        mode = "verbalizer" if task.type == "classification" else "perplexity"
    for entry in (t, m, meth):
        cfg = deep_merge(cfg, entry.overrides())
    cfg = deep_merge(cfg, {"model": {"name": m.name}})
    cfg["method"] = {"name": meth.name, **meth.settings()}
    ev["mode"] = mode
    base.mode, base.eval, base.config = mode, ev, cfg
    return base
