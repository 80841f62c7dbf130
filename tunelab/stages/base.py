"""What a stage is: a model class, a batch shape and a loss on the one training loop (tunelab/training).

A stage module builds one `Stage` (or a function of the config that builds it) and the registry
(tunelab/stages/__init__.py) maps stage names to modules. The loop calls, in order:

    model, tokenizer = stage.load_model(cfg, device)         # the model class this stage trains
    stage.prepare(model, cfg)                                  # optional: e.g. dpo's frozen reference copy
    data = stage.build_data(cfg, tokenizer)                    # DataBundle(train, val, stats)
    batch = stage.collate(examples, pad_id)
    stage.ahead(model, batches, run)                           # optional: before a micro-batch's thread shares
    loss, n_terms[, extras] = stage.loss_sum(model, batch)     # summed, so a step normalises exactly
    n_terms = stage.count(batch)                               # terms in a batch before the forward pass
    scores = stage.final_metrics(model, tokenizer, cfg, data, device)   # optional: dev metrics
    manifest = stage.manifest(cfg)                             # extra keys for final/tunelab.json
    records = stage.samples(model, tokenizer, cfg, data, step)  # optional: generations at each evaluation

Before any of these, `stage.check_data(cfg)` (optional) reads and checks the rows without a tokenizer, so
that a bad data file is reported before the model loads.

`load_run` (stages/runs.py) rebuilds a saved run's base model with `stage.reload(manifest)`, the
keyword arguments of `load_model` (the head class, number of labels ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.config import ConfigError
from tunelab.data.build import DataBundle
from tunelab.data.tasks import Task, get_task, load_split, load_task_file
from tunelab.models.loading import no_grad


@dataclass
class Stage:
    name: str
    load_model: Callable  # (cfg, device) -> (model, tokenizer)
    build_data: Callable  # (cfg, tokenizer) -> DataBundle
    collate: Callable  # (examples, pad_id) -> batch
    loss_sum: Callable  # (model, batch) -> (loss tensor, n terms[, {metric: sum over terms}])
    count: Callable  # batch -> n terms
    final_metrics: Callable | None = None  # (model, tokenizer, cfg, data, device) -> dict
    manifest: Callable | None = None  # cfg -> extra keys for final/tunelab.json
    prepare: Callable | None = None  # (model, cfg) -> None, once the method is applied, before a resume
    reload: Callable | None = None  # manifest -> load_model keyword arguments for the saved run's base
    loop: str = "steps"  # "steps": the supervised loop (training/loop.py); "ppo": rollouts (training/ppo.py)
    check_data: Callable | None = None  # cfg -> None: the rows read and checked before the model loads
    samples: Callable | None = None  # (model, tokenizer, cfg, data, step) -> [{prompt, text, ...}] at each evaluation
    # (model, batches, run) -> None: before a micro-batch's passes run as thread shares, in the loop's thread, what
    # they need from the model in another state or from the whole micro-batch (dpo's / kto's pi_ref with the adapter
    # off, kto's z_ref), kept in each pass's batch; `run(calls)` takes a call per pass, in order, and runs them a
    # thread per share. With it, the shares run where they otherwise could not
    ahead: Callable | None = None
    notes: Callable | None = None  # cfg -> [str]: hints the run log shows before training (a default that may not fit)


@dataclass
class RowsBundle(DataBundle):
    """A DataBundle that also keeps the dev rows the val examples came from (QA windows, seq2seq sources)."""

    val_rows: list = field(default_factory=list)


_STAGE_TASK_TYPES = {
    "classification": ("classification", "regression"),
    "extractive_qa": ("extractive_qa",),
    "seq2seq": ("seq2seq",),
}


def task_of(tcfg, stage: str = "classification") -> Task:
    """The Task a `task:` section describes for `stage`: a preset, or a custom one over the user's files."""
    if tcfg.name:
        task = get_task(tcfg.name)
        if task.type not in _STAGE_TASK_TYPES.get(stage, (task.type,)):
            raise ConfigError(
                f"task.name {tcfg.name!r} is a {task.type} task; stage {stage} needs a "
                f"{' or '.join(_STAGE_TASK_TYPES[stage])} task"
            )
        return task
    if stage == "extractive_qa":
        return Task(name="custom", type="extractive_qa", main_metric="f1")
    if stage == "seq2seq":
        return Task(name="custom", type="seq2seq", main_metric="bleu")
    labels = tuple(tcfg.labels) if tcfg.type == "classification" else ()
    if tcfg.type == "classification" and len(labels) < 2:
        raise ConfigError("task.labels: list the class names (at least two) for your own classification files")
    return Task(name="custom", type=tcfg.type, labels=labels, main_metric="accuracy" if labels else "pearson")


def task_rows(tcfg, split: str, seed: int, stage: str = "classification") -> list[dict]:
    """The rows of a `task:` section's split: the user's own file when given, else the preset's."""
    task = task_of(tcfg, stage)
    limit = tcfg.train_limit if split == "train" else tcfg.dev_limit
    own = tcfg.train_file if split == "train" else tcfg.dev_file
    if own:
        return load_task_file(task, own, limit=limit, seed=seed)
    if task.name == "custom":
        return []
    return load_split(task, split, limit=limit, seed=seed)


def check_task_files(stage: str):
    """check_data for the `task:` stages: your own files read and checked (labels, fields) before the model
    loads; a preset's rows are known good and are read once, by build."""

    def check(cfg) -> None:
        for split, own in (("train", cfg.task.train_file), ("dev", cfg.task.dev_file)):
            if own:
                task_rows(cfg.task, split, cfg.training.seed, stage)

    return check


@no_grad
def require_causal(model, cfg) -> None:
    """Refuse a model that attends in both directions (BERT and kin) for a stage that trains left-to-right
    generation: transformers would load it with a random LM head that learns nothing it can generate with.
    The test is the definition: a causal model's output at a position ignores every later token."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]], device=device)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    model.train(was_training)
    early = logits[:, :3].float()
    # exact for a causal model up to rounding (half precision on a GPU); bidirectional models move a lot
    if (early[0] - early[1]).abs().max() > 1e-3 * max(1.0, float(early.abs().max())):
        raise ConfigError(
            f"stage: {cfg.stage} trains a causal (left-to-right) language model, but {cfg.model.name!r} "
            f"({type(model).__name__}) attends in both directions: its outputs at earlier positions change with "
            "later tokens. Use a decoder model (e.g. smollm2-135m-instruct), or stage: mlm / classification / "
            "tagging for an encoder."
        )


def num_labels(task) -> int:
    return 1 if task.type == "regression" else len(task.labels)
