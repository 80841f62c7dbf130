"""training.report_to: one training run, interrupted after step 3 and resumed, logs to every tracker whose library
is installed; each tracker's own reader then gives back the values of metrics.jsonl under the same names, in one
tracker run. Offline only: wandb in offline mode, MLflow on a file store, Trackio in a local folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main
from tunelab.config import ConfigError, dump_config, load_config, tracker_problem
from tunelab.training.trackers import metric_name

ALL = ("tensorboard", "wandb", "mlflow", "trackio")
INSTALL = {"wandb": "pip install 'tunelab[wandb]'", "mlflow": "pip install 'tunelab[mlflow]'",
           "trackio": "pip install 'tunelab[trackio]'"}  # fmt: skip


def offline_env(root: Path) -> dict:
    """Environment variables under which no tracker reaches the network or asks for a login."""
    return {
        "WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
        "TRACKIO_DIR": str(root / "trackio"), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
    }  # fmt: skip


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_dir):
    """A run logged to every installed tracker: Ctrl-C after step 3, then --resume to step 8 (eval every 4)."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        env = offline_env(root)
        if "trackio" in sys.modules:  # Trackio reads TRACKIO_DIR once, at import
            env["TRACKIO_DIR"] = str(sys.modules["trackio"].utils.TRACKIO_DIR)
        for k, v in env.items():
            mp.setenv(k, v)
        (root / "wandb").mkdir()
        data = root / "train.jsonl"
        data.write_text(
            "".join(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n" for i in range(24))
        )
        on = [t for t in ALL if tracker_problem(t) is None]
        cfg = load_config({
            "output_dir": str(root / "run"), "model": {"name": tiny_dir},
            "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "training": {"max_steps": 8, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "eval_every": 4,
                         "progress": False, "seed": 3, "report_to": on, "tracker_project": "tl-test"},
        })  # fmt: skip

        def ctrl_c_after_step_3(step, record):
            if step == 3:
                raise KeyboardInterrupt

        assert tunelab.train(cfg, callbacks=[ctrl_c_after_step_3]).metrics["interrupted"]
        config = root / "config.yaml"
        config.write_text(dump_config(cfg))
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):  # the CLI's result, which the trackers' notices must not mix into
            assert main(["train", str(config), "--resume"]) == 0
        yield {"root": root, "run": root / "run", "on": on, "env": env, "stdout": stdout.getvalue()}


def jsonl_values(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def need(tracked, name):
    if name not in tracked["on"]:
        pytest.skip(f"{name} is not installed: {INSTALL[name]}")


def assert_same(logged: dict[int, float], run_dir: Path, key: str):
    want = jsonl_values(run_dir, key)
    assert len(want) >= 3 and sorted(logged) == sorted(want), (key, sorted(logged), sorted(want))
    for step, v in want.items():
        assert logged[step] == pytest.approx(v, rel=1e-6, abs=1e-9), (key, step)


def test_metric_names():
    assert [metric_name(k) for k in ("loss", "lr", "grad_norm", "eval_loss", "eval_reward_accuracy", "dev_accuracy")] == [
        "train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/reward_accuracy", "dev/accuracy"]  # fmt: skip
    assert metric_name("pairwise_accuracy", "dev") == "dev/pairwise_accuracy"


def test_a_ctrl_c_during_a_trackers_call_is_delivered_after_it(tmp_path):
    """Ctrl-C while a tracker logs: the call runs to its end (a KeyboardInterrupt inside TensorBoard's queue hand-off
    made its writer miss the close and `tunelab train` hang 120 s after a Stop), then the interrupt is raised."""
    import signal
    import threading

    from tunelab.training.harness import MetricsLog
    from tunelab.training.trackers import Tracker

    calls = []

    def log(values, step):
        if not calls:  # as a Ctrl-C arriving in the middle of the library's code, once
            signal.raise_signal(signal.SIGINT)
        for _ in range(1000):  # bytecode boundaries at which Python would raise it
            pass
        calls.append((dict(values), step))

    metrics = MetricsLog(tmp_path, None, 0)
    metrics.trackers = [Tracker("fake", log, lambda: None)]
    with pytest.raises(KeyboardInterrupt):
        metrics.write({"step": 1, "loss": 2.5})
    assert calls == [({"train/loss": 2.5}, 1)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in place again
    metrics.write({"step": 2, "loss": 2.0})  # nothing held back from the first
    assert calls[-1] == ({"train/loss": 2.0}, 2) and len(calls) == 2
    outside = []  # off the main thread, where Python cannot set a handler, the call runs unchanged
    thread = threading.Thread(target=lambda: outside.append(metrics.write({"step": 3, "lr": 1e-4}) is None))
    metrics.trackers = [Tracker("fake", lambda v, s: calls.append((dict(v), s)), lambda: None)]
    thread.start()
    thread.join()
    assert outside == [True] and calls[-1] == ({"train/learning_rate": 1e-4}, 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_the_run_trained_through_the_interrupt(tracked):
    assert json.loads(tracked["stdout"])["steps"] == 8  # stdout holds the result alone
    assert sorted(jsonl_values(tracked["run"], "loss")) == list(range(1, 9))
    assert sorted(jsonl_values(tracked["run"], "eval_loss")) == [0, 4, 8]


def test_tensorboard_holds_the_metrics_jsonl_values(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["run"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "eval_loss")):
        assert_same({e.step: e.value for e in acc.Scalars(name)}, tracked["run"], key)
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_wandb_offline_run_holds_the_metrics_jsonl_values(tracked):
    need(tracked, "wandb")
    run_id = json.loads((tracked["run"] / "trackers.json").read_text())["wandb"]["id"]
    files = sorted((tracked["root"] / "wandb" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the first start and the resume: one run id
    history, config = {}, None
    wandb_cli = Path(sys.executable).with_name("wandb")
    for f in files:  # wandb's own reader of its transaction log
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(f)], capture_output=True, text=True,
                             env={**os.environ, **tracked["env"]}, timeout=120, check=True).stdout  # fmt: skip
        for record in map(json.loads, out.splitlines()):
            if record["type"] == "history":
                history[record["history"]["step"]["num"]] = record["history"]["item"]
            elif record["type"] == "run":
                assert record["run"]["run_id"] == run_id and record["run"]["project"] == "tl-test"
                assert record["run"]["display_name"] == "run"  # the run folder's name
                config = record["run"]["config"]["update"]
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "eval_loss")):
        assert_same({s: h[name] for s, h in history.items() if name in h}, tracked["run"], key)
    assert config["training"]["lr"] == 5e-3 and config["method"]["r"] == 4


def test_mlflow_file_store_holds_the_metrics_jsonl_values(tracked):
    need(tracked, "mlflow")
    from mlflow import MlflowClient

    client = MlflowClient(tracked["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tl-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued the run
    run = runs[0]
    assert run.info.run_id == json.loads((tracked["run"] / "trackers.json").read_text())["mlflow"]["run_id"]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "eval_loss")):
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == len({m.step for m in history})  # no step logged twice
        assert_same({m.step: m.value for m in history}, tracked["run"], key)
    assert float(run.data.params["training.lr"]) == 5e-3 and run.data.params["method.name"] == "lora"


def test_trackio_local_run_holds_the_metrics_jsonl_values(tracked):
    need(tracked, "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    assert str(sys.modules["trackio"].utils.TRACKIO_DIR) == tracked["env"]["TRACKIO_DIR"]
    assert SQLiteStorage.get_runs("tl-test") == ["run"]  # the resume continued the run
    logs = SQLiteStorage.get_logs("tl-test", "run")
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "eval_loss")):
        assert_same({r["step"]: r[name] for r in logs if r.get(name) is not None}, tracked["run"], key)
    config = SQLiteStorage.get_run_config("tl-test", "run")
    assert config["training"]["lr"] == 5e-3 and config["method"]["r"] == 4


# ------------------------------------------------------------------------------- config
def test_report_to_spellings_and_the_older_tensorboard_flag():
    t = lambda training: load_config({"training": training}).training.report_to  # noqa: E731
    assert t({}) == ["tensorboard"]
    assert t({"report_to": "none"}) == [] and t({"report_to": []}) == [] and t({"report_to": None}) == []
    assert t({"tensorboard": False}) == [] and t({"tensorboard": True, "report_to": []}) == ["tensorboard"]
    assert load_config({}, ["training.tensorboard=false"]).training.report_to == []
    with pytest.raises(ConfigError, match=r"training.report_to.0.*'tensorboard', 'wandb', 'mlflow' or 'trackio'"):
        t({"report_to": ["wandbb"]})


def test_a_missing_tracker_library_stops_at_validation_naming_the_extra(monkeypatch, tmp_path, capsys):
    from tunelab import config

    monkeypatch.setitem(config.TRACKER_PACKAGES, "wandb", ("tunelab_no_such_module", "pip install 'tunelab[wandb]'"))
    out = tmp_path / "run"
    assert main(["train", "--set", "training.report_to=[wandb]", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "training.report_to" in err and "wandb is not installed: pip install 'tunelab[wandb]'" in err
    assert not out.exists()  # stopped before the run folder, let alone the model


def test_mlflow_on_a_database_store_without_sqlalchemy_is_named(monkeypatch):
    import importlib.util

    from tunelab import config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "mlflow" else
                        None if name == "sqlalchemy" else real(name, *a))  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "full MLflow package: pip install mlflow" in config.tracker_problem("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert config.tracker_problem("mlflow") is None
