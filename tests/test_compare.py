"""tunelab compare: a grid of tiny models × methods × tasks, resumable, with failures recorded and reports written.

Cells run in their own processes (forkserver: the imports happen once per test session), on tiny
models and toy JSONL tasks, a few optimizer steps each.
"""

import csv
import importlib.util
import json
import random
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tunelab.compare import load_grid, run_grid
from tunelab.compare.plan import resolve_cells
from tunelab.compare.run import planned_keys
from tunelab.config import ConfigError
from tunelab.testing import save_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["good", "great", "fine", "nice"]
BAD = ["bad", "awful", "poor", "sad"]
QUIET = {"log": lambda msg: None}


def toy_rows(n, seed, pair=False):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        word = rng.choice(GOOD if y else BAD)
        row = {"text": f"{word} {word} the film", "label": y}
        if pair:
            row["text_pair"] = rng.choice(["it was", "so it was"])
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-assets")
    save_tiny_model_dir(d / "llama", arch="llama")
    save_tiny_model_dir(d / "bert", arch="bert")
    for name, pair in (("reviews", False), ("pairs", True)):
        for split, n, seed in (("train", 24, 0), ("dev", 12, 1)):
            (d / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed, pair)))
    return d


def grid_for(assets, out, methods=None, models=None, tasks=None, **extra):
    task = lambda name, labels: {  # noqa: E731
        "name": name, "labels": labels, "train_file": str(assets / f"{name}-train.jsonl"),
        "dev_file": str(assets / f"{name}-dev.jsonl"), "max_length": 32,
    }  # fmt: skip
    g = {
        "output_dir": str(out),
        "base": {
            "training": {
                "max_steps": 2,
                "batch_size": 8,
                "lr": 5e-3,
                "warmup_steps": 0,
                "threads": 1,
                "tensorboard": False,
            }
        },  # fmt: skip
        # the instruction wrapper around a causal LM's rows needs more tokens than the bare text
        "models": models
        or [
            {"name": str(assets / "llama"), "label": "llama", "data": {"max_length": 256}},
            {"name": str(assets / "bert"), "label": "bert"},
        ],  # fmt: skip
        "methods": methods
        or [{"name": "lora", "r": 4, "dropout": 0.0}, "bitfit", {"name": "full", "training": {"lr": 1e-3}}],
        "tasks": tasks or [task("reviews", ["negative", "positive"]), task("pairs", ["bad", "good"])],
        "baselines": ["tfidf"],
    }
    g.update(extra)
    return g


@pytest.fixture(scope="module")
def grid_run(assets, tmp_path_factory):
    """The 14-cell grid (12 trained, 2 zero-shot), stopped after 5 cells (as Ctrl-C would), then run again."""
    out = tmp_path_factory.mktemp("grid") / "out"
    grid = grid_for(assets, out)
    seen = []

    def stop_after_five(row, result):
        seen.append(row["key"])
        if len(seen) == 5:
            raise KeyboardInterrupt

    first = run_grid(grid, on_cell=stop_after_five, **QUIET)
    second = run_grid(grid, **QUIET)
    return first, second, out, grid


def cells_of(result):
    return [r for r in result.rows if r["role"] == "method"]


def test_interrupted_grid_runs_only_the_missing_cells(grid_run):
    first, second, _, _ = grid_run
    assert first.interrupted and first.trained_now == 5
    assert not second.interrupted
    assert second.trained_now == 9 and second.skipped == 5
    third = run_grid(grid_run[3], **QUIET)  # nothing left to do
    assert third.trained_now == 0 and third.skipped == 14


def test_a_run_writes_the_keys_it_planned_for_a_watcher(grid_run):
    """plan.json: every row of the run (its references, then its cells in grid order) as results.db keys them,
    which the web UI reads instead of planning the grid again."""
    _, second, out, grid = grid_run
    keys = planned_keys(out)
    assert sorted(keys) == sorted(r["key"] for r in second.rows)  # the rows of results.json
    cells = [c.key for c in resolve_cells(load_grid(grid), out, materialise=False)]
    assert len(keys) == 6 + 14 and keys[6:] == cells  # majority, TF-IDF (sample, full) on two tasks, then cells
    assert planned_keys(out / "elsewhere") is None


def test_every_cell_has_metrics_and_costs(grid_run):
    _, second, out, _ = grid_run
    cells = cells_of(second)
    assert len(cells) == 12
    assert {(r["model"], r["method"], r["task"]) for r in cells} == {
        (m, meth, t) for m in ("llama", "bert") for meth in ("lora", "bitfit", "full") for t in ("reviews", "pairs")
    }
    for r in cells:
        assert r["status"] == "done", (r["model"], r["method"], r["task"], r["error"])
        assert r["main_metric"] == "accuracy" and 0.0 <= r["main_value"] <= 1.0
        assert {"accuracy", "f1", "mcc"} <= set(r["metrics"])
        assert r["trainable_params"] > 0 and 0 < r["trainable_pct"] <= 100
        assert r["peak_rss_mb"] > 50 and r["wall_s"] > 0 and r["tokens_per_s"] > 0
        assert r["size_mb"] > 0 and r["train_loss"] is not None and r["eval_loss"] is not None
        assert r["curve_json"]["train"] and r["curve_json"]["eval"]
        assert r["mode"] == ("verbalizer" if r["model"] == "llama" else "head")
    full = [r for r in cells if r["method"] == "full"]
    assert all(abs(r["trainable_pct"] - 100) < 1e-6 for r in full)
    assert all(r["trainable_pct"] < 100 for r in cells if r["method"] != "full")
    references = [r for r in second.rows if r["role"] == "reference"]
    assert [(b["method"], b["task"]) for b in references] == [
        (m, t) for t in ("reviews", "pairs") for m in ("majority", "tfidf", "tfidf-full", "zero-shot")
    ]
    assert all(b["status"] == "done" and b["main_value"] is not None and b["n"] == 12 for b in references)
    # the rows are written once per task: train / validation / dev, and instructions for the causal LMs
    assert len(list((out / "data").glob("*/train.sft.jsonl"))) == 2
    # readable cell folders: model-method-task-seedN-<key>
    assert all(Path(r["cell_dir"]).name.startswith(f"{r['model']}-{r['method']}-{r['task']}-seed42-") for r in cells)


def test_every_row_records_where_its_time_went(grid_run):
    """Each row's wall time split into phases (compare/cell.py), each >= 0 ("other" included: phases that
    overlapped would make it negative), summing to the row's wall time; shown in results.md and report.html."""
    from tunelab.compare.cell import PHASES

    _, second, out, _ = grid_run
    for r in second.rows:
        result = json.loads((Path(r["cell_dir"]) / "result.json").read_text()) if r["role"] == "method" or \
            r["method"] == "zero-shot" else None  # fmt: skip
        phases, wall = (result["phases"], result["wall_s"]) if result else (r["phases"], r["wall_s"])
        assert phases == r["phases"], r["method"]  # results.db keeps what the cell wrote
        assert all(v >= 0 for v in phases.values()), (r["model"], r["method"], phases)
        assert sum(phases.values()) == pytest.approx(wall, abs=0.05), (r["model"], r["method"], phases, wall)
        if result is None:  # majority / TF-IDF: fitted in the grid's process, no start-up
            assert set(phases) == {"loading", "scoring"}
            continue
        assert set(phases) == set(PHASES) and phases["startup"] > 0 and phases["loading"] > 0
        assert phases["scoring"] > 0 and phases["other"] < 0.5 * wall
        if r["method"] == "zero-shot":
            assert phases["training"] == phases["saving"] == 0
        else:
            assert phases["training"] > 0 and phases["saving"] > 0
            assert r["tokens_per_s"] > 0
    md = (out / "results.md").read_text()
    assert "| Training % |" in md and "| Start-up | Loading | Training | Scoring |" in md
    assert "Where the time went" in (out / "report.html").read_text()


def test_outputs_exist_and_agree(grid_run):
    _, second, out, _ = grid_run
    rows = second.rows
    db = sqlite3.connect(out / "results.db")
    db.row_factory = sqlite3.Row
    in_db = {r["key"]: dict(r) for r in db.execute("SELECT * FROM cells")}
    as_json = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        as_csv = list(csv.DictReader(f))
    md = (out / "results.md").read_text()
    html = (out / "report.html").read_text()
    assert len(as_json) == len(as_csv) == len(rows) == 14 + 6  # cells (2 zero-shot) + 3 references per task
    for j, c in zip(as_json, as_csv):
        d = in_db[j["key"]]
        assert c["key"] == j["key"]
        assert (j["model"], j["method"], j["task"], j["status"]) == (d["model"], d["method"], d["task"], d["status"])
        assert j["main_value"] == pytest.approx(d["main_value"]) == pytest.approx(float(c["main_value"]))
        assert j["metrics"] == json.loads(d["metrics_json"]) == json.loads(c["metrics"])
        assert j["peak_rss_mb"] == d["peak_rss_mb"]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {j['model']} | {j['method']} | {j['task']} | "))
        assert f"{j['main_value']:.4f}" in line
        assert f"{j['main_value']:.4f}" in html
    assert md.startswith("## reviews") and "| Model | Method | Task | Seed |" in md and "Peak MB" in md
    assert html.count('<img alt="plot" src="data:image/png;base64,') == 6  # 3 plots × 2 tasks
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert ("Winner:" in html) != ("Tied within noise:" in html) and "Strongest reference:" in html


def test_failing_cell_is_recorded_and_an_interrupted_cell_resumes(assets, tmp_path):
    grid = grid_for(
        assets,
        tmp_path / "out",
        models=[{"name": str(assets / "bert"), "label": "bert"}],
        methods=[{"name": "lora", "target_modules": ["no_such_layer"]}, {"name": "full", "training": {"max_steps": 4}}],
        tasks=None,
        baselines=[],
    )
    grid["tasks"] = grid["tasks"][:1]
    first = run_grid(grid, cell_hooks={"interrupt_at_step": 2}, **QUIET)
    rows = {r["method"]: r for r in first.rows}
    assert rows["lora"]["status"] == "failed" and "PeftModuleError" in rows["lora"]["error"]
    assert rows["full"]["status"] == "interrupted" and first.interrupted
    second = run_grid(grid, **QUIET)
    rows = {r["method"]: r for r in second.rows}
    assert second.trained_now == 1 and second.skipped == 1 and second.failed == 1
    assert rows["full"]["status"] == "done" and rows["full"]["resumed_from_step"] == 2
    assert rows["full"]["train_json"]["steps"] == 4 and rows["full"]["attempts"] == 2
    steps = [s for s, _ in rows["full"]["curve_json"]["train"]]
    assert steps == [1, 2, 3, 4]  # resumed, no step trained twice
    assert "PeftModuleError" in (tmp_path / "out" / "results.md").read_text()
    third = run_grid(grid, retry_failed=True, **QUIET)
    assert third.trained_now == 1 and third.failed == 1  # only the failed cell ran again


def test_grid_errors_name_the_key(assets, tmp_path):
    good = grid_for(assets, tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown key 'modles'.*Did you mean 'models'"):
        load_grid({**good, "modles": []})
    bad = {**good, "methods": [{"name": "lora", "rank": 8}]}
    with pytest.raises(ConfigError, match="unknown key 'rank' for method 'lora'"):
        load_grid(bad)
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*Did you mean 'lora'"):
        load_grid({**good, "methods": ["lorra"]})
    with pytest.raises(ConfigError, match="unknown key 'training.lerning_rate'"):
        load_grid({**good, "base": {"training": {"lerning_rate": 1}}})
    with pytest.raises(ConfigError, match="decided per cell"):
        load_grid({**good, "base": {"stage": "sft"}})
    with pytest.raises(ConfigError, match="labels"):
        load_grid({**good, "tasks": [{"name": "mine", "train_file": good["tasks"][0]["train_file"],
                                      "dev_file": good["tasks"][0]["dev_file"]}]})  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**good, "tasks": [{"name": "sst2", "train_limt": 5}]}, sort_keys=False))
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\[0\].train_limt' \(line \d+\).*'train_limit'"):
        load_grid(path)


def test_fields_added_later_keep_a_grids_cells_at_their_default(assets, tmp_path):
    """A cell's key hashes its whole resolved config, so a field a later version adds (LoRA's use_dora ...) would give
    every LoRA cell of an earlier grid folder a new key and a re-run: at its default it is left out of the hash."""
    from tunelab.compare.plan import HASHED_WHEN_SET, resolve_cells
    from tunelab.config import load_config

    def lora_key(**extra):
        grid = load_grid(grid_for(assets, tmp_path / "o", methods=[{"name": "lora", "r": 4, **extra}]))
        return [c.key for c in resolve_cells(grid, tmp_path / "o", materialise=False) if c.role == "method"]

    assert lora_key() == lora_key(use_dora=False, use_rslora=False, loraplus_lr_ratio=None, init="default",
                                  pissa_niter=16)  # fmt: skip
    keys = [lora_key(), lora_key(use_dora=True), lora_key(use_rslora=True), lora_key(loraplus_lr_ratio=16),
            lora_key(init="pissa")]  # fmt: skip
    assert all(len(k) == 4 for k in keys) and len({k for ks in keys for k in ks}) == 20  # 2 models x 2 tasks each
    defaults = load_config({"method": {"name": "lora"}}).model_dump(mode="json")
    for path, default in HASHED_WHEN_SET:  # only ever a field's (or a section's) real default
        value = defaults
        for k in path:
            value = value[k]
        assert value == default, path
    # the demo's cells keep their keys: every field is either hashed since the start or in HASHED_WHEN_SET
    demo = load_grid(Path(__file__).parents[1] / "examples" / "compare-sst2.yaml")
    keys = {c.method: c.key for c in resolve_cells(demo, tmp_path / "demo", materialise=False) if c.role == "method"}
    assert keys["lora"].startswith("b2921025")  # the key of every demo run since the sixteenth session


def test_a_local_model_or_adapter_changed_in_place_runs_its_cells_again(assets, tmp_path):
    """A cell's key holds the content of local weights, not only their path: a model (or a starting adapter)
    retrained in place must not let a grid folder reuse cells scored with the old weights."""
    import os
    import shutil

    model, adapter = tmp_path / "llama", tmp_path / "sft-run" / "final"
    shutil.copytree(assets / "llama", model)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"first adapter")
    out = tmp_path / "o"
    out.mkdir()
    grid = load_grid(grid_for(assets, out, models=[{"name": str(model), "label": "llama",
                                                    "data": {"max_length": 256}}],
                              methods=[{"name": "lora", "r": 4, "start_from": str(adapter.parent)}, "bitfit"]))  # fmt: skip

    def keys():
        return {(c.method, c.task, c.role): c.key for c in resolve_cells(grid, out, materialise=False)}

    first = keys()
    assert len(first) == 6 and (out / "fingerprints.json").is_file()  # a zero-shot, lora and bitfit cell a task
    weights = model / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # touched, same bytes: the same cells
    assert keys() == first
    (adapter / "adapter_model.safetensors").write_bytes(b"other adapter")  # retrained in place: lora's cells only
    changed = {k for k, v in keys().items() if first[k] != v}
    assert {m for m, _, _ in changed} == {"lora"} and len(changed) == 2
    before = keys()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert all(before[k] != v for k, v in keys().items())  # the model's content is in every cell's key


def test_a_hub_branch_that_moved_runs_its_cells_again_at_the_new_commit(assets, tmp_path, monkeypatch):
    """A hub id is keyed by the commit its branch names when the grid is planned, and its cells run at that
    commit: after `main` moves, the cells run again (on the new weights) instead of reusing scores of the old
    ones; a pinned commit keeps its keys. A stand-in hub: the hub cache's own layout, offline."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = hub / "models--me--tiny"

    def publish(commit):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    def cells(revision=None):
        model = {"name": "me/tiny", "label": "tiny", "kind": "causal", "model": {"revision": revision}}
        grid = load_grid(grid_for(assets, tmp_path / "o", models=[model], methods=["bitfit"]))
        return {(c.role, c.task): c for c in resolve_cells(grid, tmp_path / "o", materialise=False)}

    first, second = "a" * 40, "b" * 40
    publish(first)
    before = cells()
    assert len(before) == 4 and {c.config["model"]["revision"] for c in before.values()} == {first}
    assert {k: c.key for k, c in cells().items()} == {k: c.key for k, c in before.items()}  # planned again: reused
    publish(second)  # main moves on
    after = cells()
    assert all(after[k].key != c.key for k, c in before.items())
    assert {c.config["model"]["revision"] for c in after.values()} == {second}
    pinned = {k: c.key for k, c in cells(first).items()}
    publish("c" * 40)
    assert {k: c.key for k, c in cells(first).items()} == pinned  # a commit names itself: no lookup


def test_cli_prints_the_table_and_report(grid_run, tmp_path, capsys):
    from tunelab.cli import main

    _, _, out, grid = grid_run
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    assert main(["compare", str(path), "--only-report"]) == 0
    text = capsys.readouterr().out
    assert "| Model | Method | Task |" in text and f"report: {out / 'report.html'}" in text
    assert "0 cells run now, 14 reused" in text and "## reviews" in text and "Strongest reference" in text


def test_ray_executor_wiring_with_a_stand_in_ray(assets, tmp_path, monkeypatch):
    """The Ray path (remote tasks, wait, results) against a synchronous stand-in for the ray module."""
    from tunelab.compare import executors

    class Ref:
        def __init__(self, value):
            self.value = value

    class Remote:
        def __init__(self, fn):
            self.fn, self.calls = fn, []

        def options(self, **kw):
            fake.options.append(kw)
            return self

        def remote(self, spec):
            return Ref(self.fn(spec))

    fake = types.SimpleNamespace(options=[], address="unset")
    fake.is_initialized = lambda: False
    fake.init = lambda address=None, **kw: setattr(fake, "address", address)
    fake.remote = Remote
    fake.wait = lambda refs, num_returns=1: (refs[:1], refs[1:])
    fake.get = lambda ref: ref.value
    fake.cancel = lambda ref, force=False: None
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(executors, "_ray_cell", lambda spec: executors.LocalExecutor("forkserver").run_one(spec)[0])
    grid = grid_for(assets, tmp_path / "out", models=[{"name": str(assets / "bert"), "label": "bert"}],
                    methods=["bitfit"], baselines=[])  # fmt: skip
    result = run_grid(grid, executor="ray", address="ray://head:10001", **QUIET)
    assert fake.address == "ray://head:10001"
    assert fake.options == [{"num_cpus": 1, "num_gpus": 0}] * 2
    assert result.trained_now == 2 and all(r["status"] == "done" for r in result.rows)


def test_ray_missing_is_a_clear_error(assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    grid = grid_for(assets, tmp_path / "out", models=[{"name": str(assets / "bert"), "label": "bert"}],
                    methods=["bitfit"], baselines=[])  # fmt: skip
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[ray\]'"):
        run_grid(grid, executor="ray", **QUIET)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'tunelab[ray]')")
def test_ray_executor_on_a_local_ray(assets, tmp_path):
    grid = grid_for(assets, tmp_path / "out", models=[{"name": str(assets / "bert"), "label": "bert"}],
                    methods=["bitfit"], baselines=[])  # fmt: skip
    grid["tasks"] = grid["tasks"][:1]
    result = run_grid(grid, executor="ray", **QUIET)
    assert result.trained_now == 1 and result.rows[0]["status"] == "done"


def test_report_screenshot_is_not_blank(grid_run, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import compare_report_screenshot as shot
    finally:
        sys.path.pop(0)
    if shot.find_chromium() is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    out = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_report_screenshot.py"), str(grid_run[2] / "report.html"),
         "--out", str(out)], capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["std"] >= shot.MIN_STD


def test_predictions_recompute_every_metric_of_the_table(grid_run):
    """Each cell's and reference's predictions.jsonl gives back its table metrics exactly, on the dev rows."""
    from tunelab.compare.plan import read_jsonl, task_object
    from tunelab.evaluation.prediction_rows import prediction_metrics, read_predictions

    _, second, _, grid = grid_run
    g = load_grid(grid)
    tasks = {t.shown: task_object(t) for t in g.tasks}
    dev = {t.shown: read_jsonl(next((second.output_dir / "data").glob(f"{t.shown}-*/dev.jsonl"))) for t in g.tasks}
    for r in second.rows:
        preds = read_predictions(Path(r["cell_dir"]) / "predictions.jsonl")
        assert len(preds) == r["n"] == 12
        assert [p["index"] for p in preds] == list(range(12))
        assert [p["label"] for p in preds] == [d["label"] for d in dev[r["task"]]]
        assert prediction_metrics(tasks[r["task"]], preds) == r["metrics"], (r["model"], r["method"])
        assert r["ci_low"] <= r["main_value"] <= r["ci_high"]


def test_lr_choice_never_reads_the_scored_rows(assets, tmp_path):
    """Two learning rates chosen on validation rows: poisoning the dev rows' labels changes the score, not the choice."""
    rows = [json.loads(line) for line in (assets / "reviews-dev.jsonl").read_text().splitlines()]
    poisoned = tmp_path / "reviews-dev-poisoned.jsonl"
    poisoned.write_text("".join(json.dumps({**r, "label": 1 - r["label"]}) + "\n" for r in rows))

    def grid(out, dev_file):
        g = grid_for(assets, out, models=[{"name": str(assets / "bert"), "label": "bert"}], baselines=[],
                     methods=[{"name": "full", "training": {"lr": [1e-5, 2e-3], "max_steps": 4}}])  # fmt: skip
        g["tasks"] = [{**g["tasks"][0], "dev_file": str(dev_file), "val_limit": 8}]
        return g

    clean = cells_of(run_grid(grid(tmp_path / "clean", assets / "reviews-dev.jsonl"), **QUIET))[0]
    bad = cells_of(run_grid(grid(tmp_path / "poisoned", poisoned), **QUIET))[0]
    assert clean["status"] == bad["status"] == "done"
    assert clean["chosen_lr"] == bad["chosen_lr"] and clean["chosen_lr"] in (1e-5, 2e-3)
    assert [s["val_metrics"] for s in clean["sweep_json"]] == [s["val_metrics"] for s in bad["sweep_json"]]
    assert [s["lr"] for s in clean["sweep_json"]] == [1e-5, 2e-3]
    assert bad["main_value"] == pytest.approx(1 - clean["main_value"])  # the same model, scored on flipped labels
    # each learning rate trained its own run; the chosen one is the one scored
    runs = sorted(p.name for p in Path(clean["cell_dir"]).iterdir() if p.name.startswith("run-lr"))
    assert runs == ["run-lr0.002", "run-lr1e-05"] and clean["run_dir"].endswith(f"run-lr{clean['chosen_lr']:g}")


def test_the_cells_shortcuts_leave_every_score_as_it_was(assets, tmp_path):
    """A learning-rate sweep computes the eval loss of the starting model once (compare/cell.py); the
    `plain` hook turns that off. Both grids give the same records, predictions and logged curves."""

    def grid(out):
        g = grid_for(assets, out, models=[{"name": str(assets / "llama"), "label": "llama", "data": {"max_length": 256}}],
                     methods=[{"name": "lora", "r": 4, "dropout": 0.0, "training": {"lr": [1e-3, 5e-3]}}],
                     baselines=[], zero_shot=False)  # fmt: skip
        g["tasks"] = [{**g["tasks"][0], "val_limit": 8}]
        g["base"]["training"]["eval_batches"] = 1
        return g

    plain = cells_of(run_grid(grid(tmp_path / "plain"), cell_hooks={"plain": True}, **QUIET))[0]
    fast = cells_of(run_grid(grid(tmp_path / "fast"), **QUIET))[0]
    assert plain["status"] == fast["status"] == "done", (plain["error"], fast["error"])
    for k in ("metrics", "main_value", "chosen_lr", "train_loss", "eval_loss", "curve_json"):
        assert plain[k] == fast[k], k
    timed = ("tokens_per_s",)
    assert {k: v for k, v in plain["train_json"].items() if k not in timed} == \
        {k: v for k, v in fast["train_json"].items() if k not in timed}  # fmt: skip
    assert [{**e, "run_dir": None} for e in plain["sweep_json"]] == [{**e, "run_dir": None} for e in fast["sweep_json"]]

    def lines(row, name):
        out = []
        for path in sorted(Path(row["cell_dir"]).glob(f"**/{name}")):
            out += [
                {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in path.read_text().splitlines()
            ]
        return out

    assert lines(plain, "predictions.jsonl") == lines(fast, "predictions.jsonl") != []
    assert lines(plain, "val_predictions.jsonl") == lines(fast, "val_predictions.jsonl") != []
    assert lines(plain, "metrics.jsonl") == lines(fast, "metrics.jsonl") != []
    reused = "(that of the same starting model)"
    assert reused in (Path(fast["cell_dir"]) / "log.txt").read_text()
    assert reused not in (Path(plain["cell_dir"]) / "log.txt").read_text()
    # the dev rows are scored on the model the validation rows were, when the last rate tried is chosen
    kept = "scoring the dev rows with the chosen run as loaded"
    assert (kept in (Path(fast["cell_dir"]) / "log.txt").read_text()) == (fast["chosen_lr"] == 5e-3)
    assert kept not in (Path(plain["cell_dir"]) / "log.txt").read_text()


def test_seeds_repeat_each_cell_and_the_report_averages_them(assets, tmp_path):
    g = grid_for(assets, tmp_path / "seeds", models=[{"name": str(assets / "bert"), "label": "bert"}], baselines=[],
                 methods=["bitfit", {"name": "full", "training": {"lr": 1e-3}}], seeds=[0, 1])  # fmt: skip
    g["tasks"] = g["tasks"][:1]
    result = run_grid(g, **QUIET)
    cells = cells_of(result)
    assert sorted((c["method"], c["seed"]) for c in cells) == [("bitfit", 0), ("bitfit", 1), ("full", 0), ("full", 1)]
    assert all(c["config_json"]["training"]["seed"] == c["seed"] for c in cells)
    full = [c for c in cells if c["method"] == "full"]
    assert full[0]["train_loss"] != full[1]["train_loss"]  # another seed, another training
    a = result.analyses["reviews"]
    group = next(x for x in a["methods"] if x.method == "full")
    assert len(group.rows) == 2 and group.sd is not None and group.n == 12
    assert group.mean == pytest.approx(sum(c["main_value"] for c in full) / 2)
    assert set(a["seed_orders"]) == {0, 1}
    assert "over 2 seeds" in (tmp_path / "seeds" / "results.md").read_text()


def test_every_stored_column_has_one_source():
    """compare/record.py defines a row once: every stored column is filled by the plan, the result, or
    the store / run itself, and names are unique."""
    from tunelab.compare.record import COLUMNS, EXPORTED, STORED

    filled_by_run = {"key", "cell_dir", "updated_at"}  # the store's key, the cell's folder, the write time
    assert [c.name for c in STORED if not (c.plan or c.result) and c.name not in filled_by_run] == []
    names = [c.name for c in COLUMNS]
    assert len(names) == len(set(names))
    assert {"ci_low", "ci_high", "metrics", "key"} <= set(EXPORTED)


def test_tunelab_config_validates_a_grid_file(assets, tmp_path, capsys):
    from tunelab.cli import main

    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_for(assets, tmp_path / "never"), sort_keys=False))
    assert main(["config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "grid OK: 14 cells" in text and "llama × zero-shot × reviews" in text and "majority" in text
    assert not (tmp_path / "never").exists()  # validated, nothing run or written
    path.write_text(yaml.safe_dump(grid_for(assets, tmp_path / "never", methods=[{"name": "lora", "rank": 8}])))
    assert main(["config", str(path)]) == 2
    assert "unknown key 'rank' for method 'lora'" in capsys.readouterr().err


def test_score_dtype_bfloat16_is_keyed_recorded_and_scores_as_fp32_within_bf16s_rounding(assets, tmp_path, monkeypatch):
    """`score_dtype: bfloat16` (the scoring passes in bf16 where the device has it natively): the cells get keys of
    their own, every row records the precision it was scored in, and the scores stay within bf16's rounding."""
    import torch

    from tunelab.compare import cell
    from tunelab.compare.run import describe_grid
    from tunelab.data.tasks import Task
    from tunelab.evaluation.predictions import verbalizer_predictions
    from tunelab.models.precision import native_bf16
    from tunelab.testing import tiny_bert, tiny_llama, tiny_tokenizer

    def keys(**extra):
        grid = load_grid(grid_for(assets, tmp_path / "o", methods=["bitfit"], **extra))
        return {c.key for c in resolve_cells(grid, tmp_path / "o", materialise=False)}

    assert keys() == keys(score_dtype="as_loaded") and not keys() & keys(score_dtype="bfloat16")
    assert "scoring passes in bfloat16" in describe_grid(grid_for(assets, tmp_path / "o", score_dtype="bfloat16"))
    assert "scoring passes" not in describe_grid(grid_for(assets, tmp_path / "o"))
    with pytest.raises(ConfigError, match="score_dtype"):
        load_grid(grid_for(assets, tmp_path / "o", score_dtype="float16"))

    # the cast, with and without native bf16, and over a 4-bit base
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok)).eval()
    task = Task(name="reviews", type="classification", labels=("negative", "positive"))
    rows = toy_rows(40, 3)
    fp32 = verbalizer_predictions(model, tok, task, rows, "cpu", progress=False)
    result = {}
    monkeypatch.setattr(cell, "native_bf16", lambda device: (False, "no native bf16 here"))
    assert cell.scoring_precision(model, "bfloat16", "cpu", result) is model and model.dtype == torch.float32
    assert result == {
        "score_dtype": "float32",
        "score_dtype_note": "bfloat16 asked, scored as loaded: no native bf16 here",
    }
    monkeypatch.setattr(cell, "native_bf16", lambda device: (True, "native"))
    result = {}
    cell.scoring_precision(model, "bfloat16", "cpu", result, keep="a quantized base")
    assert (
        model.dtype == torch.float32
        and result["score_dtype"] == "float32"
        and "quantized" in result["score_dtype_note"]
    )
    result = {}
    bf16 = verbalizer_predictions(cell.scoring_precision(model, "bfloat16", "cpu", result), tok, task, rows, "cpu",
                                  progress=False)  # fmt: skip
    assert result == {"score_dtype": "bfloat16"} and model.dtype == torch.bfloat16
    gaps = [abs(a - b) for p, q in zip(fp32, bf16) for a, b in zip(p["scores"], q["scores"])]
    assert 0 < max(gaps) < 0.1, max(gaps)  # bf16 changed the scores, by its rounding only

    # an encoder's classification head: the body in bf16, the head in fp32 on its bf16 input (its two logits in
    # bf16 would tie or swap)
    encoder = tiny_bert(len(tok)).eval()
    result = {}
    cell.scoring_precision(encoder, "bfloat16", "cpu", result)
    assert result == {"score_dtype": "bfloat16"} and encoder.bert.pooler.dense.weight.dtype == torch.bfloat16
    pooled = {}
    encoder.bert.pooler.register_forward_hook(lambda m, i, o: pooled.setdefault("out", o))
    with torch.no_grad():
        logits = encoder(input_ids=torch.randint(3, 300, (6, 9))).logits
    head = encoder.classifier
    assert logits.dtype == torch.float32 and pooled["out"].dtype == torch.bfloat16
    torch.testing.assert_close(logits, pooled["out"].float() @ head.weight.T + head.bias, rtol=1e-6, atol=1e-6)

    # a grid records it per row: bfloat16 where this host has it natively, else as loaded
    out = tmp_path / "run"
    g = grid_for(assets, out, methods=["bitfit"], baselines=[], score_dtype="bfloat16")
    g["tasks"] = g["tasks"][:1]
    rows = run_grid(g, **QUIET).rows
    assert all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    models = [r for r in rows if r["kind"] != "baseline"]
    assert sorted(r["kind"] for r in models) == ["causal", "causal", "encoder"]
    expected = "bfloat16" if native_bf16("cpu")[0] else "float32"
    assert {r["score_dtype"] for r in models} == {expected}
    written = json.loads((out / "results.json").read_text())
    assert {r["score_dtype"] for r in written if r["kind"] != "baseline"} == {expected}
