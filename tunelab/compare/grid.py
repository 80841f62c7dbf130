"""The grid file of `tunelab compare`: models × methods × tasks, validated before anything runs.

    output_dir: runs/compare-sst2
    base:                      # a partial tunelab config applied to every cell
      training: {epochs: 1, batch_size: 8}
    models: [smollm2-135m-instruct, {name: minilm-l6, label: minilm}]
    methods:
      - {name: lora, r: 8}                    # method settings ...
      - {name: full, training: {lr: 3.0e-5}}  # ... plus optional per-method config sections
    tasks:
      - {name: sst2, train_limit: 200, dev_limit: 200}
      - {name: reviews, labels: [neg, pos], train_file: train.jsonl, dev_file: dev.jsonl}
    baselines: [tfidf]

Unknown keys are refused with the nearest valid key, like tunelab's own configs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.config import ConfigError, config_class, format_validation_error, read_yaml_mapping, yaml_line
from tunelab.data.tasks import get_task, task_names
from tunelab.methods import get as get_method
from tunelab.methods import names as method_names

# Partial config sections an entry (model, method or task) may carry; merged into each of its cells.
_SECTIONS = ("model", "data", "task", "training")
# Base keys the grid itself decides per cell.
_CELL_OWNED = ("stage", "output_dir", "method")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    label: str | None = Field(None, description="Name shown in the tables (default: derived from `name`).")
    model: dict[str, Any] = Field(default_factory=dict, description="Extra `model:` settings for these cells.")
    data: dict[str, Any] = Field(default_factory=dict, description="Extra `data:` settings for these cells.")
    task: dict[str, Any] = Field(default_factory=dict, description="Extra `task:` settings for these cells.")
    training: dict[str, Any] = Field(default_factory=dict, description="Extra `training:` settings for these cells.")

    def overrides(self) -> dict:
        return {s: dict(getattr(self, s)) for s in _SECTIONS if getattr(self, s)}


class ModelEntry(_Entry):
    name: str = Field(description="A named default, a local Hugging Face folder, a .gguf file or a hub id.")
    kind: Literal["auto", "causal", "encoder"] = Field(
        "auto", description="auto: read the model's config (a *ForCausalLM architecture = causal)."
    )

    @property
    def shown(self) -> str:
        return self.label or Path(self.name).name or self.name


class MethodEntry(_Entry):
    """`name` plus the method's own settings (validated against the method's config class)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name: str

    @model_validator(mode="after")
    def _check_method(self):
        if self.name not in method_names():
            near = difflib.get_close_matches(self.name, method_names(), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"unknown method {self.name!r}; choose one of {method_names()}.{hint}")
        fields = set(get_method(self.name).Config.model_fields)
        for key in self.settings():
            if key not in fields:
                allowed = sorted((fields - {"name"}) | {"label", *_SECTIONS})
                near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                raise ValueError(f"unknown key {key!r} for method {self.name!r}.{hint} Valid: {', '.join(allowed)}")
        try:
            get_method(self.name).Config.model_validate({"name": self.name, **self.settings()})
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']} (got {x.get('input')!r})" for x in e.errors())
            raise ValueError(f"method {self.name!r}: {bad}") from None
        return self

    def settings(self) -> dict:
        """The `method:` section for this entry (without `name`)."""
        return dict(self.model_extra or {})

    @property
    def shown(self) -> str:
        return self.label or self.name


class TaskEntry(_Entry):
    name: str = Field(description="A task preset (sst2, cola, ..., lima, alpaca) or a name for your own files.")
    type: Literal["classification", "regression", "instruction"] | None = Field(
        None, description="Your own files: classification (default), regression or instruction. Presets know theirs."
    )
    labels: list[str] = Field(default_factory=list, description="Your own classification files: class names.")
    train_file: str | None = Field(None, description="Your own train file (text, text_pair, label / alpaca rows).")
    dev_file: str | None = Field(None, description="Your own dev file (same columns).")
    train_limit: int | None = Field(None, ge=1, description="Train on a seeded sample of at most this many rows.")
    val_limit: int | None = Field(
        None,
        ge=1,
        description="Validation rows carved from the train split, disjoint from the train sample: eval loss, early "
        "stopping and the choice among learning rates (default: min(64, a fifth of the train split)).",
    )
    dev_limit: int | None = Field(
        None, ge=1, description="Score on a seeded sample of at most this many dev rows (nothing else reads them)."
    )
    max_length: int | None = Field(None, ge=8, description="Tokens per example (task.max_length and data.max_length).")

    @model_validator(mode="after")
    def _check_task(self):
        if self.name.lower() in task_names():
            preset = get_task(self.name)
            if preset.type not in ("classification", "regression", "instruction"):
                raise ValueError(
                    f"task {self.name!r} is {preset.type}; compare supports classification, regression and "
                    "instruction tasks"
                )
            if self.type is not None and self.type != preset.type:
                raise ValueError(f"task {self.name!r} is a {preset.type} preset; drop `type: {self.type}`")
            if self.labels and tuple(self.labels) != preset.labels:
                raise ValueError(f"task {self.name!r} is a preset with labels {list(preset.labels)}; drop `labels`")
            if bool(self.train_file) != bool(self.dev_file):
                raise ValueError(f"task {self.name!r}: give both train_file and dev_file, or neither")
            return self
        if not (self.train_file and self.dev_file):
            raise ValueError(
                f"task {self.name!r} is not a preset ({', '.join(task_names())}); for your own data give "
                "train_file and dev_file"
            )
        kind = self.type or "classification"
        if kind == "classification" and len(self.labels) < 2:
            raise ValueError(f"task {self.name!r}: list the class names (at least two) in `labels`")
        for f in (self.train_file, self.dev_file):
            if not Path(f).expanduser().is_file():
                raise ValueError(f"task {self.name!r}: file not found: {f}")
        return self

    @property
    def is_preset(self) -> bool:
        return self.name.lower() in task_names()

    @property
    def task_type(self) -> str:
        return get_task(self.name).type if self.is_preset else (self.type or "classification")

    @property
    def shown(self) -> str:
        return self.label or self.name


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    output_dir: str = Field("runs/compare", description="Grid folder: cells/, results.db, results.*, report.html.")
    models: list[ModelEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    tasks: list[TaskEntry] = Field(min_length=1)
    base: dict[str, Any] = Field(default_factory=dict, description="A partial tunelab config for every cell.")
    baselines: list[Literal["tfidf"]] = Field(
        default_factory=list,
        description="Classical baselines per task: tfidf = TF-IDF + logistic regression (Ridge for regression), "
        "fitted on the grid's train sample and on the whole train split.",
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="Training seeds: each trained cell runs once per seed (same rows); tables show mean ± sd. "
        "Default: the config's training.seed.",
    )
    zero_shot: bool = Field(
        True, description="Score every causal model untrained on each task (the zero-shot reference)."
    )
    score_dtype: Literal["as_loaded", "bfloat16"] = Field(
        "as_loaded",
        description="Precision of the scoring passes (dev and validation predictions): as_loaded = the model's "
        "own (fp32 on a CPU under model.dtype auto); bfloat16 = cast to bf16 where the device multiplies bf16 "
        "natively (~3x faster on such a CPU; 2 to 26 rows of 400 changed class in the demo's runs), else as "
        "loaded; causal LMs only (an encoder's head and a 4-bit base score as loaded). Part of each cell's key.",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds repeat a value: {v}")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _model_strings(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("methods", mode="before")
    @classmethod
    def _method_strings(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_strings(cls, v):
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @field_validator("base")
    @classmethod
    def _check_base(cls, v):
        owned = [k for k in _CELL_OWNED if k in v]
        if owned:
            raise ValueError(
                f"base.{owned[0]} is decided per cell (stage from the model and task, method from `methods:`, "
                "output_dir under the grid's output_dir); remove it"
            )
        return v

    @model_validator(mode="after")
    def _unique_labels(self):
        for what, entries in (("models", self.models), ("methods", self.methods), ("tasks", self.tasks)):
            seen: dict[str, int] = {}
            for i, e in enumerate(entries):
                if e.shown in seen:
                    raise ValueError(
                        f"{what}[{seen[e.shown]}] and {what}[{i}] are both shown as {e.shown!r}; give one a `label:`"
                    )
                seen[e.shown] = i
        return self


# ------------------------------------------------------------------------------------- loading
def _fields_for(loc: tuple) -> list[str]:
    cls: Any = Grid
    for part in loc:
        if isinstance(part, int):
            continue
        f = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if f is None:
            return []
        ann = f.annotation
        args = getattr(ann, "__args__", ())
        inner = args[0] if args and isinstance(args[0], type) else ann
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        cls = inner
    return list(cls.model_fields)


def format_grid_error(err: ValidationError, source: str, text: str | None = None) -> str:
    lines = [f"{source}: invalid grid"]
    for e in err.errors():
        loc = tuple(e["loc"])
        shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        at = yaml_line(text, loc)
        where = f" (line {at})" if at else ""
        if e["type"] == "extra_forbidden":
            fields = _fields_for(loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), fields, n=1, cutoff=0.5)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            lines.append(f"  - unknown key '{shown}'{where}.{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            lines.append(f"  - {shown or '(top level)'}{where}: {msg}{got}")
    return "\n".join(lines)


def load_grid(source: str | Path | dict) -> Grid:
    """Read and validate a grid (YAML path or dict); ConfigError with a readable message otherwise.

    Relative `train_file` / `dev_file` / `output_dir` in a YAML file stay relative to the current folder,
    like every other tunelab path.
    """
    name, text = "grid", None
    if isinstance(source, dict):
        raw = dict(source)
    else:
        name = str(source)
        raw, text = read_yaml_mapping(source, "grid", "output_dir, models, methods, tasks, base")
    try:
        grid = Grid.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_grid_error(e, name, text)) from None
    _check_base_config(grid, name)
    return grid


def _check_base_config(grid: Grid, name: str) -> None:
    """`base:` must be a valid (partial) tunelab config on its own: unknown keys are caught here, once."""
    try:
        config_class().model_validate(grid.base)
    except ValidationError as e:
        msg = format_validation_error(e, f"{name}: base", None)
        raise ConfigError(msg.replace("invalid config", "invalid base config")) from None
