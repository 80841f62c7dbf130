"""Experiment trackers (`training.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio, through their own
libraries. `harness.MetricsLog` writes metrics.jsonl and hands every numeric value to each tracker here, under
one name everywhere (`metric_name`: train/loss, train/learning_rate, train/grad_norm, eval/loss, dev/accuracy).

One function per tracker: it starts (or, on --resume, continues) the tracker's run, logs the config once, and
returns a `Tracker` (log, close) plus what identifies its run, kept in the run folder's trackers.json so that
a resumed training continues the same run. Where the runs go is each library's own setting (WANDB_DIR /
WANDB_MODE, MLFLOW_TRACKING_URI, TRACKIO_DIR), except that wandb writes under the run folder unless WANDB_DIR
is set. The libraries are imported here only: config.py checks they are installed before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import ConfigError, dump_config
from tunelab.files import write_json_atomic

IDS_FILE = "trackers.json"
# metrics.jsonl keys whose tracker name is not section/key
_RENAMED = {"lr": "learning_rate"}


def metric_name(key: str, section: str = "train") -> str:
    """The tracker name of a metrics.jsonl key: eval_loss -> eval/loss, dev_accuracy -> dev/accuracy, loss ->
    train/loss, lr -> train/learning_rate; a key without a prefix goes under `section`."""
    for prefix in ("eval", "dev"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"{section}/{_RENAMED.get(key, key)}"


@dataclass
class Tracker:
    name: str
    log: Callable[[dict[str, float], int], None]  # ({tracker name: value}, step)
    close: Callable[[], None]


def start(run_dir: Path, cfg, resume_step: int) -> list[Tracker]:
    """Start every tracker of `cfg.training.report_to`; on a resume (resume_step > 0) continue the runs named
    in trackers.json. A tracker that fails to start is a ConfigError naming it (the others are closed)."""
    path = run_dir / IDS_FILE
    saved = json.loads(path.read_text()) if resume_step and path.is_file() else {}
    run_name = cfg.training.run_name or run_dir.resolve().name
    trackers, ids = [], {}
    for name in cfg.training.report_to:
        try:
            tracker, ids[name] = START[name](run_dir, cfg, run_name, saved.get(name), resume_step)
        except Exception as e:  # the library's own error (a bad tracking URI, a refused login): one named line
            for t in trackers:
                t.close()
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = " / ".join(lines[:3]) or type(e).__name__  # pydantic-style errors say what on lines 2-3
            raise ConfigError(f"training.report_to: {name} could not start its run: {detail}") from None
        trackers.append(tracker)
    if any(v is not None for v in ids.values()):
        write_json_atomic(path, {**saved, **{k: v for k, v in ids.items() if v is not None}})
    return trackers


def notices_to_stderr():
    """`tunelab train` prints its result as JSON on stdout: what a tracker's library prints goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


def flat_config(cfg) -> dict[str, str]:
    """The config as {"training.lr": "0.0002", ...}: MLflow's params are flat strings."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def tensorboard(run_dir: Path, cfg, run_name: str, saved, resume_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops the events past the checkpoint that a resume writes again
    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
    if not resume_step:  # markdown: indented lines are shown as they are
        writer.add_text("config", "".join(f"    {line}\n" for line in dump_config(cfg).splitlines()), 0)

    def log(values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            writer.add_scalar(k, v, step)

    return Tracker("tensorboard", log, writer.close), None


def wandb(run_dir: Path, cfg, run_name: str, saved, resume_step: int):
    import wandb as wb

    with notices_to_stderr():
        run = wb.init(
            project=cfg.training.tracker_project,
            name=run_name,
            id=(saved or {}).get("id"),  # None: wandb draws one
            resume="allow",  # with the id kept in trackers.json a resumed training continues the same run
            config=cfg.model_dump(mode="json"),
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            reinit="create_new",  # several trainings in one process (tunelab.train in a loop): a run each
        )

    def log(values: dict[str, float], step: int) -> None:
        # wandb drops a step below one it has seen (a resume past the checkpoint's step): it warns itself
        run.log(values, step=step)

    def close() -> None:
        with notices_to_stderr():
            run.finish()

    return Tracker("wandb", log, close), {"id": run.id}


def mlflow(run_dir: Path, cfg, run_name: str, saved, resume_step: int):
    # the client API rather than mlflow.start_run: no process-wide active run for a crash to leave behind
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default
    run_id = (saved or {}).get("run_id")
    if run_id:
        client.update_run(run_id, status="RUNNING")
    else:
        project = cfg.training.tracker_project
        experiment = client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.source.name": "tunelab"}).info.run_id
        # MLflow caps a param's value at 6000 characters
        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
        for i in range(0, len(params), 100):  # at most 100 params per batch
            client.log_batch(run_id, params=params[i : i + 100])

    def log(values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    return Tracker("mlflow", log, lambda: client.set_terminated(run_id)), {"run_id": run_id}


def trackio(run_dir: Path, cfg, run_name: str, saved, resume_step: int):
    import trackio as tr

    # Trackio names a run by its name within the project
    name = (saved or {}).get("name") or run_name
    with notices_to_stderr():
        run = tr.init(
            project=cfg.training.tracker_project,
            name=name,
            config=cfg.model_dump(mode="json"),
            resume="allow" if saved else "never",
        )

    def log(values: dict[str, float], step: int) -> None:
        run.log(values, step=step)

    def close() -> None:
        with notices_to_stderr():
            tr.finish()  # not run.finish(): this also forgets the run, which trackio would finish again at exit

    return Tracker("trackio", log, close), {"name": name}


START = {"tensorboard": tensorboard, "wandb": wandb, "mlflow": mlflow, "trackio": trackio}
