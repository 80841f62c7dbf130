"""The Train tab: a form that writes the YAML `tunelab train` runs, checked as `tunelab config` checks it.

The form is generated from the typed configs: each method's settings are the fields of its own pydantic
`Config` (tunelab/methods/*.py), the data and training settings a chosen subset of `DataConfig` and
`TrainingConfig`, each field with its default and its description as help. A field's text is read as YAML,
as a YAML file or `--set` would give it, so a bad value reaches the same validation and gives the same
ConfigError as the CLI; the error is shown beside the field it names.

Start writes the YAML into the run folder (`ui.yaml`) and runs `tunelab train ui.yaml --output-dir RUN` as a
background job (jobs.py): an ordinary run folder that `tunelab train RUN/ui.yaml --resume` continues.
"""

from __future__ import annotations

import re
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tunelab.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    DPOConfig,
    KTOConfig,
    PPOConfig,
    RewardConfig,
    TaskConfig,
    TrainingConfig,
)
from tunelab.errors import user_errors
from tunelab.interop.convert import load_any
from tunelab.methods import registry
from tunelab.models import NAMED
from tunelab.plugins import STAGES
from tunelab.ui import jobs
from tunelab.ui.context import UIContext, on_page_load

UI_YAML = "ui.yaml"  # the config a UI run was started with, in its run folder (config.yaml is the full dump)

DATA_FIELDS = ("format", "limit", "val_fraction", "max_length", "packing", "train_on_prompt", "system_prompt")
TRAINING_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio",
                   "eval_every", "save_every", "seed")  # fmt: skip

# the shared data sets (tunelab.data.tasks.shared_data_dir) a run can train on as they are: label -> file
DATA_PRESETS = {
    "alpaca demo (LLaMA-Factory, instruction)": "llamafactory-demo/alpaca_en_demo.json",
    "alpaca tiny (100 rows, instruction)": "alpaca/alpaca_tiny.json",
    "lima (instruction)": "lima/lima.json",
    "dolly (instruction)": "dolly/dolly.json",
    "dpo demo (LLaMA-Factory, preference)": "llamafactory-demo/dpo_en_demo.json",
    "tinyshakespeare (text)": "tinyshakespeare/input.txt",
}
DATA_SOURCES = ("preset", "upload", "path")
# the stages that read a `task:` (a preset or your own files) rather than `data:`
TASK_STAGES = ("classification", "extractive_qa", "seq2seq")
# the stages with a settings section of their own (config keys dpo.*, kto.*, distill.*, ppo.*, ppo.reward.*)
STAGE_SECTIONS = {"dpo": [(DPOConfig, "dpo")], "kto": [(KTOConfig, "kto")], "distill": [(DistillConfig, "distill")],
                  "ppo": [(PPOConfig, "ppo"), (RewardConfig, "ppo.reward")]}  # fmt: skip
TASK_FIELDS = ("name", "type", "labels", "train_file", "dev_file", "train_limit", "dev_limit", "max_length")


@dataclass(frozen=True)
class FormField:
    key: str  # dotted config key, e.g. method.r
    kind: str  # text | bool | choice
    default: Any
    choices: tuple = ()
    help: str = ""

    @property
    def label(self) -> str:
        return self.key.split(".", 1)[1]


def _literal_values(ann) -> tuple[tuple, bool] | None:
    """(values, optional) of a Literal or Optional[Literal] annotation, else None."""
    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return args, False
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        lits = [a for a in args if typing.get_origin(a) is Literal]
        if len(lits) == 1 and len(args) == 2 and type(None) in args:
            return typing.get_args(lits[0]), True
    return None


def schema_fields(cls, section: str, names: tuple[str, ...] | None = None) -> list[FormField]:
    """Form fields for a pydantic config class: a checkbox for a bool, a choice for a Literal, else text."""
    out = []
    for name, f in cls.model_fields.items():
        if (section == "method" and name == "name") or (
            names is not None and name not in names
        ):  # name: the union's tag
            continue
        default = f.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):  # a nested section (ppo.reward) gets fields of its own
            continue
        lit = _literal_values(f.annotation)
        if f.annotation is bool:
            kind, choices = "bool", ()
        elif lit is not None:
            kind, choices = "choice", tuple(lit[0]) + ((None,) if lit[1] else ())
        else:
            kind, choices = "text", ()
        out.append(FormField(f"{section}.{name}", kind, default, choices, f.description or ""))
    if names is not None:
        out.sort(key=lambda x: names.index(x.label))
    return out


def method_fields(name: str) -> list[FormField]:
    return schema_fields(registry.get(name).Config, "method")


def data_fields() -> list[FormField]:
    return schema_fields(DataConfig, "data", DATA_FIELDS)


def stage_fields(stage: str) -> list[FormField]:
    return [f for cls, section in STAGE_SECTIONS.get(stage, []) for f in schema_fields(cls, section)]


def active(key: str, method: str, stage: str) -> bool:
    """Whether a form field counts: the shared ones, and those of the chosen method (`lora:method.r`) or
    stage (`dpo:dpo.beta`)."""
    return ":" not in key or key.split(":", 1)[0] in (method, stage)


def task_fields() -> list[FormField]:
    return schema_fields(TaskConfig, "task", TASK_FIELDS)


def training_fields() -> list[FormField]:
    return schema_fields(TrainingConfig, "training", TRAINING_FIELDS)


def shown(field: FormField) -> Any:
    """The field's default as the form shows it: YAML text (empty for null), a bool, or a choice."""
    if field.kind == "bool":
        return bool(field.default)
    if field.kind == "choice":
        return "null" if field.default is None else field.default
    if field.default is None:
        return ""
    if isinstance(field.default, str):
        return field.default
    text = yaml.safe_dump(field.default, default_flow_style=True).strip()
    return text.removesuffix("...").strip()


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse(field: FormField, raw: Any) -> tuple[bool, Any]:
    """(set, value) of what the form holds: unset when it is empty or the default, so the YAML keeps only
    what was chosen. Text is read as YAML (as in a config file); what does not parse stays a string, which
    the config's validation then names."""
    if field.kind == "bool":
        value = bool(raw)
    elif field.kind == "choice":
        value = None if raw in (None, "null") else raw
    else:
        text = "" if raw is None else str(raw).strip()
        if not text:
            return False, None
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and not isinstance(field.default, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; a number box means the number
    default = list(field.default) if isinstance(field.default, tuple) else field.default
    return value != default, value


def preset_path(label: str) -> str:
    from tunelab.data.tasks import shared_data_dir

    return str(shared_data_dir() / DATA_PRESETS[label])


def available_presets() -> list[str]:
    from tunelab.data.tasks import shared_data_dir

    root = shared_data_dir()
    return [label for label, rel in DATA_PRESETS.items() if (root / rel).is_file()]


def kept_upload(ctx: UIContext, upload: str) -> str:
    """A copy of an uploaded file under the runs folder, named by its content: Gradio's upload cache is
    temporary, and a run (and its --resume, later) must find its data where its config says."""
    import hashlib
    import shutil

    src = Path(upload)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    dest = ctx.runs / ".ui-uploads" / f"{digest}-{src.name}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return str(dest)


def data_path(ctx: UIContext, source: str, preset: str | None, upload: str | None, path: str | None) -> str | None:
    """The data.train of the form: a preset's file, the uploaded file (kept), or the path typed."""
    if source == "preset":
        return preset_path(preset) if preset in DATA_PRESETS else None
    if source == "upload":
        return kept_upload(ctx, upload) if upload and Path(upload).is_file() else None
    text = (path or "").strip()
    return str(Path(text).expanduser().resolve()) if text and Path(text).expanduser().exists() else (text or None)


def form_config(run_dir: Path, model: str, stage: str, method: str, train: str | None, fields: list[FormField],
                values: list) -> dict:  # fmt: skip
    """The config dict of the form: model, stage, method and data, then every field that differs from its default."""
    model = (model or "").strip()
    if model and Path(model).expanduser().exists():  # the job may run from another folder
        model = str(Path(model).expanduser().resolve())
    cfg: dict = {"output_dir": str(run_dir), "stage": stage, "model": {"name": model}, "method": {"name": method}}
    cfg["data"] = {"train": train} if train else {}
    cfg["training"] = {}
    for field, raw in zip(fields, values):
        set_, value = parse(field, raw)
        if set_:
            *sections, key = field.key.split(".")
            node = cfg
            for section in sections:
                node = node.setdefault(section, {})
            node[key] = value
    return {k: v for k, v in cfg.items() if v != {}}


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def check(yaml_path: Path):
    """The config in `yaml_path` as `tunelab config` checks it: validated, then its data read and checked (the
    errors `train` would meet before a model loads). Returns the Config; raises the CLI's errors."""
    from tunelab.stages import get as get_stage

    cfg = load_any(str(yaml_path), None, report=None)[0]
    stage = get_stage(cfg.stage, cfg)
    if cfg.data.train and stage.check_data is not None:
        stage.check_data(cfg)
    return cfg


def check_text(yaml_text: str, yaml_path: Path) -> tuple[Any, str | None]:
    """(Config or None, the error message `tunelab config YAML_PATH` prints after `tunelab: error: `)."""
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml_text)
    try:
        return check(yaml_path), None
    except user_errors() as e:
        return None, str(e)


_KEY = re.compile(r"\b((?:model|data|method|training|task|stage|output_dir)(?:\.[A-Za-z_][\w]*)*)")


def errors_by_key(message: str, keys: list[str]) -> dict[str, str]:
    """The lines of an error message that name a form field (by its dotted key), per key, each after the
    message's heading (the file it names); lines naming no field under ''."""
    heading: list[str] = []
    out: dict[str, list[str]] = {}
    for line in message.splitlines():
        named = [k for k in _KEY.findall(line) if k in keys]
        if not named and not out:
            heading.append(line.strip())
            continue
        out.setdefault(named[-1] if named else "", []).append(line.strip())
    if not out:
        return {"": "\n".join(heading)}
    return {k: "\n".join(heading + v) for k, v in out.items()}


def size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def estimate(cfg) -> str:
    """Trainable parameters (counted as `tunelab methods` counts them: the method applied to the model built on
    the meta device, no weights) and the memory weights, gradients, AdamW moments and activations take."""
    from transformers import AutoConfig

    from tunelab.methods.summary import meta_model, method_row
    from tunelab.models import count_parameters, resolve
    from tunelab.training.harness import activation_bytes, available_memory

    if cfg.model.architecture:
        return "a model built from scratch: `tunelab models --sizes CONFIG` counts it"
    config = AutoConfig.from_pretrained(resolve(cfg.model.name), revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)  # fmt: skip
    row = method_row(cfg.method.name, config, settings=cfg.method)
    if row["trainable"] is None:
        return f"trainable parameters: {row['note']}"
    total, trainable = row["total"], row["trainable"]
    base = count_parameters(meta_model(config))[1]  # the model before the method (what the % is of)
    quantized = registry.get(cfg.method.name).CAPABILITIES.quantized_base
    frozen_bytes = (total - trainable) * (0.55 if quantized else 4)  # NF4: 4 bits + block scales
    state = trainable * 16  # fp32 weight, gradient and AdamW's two moments
    rows = cfg.training.batch_size if cfg.training.rows_per_pass is None else cfg.training.rows_per_pass
    acts = activation_bytes(rows, cfg.data.max_length, config, 4)
    need = frozen_bytes + state + acts
    free = available_memory()
    lines = [
        f"**trainable parameters**: {trainable:,} ({row['percent']:.3g}% of the model's {base:,}; {total:,} in all)"
        + (f" — {row['note']}" if row["note"] else ""),
        f"**memory** ≈ {size(need)}: frozen weights {size(frozen_bytes)}, trained weights with their gradients "
        f"and AdamW moments {size(state)}, activations ~{size(acts)} a pass ({rows} rows × {cfg.data.max_length} "
        "tokens; an estimate within ~2x)" + (f"; {size(free)} available now" if free else ""),
    ]
    return "\n\n".join(lines)


def preview(cfg, rows: int = 3) -> tuple[str, list[list[tuple[str, str | None]]]]:
    """(detected format, the first rows rendered with the model's chat template as (text, 'loss' | None)
    pieces): the tokens the loss is computed on, exactly as training renders them (data/templating.py)."""
    from tunelab.data.errors import where
    from tunelab.data.formats import resolved
    from tunelab.data.sources import read_sources
    from tunelab.data.templating import IGNORE, render_example
    from tunelab.models import load_tokenizer

    found, configs = read_sources(cfg.data, cfg.training.seed, cfg.stage)
    tokenizer = load_tokenizer(cfg.model)
    formats, out = [], []
    for file, number, row in found[:rows]:
        c = resolved(row, configs.get(file, cfg.data), where(file, number), cfg.stage)
        formats.append(c.format)
        ex = render_example(row, c, tokenizer, where=where(file, number))
        ex["input_ids"] = ex["input_ids"][: cfg.data.max_length]
        pieces: list[tuple[str, str | None]] = []
        start = 0
        ids, labels = ex["input_ids"], ex["labels"]
        for i in range(1, len(ids) + 1):
            if i == len(ids) or (labels[i] == IGNORE) != (labels[start] == IGNORE):
                pieces.append((tokenizer.decode(ids[start:i]), None if labels[start] == IGNORE else "loss"))
                start = i
        out.append(pieces)
    return ", ".join(dict.fromkeys(formats)) or "no rows", out


def run_dir_of(ctx: UIContext, name: str) -> Path:
    name = (name or "").strip()
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"run name {name!r}: give a folder name (letters, digits, - or _), made under {ctx.runs}")
    return ctx.runs / name


def start_run(ctx: UIContext, run_dir: Path, yaml_text: str, resume: bool = False) -> jobs.Job:
    """Write the YAML into the run folder and start `tunelab train` on it as a background job."""
    if not resume and ((run_dir / "results.json").exists() or (run_dir / "checkpoints").is_dir()):
        raise ConfigError(f"{run_dir} already holds a run: choose another run name, or Resume it")
    # a run the CLI started has no ui.yaml: its config.yaml (the full config, written at its start) resumes it
    path = next((run_dir / n for n in (UI_YAML, "config.yaml") if (run_dir / n).is_file()), None)
    if resume and path is None:
        raise ConfigError(f"{run_dir}: no {UI_YAML} or config.yaml: nothing to resume there (was it started?)")
    running = [j for j in jobs.list_jobs(ctx.jobs) if j.run_dir == str(run_dir) and j.running()]
    if running:
        raise ConfigError(f"{run_dir}: job {running[0].id} is still training it; stop it first")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        path = run_dir / UI_YAML
        path.write_text(yaml_text)
    argv = ["train", str(path), "--output-dir", str(run_dir)] + (["--resume"] if resume else [])
    return jobs.start(ctx.jobs, argv, run_dir=str(run_dir))


def stop_run(ctx: UIContext, run_dir: Path) -> jobs.Job | None:
    for job in jobs.list_jobs(ctx.jobs):
        if job.run_dir == str(run_dir) and job.running():
            job.stop()
            return job
    return None


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------- the tab
def _help(text: str) -> str:
    """A field's description as its help line: the first sentence of a long one (the YAML reference,
    docs/configuration.md, has the rest)."""
    if len(text) < 200:
        return text
    first = text.split(". ", 1)[0]
    short = first if len(first) < 200 else text[:160].rsplit(" ", 1)[0] + " …"
    return short.rstrip(".") + ". (docs/configuration.md says more)"


def _component(gr, field: FormField, **kw):
    if field.kind == "bool":
        return gr.Checkbox(value=shown(field), label=field.label, info=_help(field.help), **kw)
    if field.kind == "choice":
        choices = ["null" if c is None else c for c in field.choices]
        return gr.Dropdown(choices=choices, value=shown(field), label=field.label, info=_help(field.help), **kw)
    return gr.Textbox(value=shown(field), label=field.label, info=_help(field.help), max_lines=1, **kw)


def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    methods = registry.names()
    presets = available_presets()
    comps: dict[str, Any] = {}  # dotted key -> component, every generated field
    fields: list[FormField] = []
    method_groups = {}

    gr.Markdown(
        "Fill the form: the YAML below is what `tunelab train` will run, checked as `tunelab config` checks it."
    )
    with gr.Row():
        run_name = gr.Textbox(value=default_run_name(), label="run name", info=f"the run folder, under {ctx.runs}",
                              elem_id="train-run-name")  # fmt: skip
        model = gr.Dropdown(choices=list(NAMED), value="smollm2-135m-instruct", allow_custom_value=True,
                            label="model", elem_id="train-model",
                            info="a named default, or type a local folder, a .gguf file or a hub id")  # fmt: skip
        stage = gr.Dropdown(choices=list(STAGES), value="sft", label="stage", elem_id="train-stage",
                            info="what it learns from the data, and with which loss")  # fmt: skip
        method = gr.Dropdown(choices=methods, value="lora", label="method", elem_id="train-method",
                             info="what trains (`tunelab methods`)")  # fmt: skip
    errors_top = gr.Markdown(elem_id="train-error-model")

    with gr.Accordion("method settings", open=True):
        for name in methods:
            with gr.Group(visible=name == "lora") as group:
                mfields = method_fields(name)
                if not mfields:
                    gr.Markdown(f"`{name}` has no settings.")
                with gr.Row():
                    for f in mfields:
                        comps[f"{name}:{f.key}"] = _component(gr, f, elem_id=f"train-{name}-{f.label}")
                        fields.append(FormField(f"{name}:{f.key}", f.kind, f.default, f.choices, f.help))
            method_groups[name] = group
    errors_method = gr.Markdown(elem_id="train-error-method")

    with gr.Accordion("data", open=True):
        with gr.Row():
            source = gr.Radio(list(DATA_SOURCES), value="preset" if presets else "path", label="data from",
                              elem_id="train-data-source")  # fmt: skip
            preset = gr.Dropdown(choices=presets, value=presets[0] if presets else None, label="shared data set",
                                 elem_id="train-data-preset")  # fmt: skip
            upload = gr.File(label="upload a file", type="filepath", file_types=[".json", ".jsonl", ".csv", ".tsv",
                             ".parquet", ".txt", ".gz"], elem_id="train-data-upload")  # fmt: skip
            path = gr.Textbox(label="path", info="a data file, or a datasets hub id", elem_id="train-data-path")
        with gr.Row():
            for f in data_fields():
                comps[f.key] = _component(gr, f, elem_id=f"train-data-{f.label}")
                fields.append(f)
        preview_btn = gr.Button("Preview rows", size="sm", elem_id="train-preview")
        preview_info = gr.Markdown(elem_id="train-preview-info")
        preview_rows = gr.HighlightedText(label="first rows as the model sees them (highlighted: the tokens with loss)",
                                          color_map={"loss": "green"}, show_legend=True, elem_id="train-preview-rows")  # fmt: skip
    errors_data = gr.Markdown(elem_id="train-error-data")

    with gr.Accordion("task (stages classification, extractive_qa, seq2seq)", open=True, visible=False) as task_box:
        with gr.Row():
            for f in task_fields():
                comps[f.key] = _component(gr, f, elem_id=f"train-task-{f.label}")
                fields.append(f)
    errors_task = gr.Markdown(elem_id="train-error-task")

    stage_groups = {}
    with gr.Accordion("stage settings (stages dpo, distill, ppo)", open=True, visible=False) as stage_box:
        for name in STAGE_SECTIONS:
            with gr.Group(visible=False) as group:
                with gr.Row():
                    for f in stage_fields(name):
                        comps[f"{name}:{f.key}"] = _component(gr, f, elem_id=f"train-{f.key.replace('.', '-')}")
                        fields.append(FormField(f"{name}:{f.key}", f.kind, f.default, f.choices, f.help))
            stage_groups[name] = group
    errors_stage = gr.Markdown(elem_id="train-error-stage")

    with gr.Accordion("training", open=True):
        with gr.Row():
            for f in training_fields():
                comps[f.key] = _component(gr, f, elem_id=f"train-training-{f.label}")
                fields.append(f)
    errors_training = gr.Markdown(elem_id="train-error-training")

    yaml_box = gr.Code(label="the YAML it will run", language="yaml", interactive=False, max_lines=30,
                       elem_id="train-yaml")  # fmt: skip
    status = gr.Markdown(elem_id="train-status")
    estimate_box = gr.Markdown(elem_id="train-estimate")
    with gr.Row():
        check_btn = gr.Button("Check & estimate", elem_id="train-check")
        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop (checkpoint)", variant="stop", elem_id="train-stop")
        resume_btn = gr.Button("Resume", elem_id="train-resume")

    field_comps = [comps[f.key] for f in fields]
    inputs = [run_name, model, stage, method, source, preset, upload, path, *field_comps]
    error_boxes = [errors_top, errors_method, errors_data, errors_training, errors_task, errors_stage]
    section_of = {"model": 0, "stage": 0, "output_dir": 0, "method": 1, "data": 2, "training": 3, "task": 4,
                  **{section.split(".")[0]: 5 for name in STAGE_SECTIONS for _, section in STAGE_SECTIONS[name]}}  # fmt: skip

    def current(run, model_, stage_, method_, source_, preset_, upload_, path_, *values):
        """(run folder, YAML text, the form's keys) from the form's values."""
        run_dir = run_dir_of(ctx, run)
        pairs = [(f, v) for f, v in zip(fields, values) if active(f.key, method_, stage_)]
        chosen = [FormField(f.key.split(":", 1)[-1], f.kind, f.default, f.choices, f.help) for f, _ in pairs]
        cfg = form_config(run_dir, model_, stage_, method_, data_path(ctx, source_, preset_, upload_, path_),
                          chosen, [v for _, v in pairs])  # fmt: skip
        return run_dir, to_yaml(cfg), [f.key for f in chosen]

    def draft(run_dir: Path) -> Path:
        return ctx.runs / ".ui-drafts" / run_dir.name / UI_YAML

    def shown_errors(message: str | None, keys: list[str], method_: str, stage_: str) -> list:
        """The sections' error boxes, then each field's help: a problem is shown in the box below its section and
        in place of the help of the field it names (the error text is the CLI's, unchanged)."""
        boxes = [""] * len(error_boxes)
        by_key = errors_by_key(message, keys + ["model.name", "data.train", "stage"]) if message else {}
        for key, text in by_key.items():
            i = section_of.get(key.split(".")[0], 0)
            boxes[i] += ("\n\n" if boxes[i] else "") + f"**error**\n```\n{text}\n```"
        infos = []
        for f in fields:
            key = f.key.split(":", 1)[-1]
            bad = key in by_key and active(f.key, method_, stage_)
            infos.append(gr.update(info="⚠ " + by_key[key].splitlines()[-1] if bad else _help(f.help)))
        return boxes + infos

    def validate(*args):
        try:
            run_dir, text, keys = current(*args)
        except ConfigError as e:
            return ["", f"**error**: {e}", "", *shown_errors(None, [], args[3], args[2])]
        cfg, error = check_text(text, draft(run_dir))
        ok = (
            "config OK: `tunelab config` accepts it"
            if cfg is not None
            else "**the config has errors** (shown by their fields)"
        )
        # the estimate box is left as it is: a validation fired by a field's blur as Check is clicked may
        # finish after Check's estimate and must not wipe it
        return [text, ok, gr.skip() if cfg is not None else "", *shown_errors(error, keys, args[3], args[2])]

    def check_and_estimate(*args):
        out = validate(*args)
        if out[1].startswith("config OK"):
            run_dir, _, _ = current(*args)
            try:
                out[2] = estimate(check(draft(run_dir)))
            except Exception as e:  # noqa: BLE001 - an estimate that cannot be made must not stop the form
                out[2] = f"no estimate: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return out

    def do_preview(*args):
        try:
            run_dir, text, _ = current(*args)
        except ConfigError as e:
            return f"**error**: {e}", None
        cfg, error = check_text(text, draft(run_dir))
        if error:
            return f"**error**\n```\n{error}\n```", None
        if not cfg.data.train:
            return "choose the data first", None
        try:
            fmt, rows = preview(cfg)
        except user_errors() as e:
            return f"**error**\n```\n{e}\n```", None
        sep = [("\n\n────────\n\n", None)]
        return f"detected format: **{fmt}**", [p for i, r in enumerate(rows) for p in (sep if i else []) + r]

    def do_start(*args, resume=False):
        out = validate(*args)
        if not out[1].startswith("config OK"):
            return out
        run_dir, text, _ = current(*args)
        try:
            job = start_run(ctx, run_dir, text, resume=resume)
        except user_errors() as e:
            out[1] = f"**error**: {e}"
            return out
        out[1] = (f"{'resumed' if resume else 'started'} `{run_dir.name}` (job {job.id}): follow it in the Watch "
                  "tab; it goes on if this page closes")  # fmt: skip
        return out

    def do_stop(run):
        try:
            job = stop_run(ctx, run_dir_of(ctx, run))
        except ConfigError as e:
            return f"**error**: {e}"
        if job is None:
            return f"nothing is training `{run}`"
        return f"stopping `{run}`: it writes a checkpoint and exits; Resume continues it"

    outputs = [yaml_box, status, estimate_box, *error_boxes, *field_comps]
    on_change = [c.change for c in (model, stage, method, source, preset, upload)]
    on_change += [c.blur for c in (run_name, path)]
    on_change += [c.change if isinstance(c, gr.Checkbox | gr.Dropdown) else c.blur for c in field_comps]
    gr.on(on_change, validate, inputs, outputs, trigger_mode="always_last", show_progress="hidden")
    check_btn.click(check_and_estimate, inputs, outputs)
    preview_btn.click(do_preview, inputs, [preview_info, preview_rows])
    start_btn.click(do_start, inputs, outputs)
    resume_btn.click(lambda *a: do_start(*a, resume=True), inputs, outputs)
    stop_btn.click(do_stop, [run_name], [status])
    method.change(lambda m: [gr.update(visible=n == m) for n in methods], [method], list(method_groups.values()))
    stage.change(lambda s: gr.update(visible=s in TASK_STAGES), [stage], [task_box])
    stage.change(lambda s: [gr.update(visible=s in STAGE_SECTIONS)] + [gr.update(visible=n == s) for n in stage_groups],
                 [stage], [stage_box, *stage_groups.values()])  # fmt: skip
    # the page opens showing the default config's YAML (the tab is built inside the app's gr.Blocks)
    # a fresh run name for each page opened (a callable default would be read after the load event's inputs)
    on_page_load(default_run_name, None, run_name).then(validate, inputs, outputs, show_progress="hidden")
