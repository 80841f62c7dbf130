"""From a grid to cells: one (model, method, task) -> one resolved tunelab Config and an eval spec.

The mapping (docs/compare.md):

  task type         encoder model (no causal-LM head)        causal LM
  ----------------  ---------------------------------------  ------------------------------------------
  classification    stage: classification, task section;     stage: sft on the train rows phrased as
                    scored by the head (the run's own dev_*  instructions (data/prompts.py), dev
                    metrics at the end of training)          rows as validation; scored by the verbalizer
                                                             (tunelab.evaluation.runner)
  regression        stage: classification (1 output, MSE)    not applicable (no verbalizer for scores)
  instruction       not applicable                           stage: sft on the train rows, dev rows as
                                                             validation; scored by response perplexity

Every cell of a task sees the same rows. The task's train split is cut once, seeded, into a validation
part (`val_limit` rows) and the train sample (`train_limit` rows, disjoint from it); the dev sample
(`dev_limit`) is what every cell is scored on and nothing else ever reads. Validation rows give the
eval loss, early stopping and the choice among learning rates (`training: {lr: [...]}`). The rows are
written once under `OUTPUT_DIR/data/` (task rows, plus instruction rows for causal LMs) and named in
each cell's config; the head, the verbalizer, the references and the TF-IDF baseline read the same files.

`seeds: [0, 1, 2]` repeats each trained cell once per training seed; the rows stay the same (they are
drawn with the task's own seed), so the cells of a task stay paired across seeds.

A cell's key is a hash of its resolved config (minus output_dir and progress) and its eval spec, plus
the content hash of any of your own data files and of a local model or starting adapter, and for a hub id the
commit its branch names when the grid is planned (the cell then loads that commit): change anything that changes
the result and the cell runs again; rerun the same grid and finished cells are reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.compare.grid import Grid, MethodEntry, ModelEntry, TaskEntry
from tunelab.config import ConfigError, load_config
from tunelab.data.errors import DataError
from tunelab.data.prompts import instruction_rows
from tunelab.data.tasks import Task, get_task, load_split, load_task_file
from tunelab.models import NAMED, resolve
from tunelab.models.loading import hub_revision_commit
from tunelab.models.sources import adapter_folder

# Keys that do not change a cell's result (left out of its hash).
# Data paths are covered by the eval spec's fingerprint (the task, its limits, seed and file contents), so
# a grid folder can be moved without invalidating its cells.
_NOT_HASHED = (
    ("output_dir",),
    ("training", "progress"),
    ("training", "tensorboard"),  # the setting before report_to: a grid folder of that time keeps its cells
    ("training", "report_to"),
    ("training", "run_name"),
    ("training", "tracker_project"),
    ("training", "log_every"),
    ("data", "train"),
    ("data", "validation"),
    ("task", "train_file"),
    ("task", "dev_file"),
)

# Fields added after grids were run, left out of the hash while at their default (the behaviour from before they
# existed), so a grid folder of that time keeps its cells: (path, default).
HASHED_WHEN_SET = (
    (("model", "new_special_tokens"), []),
    (("method", "use_rslora"), False),
    (("method", "use_dora"), False),
    (("method", "loraplus_lr_ratio"), None),
    (("method", "init"), "default"),
    (("method", "pissa_niter"), 16),
    (("method", "start_from"), None),
    (("training", "checkpoint_layers"), None),
    (("training", "optimizer_state"), "auto"),
    (("training", "saved_activations"), "auto"),
    (("training", "evals_per_epoch"), None),
    (("training", "saves_per_epoch"), None),
    (("training", "neftune_alpha"), None),
    (("data", "columns", "label"), "label"),
    (("dpo", "simpo_gamma"), 0.5),
    (("dpo", "sft_weight"), 0.0),
    (("kto",), {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
)


ZERO_SHOT = "zero-shot"


@dataclass
class Cell:
    key: str
    model: str  # shown labels
    method: str
    task: str
    model_name: str
    method_name: str
    task_name: str
    kind: str  # causal | encoder (baseline for a reference fitted in-process, references.py)
    mode: str  # head | verbalizer | perplexity | n/a (the reference's name for those)
    config: dict | None  # the resolved config (json-mode), None when not applicable / invalid
    eval: dict = field(default_factory=dict)
    note: str | None = None  # why not applicable, or the config error
    seed: int | None = None  # the training seed (None for a reference)
    sweep: list[float] | None = None  # learning rates to choose among on the validation rows
    role: str = "method"  # method | reference (zero-shot here; majority, tfidf, tfidf-full in references.py)

    @property
    def label(self) -> str:
        seed = "" if self.seed is None else f" × seed {self.seed}"
        return f"{self.model} × {self.method} × {self.task}{seed}"

    @property
    def folder(self) -> str:
        """A readable folder name: model-method-task-seedN-<short key>."""
        seed = "" if self.seed is None else f"-seed{self.seed}"
        return (
            f"{safe_name(self.model, 30)}-{safe_name(self.method, 24)}-{safe_name(self.task, 24)}{seed}-{self.key[:8]}"
        )

    def spec(self, cell_dir: Path, hooks: dict | None = None) -> dict:
        """What `python -m tunelab.compare.cell CELL.json` runs."""
        return {
            "key": self.key,
            "label": self.label,
            "cell_dir": str(cell_dir),
            "config": self.config,
            "eval": self.eval,
            "sweep": self.sweep,
            "zero_shot": self.role == "reference",
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


def weights_sha(where: str | None, out: Path, adapter: bool = False) -> str | None:
    """The content hash of the local model (model.name) or LoRA adapter (method.start_from, `adapter`) that
    `where` names: its folder's files (a tunelab run's final/ for an adapter), or the .gguf file itself. None for a
    named default (fixed content) or a hub id (keyed by the commit its revision names: `_finish`). A model retrained in place at
    the same path then runs its cells again instead of reusing results from the old weights. Each file's hash is kept in OUTPUT_DIR's
    fingerprints.json under its size and mtime, so a big model is read once, not at every `tunelab compare`."""
    if not where or where in NAMED:
        return None
    path = Path(where).expanduser()
    if not path.exists():
        return None
    if adapter:
        path = adapter_folder(path) or path
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and f.name[0] != ".")
    cache_file = out / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    parts, changed = [], False
    for f in files:
        st, name = f.stat(), str(f.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        if (cache.get(name) or {}).get("stat") != stamp:
            cache[name], changed = {"stat": stamp, "sha": file_sha(f)}, True
        parts.append([f.name, cache[name]["sha"]])
    if changed and out.is_dir():
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_file)
    return digest(parts)


def _drop(d: dict, path: tuple) -> None:
    for k in path[:-1]:
        d = d.get(k) or {}
    if isinstance(d, dict):
        d.pop(path[-1], None)


def _get(d: dict, path: tuple, missing=None):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return missing
        d = d[k]
    return d


def _causal_architecture(arches: list[str], model_type: str | None) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arches or [])


def model_kind(entry: ModelEntry) -> str:
    """causal or encoder, from `kind:` or the model's own config (architectures)."""
    if entry.kind != "auto":
        return entry.kind

    if entry.name in NAMED:
        return "causal" if NAMED[entry.name].kind.startswith("causal") else "encoder"
    where = resolve(entry.name)
    cfg_file = Path(where) / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        return "causal" if _causal_architecture(raw.get("architectures") or [], raw.get("model_type")) else "encoder"
    from transformers import AutoConfig  # a hub id: its config only (cached, or one small download)

    hub = AutoConfig.from_pretrained(where, revision=entry.model.get("revision"),
                                     trust_remote_code=bool(entry.model.get("trust_remote_code", False)))  # fmt: skip
    return "causal" if _causal_architecture(getattr(hub, "architectures", None) or [], hub.model_type) else "encoder"


def task_object(t: TaskEntry):
    """The tunelab Task behind a grid task entry (a preset, or one built for your own files)."""
    if t.is_preset:
        return get_task(t.name)
    kind = t.task_type
    main = {"classification": "accuracy", "regression": "pearson", "instruction": "perplexity"}[kind]
    return Task(name=t.name, type=kind, labels=tuple(t.labels) if kind == "classification" else (), main_metric=main)


def task_from_eval(ev: dict):
    """The Task a cell is scored on, from its eval spec (a preset, or your own classes)."""
    if ev.get("preset"):
        return get_task(ev["preset"])
    return Task(
        name=ev["fingerprint"]["name"], type=ev["type"], labels=tuple(ev["labels"]), main_metric=ev["main_metric"]
    )


def _split_rows(t: TaskEntry, split: str) -> list[dict]:
    own = t.train_file if split == "train" else t.dev_file
    return load_task_file(task_object(t), own) if own else load_split(task_object(t), split)


def val_size(t: TaskEntry, n_train_split: int) -> int:
    """Validation rows carved from the train split: `val_limit`, or min(64, a fifth of the split)."""
    if t.val_limit is not None:
        return min(t.val_limit, max(n_train_split - 1, 0))
    return min(64, n_train_split // 5)


def task_splits(t: TaskEntry, seed: int) -> dict[str, list[dict]]:
    """{"train", "val", "dev"}: the rows every cell, reference and baseline of this task uses.

    One seeded permutation of the train split: its first `val_size` rows are the validation part, the
    next `train_limit` the train sample, so the two never overlap and a larger train_limit only adds rows.
    The dev sample is seeded too and is only ever scored.
    """
    import random

    full = _split_rows(t, "train")
    order = list(range(len(full)))
    random.Random(seed).shuffle(order)
    n_val = val_size(t, len(full))
    rest = order[n_val:]
    if t.train_limit is not None:
        rest = rest[: t.train_limit]
    if not rest:
        raise DataError(f"task {t.shown!r}: no train rows left after {n_val} validation rows; lower val_limit")
    task = task_object(t)
    dev = load_task_file(task, t.dev_file, limit=t.dev_limit, seed=seed) if t.dev_file else None
    if dev is None:
        dev = load_split(task, "dev", limit=t.dev_limit, seed=seed)
    return {
        "train": [full[i] for i in sorted(rest)],
        "val": [full[i] for i in sorted(order[:n_val])],
        "dev": dev,
        "train_full": full,
    }


def task_rows(t: TaskEntry, split: str, seed: int) -> list[dict]:
    """One of task_splits' parts ("train", "val", "dev", "train_full")."""
    return task_splits(t, seed)[split]


def task_fingerprint(t: TaskEntry, seed: int) -> dict:
    """Everything that decides a task's rows (the content of your own files included)."""
    fp = t.model_dump(exclude={"label", "model", "data", "task", "training"})
    fp["seed"] = seed
    for f in ("train_file", "dev_file"):
        if fp.get(f):
            path = Path(fp[f]).expanduser().resolve()
            fp[f], fp[f + "_sha"] = path.name, file_sha(path)  # the content, not where it lies
    return fp


def data_folder(t: TaskEntry, seed: int, out: Path) -> Path:
    return out / "data" / f"{safe_name(t.shown)}-{digest(task_fingerprint(t, seed), 10)}"


def _materialise(t: TaskEntry, seed: int, out: Path) -> dict[str, str]:
    """Write the task's rows once: {train,val,dev}.jsonl as task rows and, for classification, the same
    train / val rows as instructions ({train,val}.sft.jsonl) for causal LMs. Returns name -> path."""
    folder = data_folder(t, seed, out)
    paths = data_paths(folder)
    if all(Path(p).is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    task = task_object(t)
    splits = task_splits(t, seed)
    for name in ("train", "val", "dev"):
        _write_jsonl(Path(paths[name]), splits[name])
        sft = instruction_rows(task, splits[name]) if task.type == "classification" else splits[name]
        if name != "dev":
            _write_jsonl(Path(paths[name + ".sft"]), sft)
    return paths


def data_paths(folder: Path) -> dict[str, str]:
    names = ("train", "val", "dev", "train.sft", "val.sft")
    return {n: str((folder / f"{n}.jsonl").resolve()) for n in names}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def safe_name(name: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:n] or "x"


def seed_for(grid: Grid, t: TaskEntry) -> int:
    merged = deep_merge(grid.base, t.overrides())
    return int((merged.get("training") or {}).get("seed", 42))


# ------------------------------------------------------------------------------------ resolving
def resolve_cells(grid: Grid, out: Path, materialise: bool = True) -> list[Cell]:
    """Every cell of the grid: per task, a zero-shot reference per causal model, then models × methods
    × seeds. Raises ConfigError for a grid whose entries give an invalid config (naming the cell), so
    nothing runs on a grid with a typo."""
    kinds: dict[int, str | Exception] = {}
    for i, m in enumerate(grid.models):
        try:
            kinds[i] = model_kind(m)
        except Exception as e:  # noqa: BLE001 - recorded on each of its cells
            kinds[i] = e
    cells: list[Cell] = []
    errors: list[str] = []
    commits: dict = {}  # (hub id, revision) -> the commit it names now, asked once per grid
    for t in grid.tasks:
        for i, m in enumerate(grid.models):
            if grid.zero_shot and kinds[i] == "causal" and task_object(t).type != "regression":
                cell = _resolve_one(grid, out, m, kinds[i], None, t, None, materialise)
                _finish(cell, out, errors, commits)
                cells.append(cell)
            for meth in grid.methods:
                for seed in grid.seeds or [None]:
                    cell = _resolve_one(grid, out, m, kinds[i], meth, t, seed, materialise)
                    _finish(cell, out, errors, commits)
                    cells.append(cell)
    if errors:
        raise ConfigError("grid: invalid cell config\n" + "\n".join(dict.fromkeys(errors)))
    cells = [c for c in cells if c.key]
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.key in seen:
            raise ConfigError(
                f"grid: cells {seen[c.key].label!r} and {c.label!r} have the same settings; "
                "drop one of the duplicate entries"
            )
        seen[c.key] = c
    return cells


def _finish(cell: Cell, out: Path, errors: list[str], commits: dict) -> None:
    """Validate a cell's config (each learning rate of a sweep), then give it its key and run folder. A hub id's
    branch is keyed by the commit it names now, and the cell runs at that commit (model.revision pinned)."""
    if cell.config is None:
        cell.key = digest({"model": cell.model_name, "method": cell.method, "task": cell.eval or cell.task,
                           "seed": cell.seed, "note": cell.note})  # fmt: skip
        return
    try:
        for lr in cell.sweep or [None]:
            raw = copy.deepcopy(cell.config)
            if lr is not None:
                raw["training"]["lr"] = lr
            cfg = load_config(raw)
        cell.config = cfg.model_dump(mode="json")
    except ConfigError as e:
        errors.append(f"cell {cell.label}:\n{e}")
        return
    hashed = copy.deepcopy(cell.config)
    for path in _NOT_HASHED:
        _drop(hashed, path)
    for path, default in HASHED_WHEN_SET:
        if _get(hashed, path, default) == default:
            _drop(hashed, path)
    if cell.role == "reference":  # nothing trains: only the model and how it is scored matter
        hashed = {"model": hashed["model"], "data": hashed.get("data"), "task": hashed.get("task")}
    ev = {k: v for k, v in cell.eval.items() if k not in PATH_KEYS}
    sweep = {"lr": cell.sweep, "select": SELECTION} if cell.sweep else None
    keyed = {"config": hashed, "eval": ev, "sweep": sweep, "role": cell.role}
    weights = {"model": weights_sha(cfg.model.name, out)}
    if cell.role != "reference":
        weights["start_from"] = weights_sha(getattr(cfg.method, "start_from", None), out, adapter=True)
    where = (cfg.model.name, cfg.model.revision)
    if where not in commits:
        commits[where] = hub_revision_commit(*where)
    weights["commit"] = commits[where]
    if any(weights.values()):  # local weights: their content, not only their path (named models keep their keys)
        keyed["weights"] = {k: v for k, v in weights.items() if v}
    cell.key = digest(keyed)
    if commits[where]:  # what the key says: a branch that moves between here and the load does not change it
        cell.config["model"]["revision"] = commits[where]
    cell.config["output_dir"] = str(out / "cells" / cell.folder / "run")
    cell.config["training"]["progress"] = False


# how a sweep picks its learning rate (compare/cell.py `_choose`): part of a sweeping cell's key, so a
# change of rule runs the cell again instead of reusing a choice made the old way
SELECTION = "validation class log-loss, then main metric"

# eval spec entries that say where files lie (their content is in the task fingerprint)
PATH_KEYS = ("train_file", "dev_file", "rows")


def _sweep(cfg: dict, label: str) -> list[float] | None:
    """`training: {lr: [a, b, c]}` -> the sorted distinct learning rates (the config keeps the first)."""
    lr = (cfg.get("training") or {}).get("lr")
    if not isinstance(lr, list):
        return None
    if not lr or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lr):
        raise ConfigError(f"grid: {label}: training.lr must be a number or a list of positive numbers, got {lr!r}")
    lrs = sorted({float(x) for x in lr})
    cfg["training"]["lr"] = lrs[0]
    return lrs if len(lrs) > 1 else None


def _resolve_one(grid, out, m: ModelEntry, kind, meth: MethodEntry | None, t: TaskEntry, seed, materialise) -> Cell:
    """One cell; `meth` None is the zero-shot reference of a causal model (nothing trains)."""
    task = task_object(t)
    data_seed = seed_for(grid, t)
    base = Cell(
        key="",
        model=m.shown,
        method=meth.shown if meth else ZERO_SHOT,
        task=t.shown,
        model_name=m.name,
        method_name=meth.name if meth else ZERO_SHOT,
        task_name=t.name,
        kind=kind if isinstance(kind, str) else "?",
        mode="n/a",
        config=None,
        seed=seed,
        role="method" if meth else "reference",
    )
    if isinstance(kind, Exception):
        base.note = f"model {m.name!r}: {type(kind).__name__}: {kind}"
        return base
    folder = data_folder(t, data_seed, out)
    paths = _materialise(t, data_seed, out) if materialise else data_paths(folder)
    ev = {
        "task": t.shown,
        "preset": task.name if t.is_preset else None,
        "type": task.type,
        "labels": list(task.labels),
        "main_metric": task.main_metric,
        "dev_limit": t.dev_limit,
        "seed": data_seed,
        "fingerprint": task_fingerprint(t, data_seed),
        # where the rows lie (not hashed: the fingerprint decides them)
        "rows": {"train": paths["train"], "val": paths["val"], "dev": paths["dev"]},
    }
    if grid.score_dtype != "as_loaded":  # keyed only when set: the cells of grids from before it keep their keys
        ev["score_dtype"] = grid.score_dtype
    cfg: dict = deep_merge({}, grid.base)
    if kind == "encoder":
        if task.type == "instruction":
            base.note = "not applicable: an encoder has no LM head for instruction tasks"
            return base
        # the stage trains on the train sample and validates on the validation rows; the dev rows are
        # scored by the cell afterwards (tunelab/compare/cell.py), never seen in training
        section = {"name": task.name if t.is_preset else None, "train_file": paths["train"], "dev_file": paths["val"]}
        if not t.is_preset:
            section.update(type=task.type, labels=list(t.labels))
        if t.max_length:
            section["max_length"] = t.max_length
        cfg = deep_merge(cfg, {"stage": "classification", "task": section})
        mode = "head"
    else:
        if task.type == "regression":
            base.note = "not applicable: a causal LM is scored with a verbalizer, which has no regression form"
            return base
        data = {"train": paths["train.sft"], "validation": paths["val.sft"], "format": "instruction"}
        if t.max_length:
            data["max_length"] = t.max_length
        cfg = deep_merge(cfg, {"stage": "sft", "data": data})
        mode = "verbalizer" if task.type == "classification" else "perplexity"
    for entry in (t, m, meth) if meth else (t, m):
        cfg = deep_merge(cfg, entry.overrides())
    cfg = deep_merge(cfg, {"model": {"name": m.name}})
    cfg["method"] = {"name": meth.name, **meth.settings()} if meth else {"name": "full"}
    cfg.setdefault("training", {})
    if meth is None:
        cfg["training"]["lr"] = 1e-5  # a placeholder: the zero-shot reference trains nothing
    elif seed is not None:
        cfg["training"]["seed"] = seed
    else:  # no `seeds:` list: the seed the merged config gives (default 42)
        base.seed = int(cfg["training"].get("seed", 42))
    base.sweep = _sweep(cfg, base.label)
    ev["mode"] = mode
    base.mode, base.eval, base.config = mode, ev, cfg
    return base
