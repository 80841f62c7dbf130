"""The web UI's functions without a browser: form -> config dict -> the config the CLI validates, errors
as `tunelab config` prints them, the estimate as `tunelab methods` counts, the data preview's loss mask as
training builds it, progress read from a log, and a job stopped (exit 130, a checkpoint) then resumed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tunelab.config import load_config
from tunelab.methods import registry
from tunelab.ui import jobs
from tunelab.ui import train as T
from tunelab.ui.context import UIContext
from tunelab.ui.runs import list_runs, read_metrics
from tunelab.ui.watch import bar_state, progress


def fields_for(method: str) -> list:
    return T.method_fields(method) + T.data_fields() + T.training_fields()


def form(tmp_path, method="lora", model="m", train="d.jsonl", **changes):
    fields = fields_for(method)
    values = [changes.get(f.key, T.shown(f)) for f in fields]
    return T.form_config(tmp_path / "runs" / "r", model, "sft", method, train, fields, values)


@pytest.mark.parametrize("method", registry.names())
def test_untouched_form_is_each_methods_defaults(tmp_path, method):
    """Every generated field shows its default in a form that reads back as that default: the YAML holds only
    the method's name, and the validated config equals the defaults."""
    cfg = form(tmp_path, method)
    assert cfg["method"] == {"name": method}
    assert set(cfg) == {"output_dir", "stage", "model", "method", "data"}
    validated = load_config(cfg)
    assert validated.method == registry.get(method).Config()
    assert validated.training == load_config({}).training


def test_form_values_reach_the_config_typed(tmp_path):
    changes = {"method.r": "4", "method.target_modules": "[q_proj, v_proj]", "training.lr": "1e-3",
               "training.scheduler": "linear", "data.packing": True, "training.max_steps": "7"}  # fmt: skip
    cfg = form(tmp_path, **changes)
    assert cfg["method"] == {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert cfg["training"] == {"max_steps": 7, "lr": 1e-3, "scheduler": "linear"}
    assert cfg["data"] == {"train": "d.jsonl", "packing": True}
    c = load_config(yaml.safe_load(T.to_yaml(cfg)))  # the YAML the page shows, read back
    assert (c.method.r, c.method.target_modules, c.training.lr, c.training.max_steps) == (
        4,
        ["q_proj", "v_proj"],
        1e-3,
        7,
    )


def test_bad_value_gives_the_cli_error_text(tmp_path, tiny_dir, data_file, capsys):
    from tunelab.cli import main

    cfg = form(tmp_path, model=tiny_dir, train=data_file, **{"method.r": "abc", "training.lr": "-1"})
    path = tmp_path / "draft.yaml"
    checked, error = T.check_text(T.to_yaml(cfg), path)
    assert checked is None
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"tunelab: error: {error}"
    by_key = T.errors_by_key(error, [f.key for f in fields_for("lora")])
    assert set(by_key) == {"method.r", "training.lr"}
    assert by_key["method.r"].splitlines()[0] == f"{path}: invalid config"
    assert "abc" in by_key["method.r"] and "greater than 0" in by_key["training.lr"]
    # a data error (a missing file) is the CLI's too, and named by its key
    cfg = form(tmp_path, model=tiny_dir, train=str(tmp_path / "missing.jsonl"))
    _, error = T.check_text(T.to_yaml(cfg), path)
    assert main(["config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"tunelab: error: {error}"
    assert "data.train" in T.errors_by_key(error, ["data.train"])


def test_estimate_counts_as_tunelab_methods(tmp_path, tiny_dir, data_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.methods.summary import method_row

    cfg, error = T.check_text(T.to_yaml(form(tmp_path, model=tiny_dir, train=data_file, **{"method.r": "4"})),
                              tmp_path / "c.yaml")  # fmt: skip
    assert error is None
    text = T.estimate(cfg)
    model = AutoConfig.from_pretrained(tiny_dir)
    row = method_row("lora", model, settings=cfg.method)
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert (
        f"{row['trainable']:,} ({row['percent']:.3g}% of the model's {base:,}; {base + row['trainable']:,} in all)"
        in text
    )
    # rank 4 trains a quarter of rank 16's LoRA parameters, counted the same way
    assert 4 * row["trainable"] == method_row("lora", model)["trainable"]


def test_preview_marks_exactly_the_tokens_training_learns(tmp_path, tiny_dir, data_file):
    from tunelab.data.templating import IGNORE, render_example
    from tunelab.models import load_tokenizer

    cfg, _ = T.check_text(T.to_yaml(form(tmp_path, model=tiny_dir, train=data_file)), tmp_path / "c.yaml")
    fmt, rows = T.preview(cfg, rows=2)
    assert fmt == "instruction" and len(rows) == 2
    tok = load_tokenizer(cfg.model)
    first = json.loads(Path(data_file).read_text().splitlines()[0])
    ex = render_example(first, cfg.data.model_copy(update={"format": "instruction"}), tok)
    learnt = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])
    assert "".join(text for text, tag in rows[0] if tag == "loss") == learnt
    assert "".join(text for text, _ in rows[0]) == tok.decode(ex["input_ids"])
    assert first["output"] in learnt and first["instruction"] not in learnt


def test_bar_state_reads_the_last_progress():
    log = ("train:  17%|█▋        | 1/6 [00:00<00:01,  4.01step/s, loss=5.7799]\r"
           "train:  50%|█████     | 3/6 [00:02<00:03,  4.31step/s, loss=5.7389]\n[tunelab] eval loss")  # fmt: skip
    assert bar_state(log) == {"step": 3, "total": 6, "elapsed": "00:02", "eta": "00:03"}
    assert bar_state("no bar yet") == {}


def wait(predicate, timeout=240.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_stop_checkpoints_and_resume_finishes(tmp_path, tiny_dir, data_file):
    """A job started as the Train tab starts one, from a UI process that then exits: Stop is Ctrl-C (exit 130, a checkpoint), Resume continues
    from that checkpoint to the end, in the same run folder, listed by the Runs tab at each state."""
    ctx = UIContext(tmp_path / "runs")
    run_dir = ctx.runs / "r"
    cfg = form(tmp_path, model=tiny_dir, train=data_file, **{"method.r": "4", "training.max_steps": "40",
               "training.batch_size": "2", "training.eval_every": "1000"})  # fmt: skip
    cfg["output_dir"] = str(run_dir)
    cfg["training"]["allocator"] = "system"  # one process start less (no restart onto tbbmalloc): seconds of CI
    # started by a UI process that is gone at once: the job is its own, and the records find it
    (tmp_path / "form.yaml").write_text(T.to_yaml(cfg))
    ui = ("import sys; from pathlib import Path; from tunelab.ui import train as T; from tunelab.ui.context import "
          "UIContext; T.start_run(UIContext(Path(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]).read_text())")  # fmt: skip
    subprocess.run([sys.executable, "-c", ui, str(ctx.runs), str(run_dir), str(tmp_path / "form.yaml")], check=True)
    [job] = jobs.list_jobs(ctx.jobs)
    assert job.argv == ["train", str(run_dir / "ui.yaml"), "--output-dir", str(run_dir)]
    assert wait(lambda: len([m for m in read_metrics(run_dir) if "loss" in m]) >= 3), job.tail()
    assert list_runs(ctx)[0]["state"] == "running"
    assert T.stop_run(ctx, run_dir) is not None
    assert wait(lambda: job.returncode() is not None), job.tail()
    assert job.returncode() == 130 and job.state() == "stopped", job.tail()
    stopped_at = max(m["step"] for m in read_metrics(run_dir) if "loss" in m)
    assert stopped_at < 40 and (run_dir / "checkpoints").is_dir()
    assert list_runs(ctx)[0]["state"] == "stopped (resumable)"
    with pytest.raises(T.ConfigError, match="already holds a run"):
        T.start_run(ctx, run_dir, T.to_yaml(cfg))  # a second Start would overwrite it: refused

    resumed = T.start_run(ctx, run_dir, "", resume=True)
    assert wait(lambda: resumed.returncode() is not None, 600), resumed.tail()
    assert resumed.returncode() == 0, resumed.tail()
    assert f"at step {stopped_at}/40" in resumed.log.read_text()
    steps = [m["step"] for m in read_metrics(run_dir) if "loss" in m]
    assert steps == list(range(1, 41))  # every step once: continued, not restarted
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 40
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert progress(resumed)["results"]["train_loss"] == losses[-1]  # what the Watch tab shows


def test_upload_is_kept_under_the_runs_folder_and_not_listed_as_a_run(tmp_path, data_file):
    ctx = UIContext(tmp_path / "runs")
    kept = T.data_path(ctx, "upload", None, data_file, None)
    assert Path(kept).parent == ctx.runs / ".ui-uploads" and Path(kept).read_bytes() == Path(data_file).read_bytes()
    assert T.data_path(ctx, "upload", None, data_file, None) == kept  # the same content: the same copy
    (ctx.runs / "cli-run").mkdir()
    (ctx.runs / "cli-run" / "config.yaml").write_text("stage: sft\n")
    assert [r["run"] for r in list_runs(ctx)] == ["cli-run"]  # .ui-uploads, .ui-jobs ... are not runs
    with pytest.raises(T.ConfigError, match="run name"):
        T.run_dir_of(ctx, "../elsewhere")


def test_task_fields_for_a_classification_preset(tmp_path):
    fields = T.task_fields()
    values = [{"task.name": "sst2", "task.train_limit": "64"}.get(f.key, T.shown(f)) for f in fields]
    cfg = T.form_config(tmp_path / "r", "m", "classification", "lora", None, fields, values)
    assert cfg["task"] == {"name": "sst2", "train_limit": 64} and "data" not in cfg
    c = load_config(cfg)
    assert (c.stage, c.task.name, c.task.train_limit, c.task.labels) == ("classification", "sst2", 64, [])


def test_job_tail_shows_the_last_state_of_a_progress_bar(tmp_path):
    job = jobs.Job(tmp_path, ["train"], None, 0.0, 0)
    job.log.write_bytes(b"[tunelab] start\ntrain:  0%| 0/6\rtrain: 50%| 3/6\rtrain: 100%| 6/6\n[tunelab] done\n")
    assert job.tail() == "[tunelab] start\ntrain: 100%| 6/6\n[tunelab] done"
    assert job.tail(2) == "train: 100%| 6/6\n[tunelab] done"


def test_stage_settings_reach_the_config_nested(tmp_path):
    """The stage sections (dpo, distill, ppo with its nested reward) are fields of their own: untouched they
    add nothing; set, they land under their section (ppo.reward.* nested), and the config validates."""

    def stage_form(stage, **changes):
        fields = T.stage_fields(stage)
        values = [changes.get(f.key, T.shown(f)) for f in fields]
        return T.form_config(tmp_path / "r", "m", stage, "lora", "d.jsonl", fields, values)

    assert stage_form("dpo").keys() == {"output_dir", "stage", "model", "method", "data"}
    cfg = stage_form("dpo", **{"dpo.beta": "0.3", "dpo.loss_type": "ipo"})
    assert cfg["dpo"] == {"beta": 0.3, "loss_type": "ipo"}
    assert load_config(cfg).dpo.beta == 0.3
    cfg = stage_form("ppo", **{"ppo.reward.kind": "length", "ppo.reward.target_length": "40", "ppo.ppo_epochs": "3",
                               "ppo.prompts": "p.jsonl"})  # fmt: skip
    assert cfg["ppo"] == {"prompts": "p.jsonl", "ppo_epochs": 3, "reward": {"kind": "length", "target_length": 40}}
    c = load_config(cfg)
    assert (c.ppo.ppo_epochs, c.ppo.reward.kind, c.ppo.reward.target_length) == (3, "length", 40)
    assert T.active("ppo:ppo.gamma", "lora", "ppo") and not T.active("ppo:ppo.gamma", "lora", "dpo")
    assert T.active("lora:method.r", "lora", "ppo") and T.active("training.lr", "full", "sft")
