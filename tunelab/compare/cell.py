"""Run one cell of a grid: `python -m tunelab.compare.cell CELL.json` (or `run_cell(spec)` in a fresh process).

Trains (resuming from the cell's latest checkpoint if an earlier attempt was interrupted), scores the
result on the task, measures it, and writes CELL_DIR/result.json:

  status          done | failed | interrupted
  metrics         the task metrics (accuracy, f1, mcc / pearson, spearman / perplexity ...)
  train           steps, train_loss, eval_loss, eval_loss_before, trainable_params, total_params, tokens,
                  tokens_per_s (training throughput of this attempt)
  peak_rss_mb     this process's peak resident memory (getrusage ru_maxrss): the cell runs alone in it
  cuda_peak_mb    torch.cuda.max_memory_allocated, on CUDA
  wall_s          seconds of this attempt, from the executor starting the process to its exit;
                  wall_s_total sums every attempt
  phases          wall_s split (PHASES): startup (process start, imports, until the cell's code runs),
                  loading (model, method, data and tokenising; reloading a run to score it), training
                  (the optimizer steps), scoring (eval loss on validation rows, validation and dev
                  predictions), saving (results, checkpoints), other (the rest: configs, result files),
                  exit (from the result written to the process gone; measured by the executor)
  size_mb         what the method saved (the run's final/ folder); weights_mb: its weight files only
  n               dev rows scored; CELL_DIR/predictions.jsonl holds one line per row (docs/compare.md)
  sweep, chosen   with `training: {lr: [...]}`: each learning rate's validation metrics, the one kept
  run_dir         the run that was scored (the chosen one of a sweep)
  score_dtype     the precision the scoring passes ran in (the grid's `score_dtype`, where the device has it)

A sweep trains one run per learning rate (run-lrX/), scores each on the validation rows (carved from the
train split; run-lrX/val_predictions.jsonl) and keeps the best (`_choose`); only that run is scored on
the dev rows. A run that already has final/
(training finished, scoring did not) is only scored again. A zero-shot reference trains nothing.
Shortcuts that leave every score as it was (the hook `plain` turns them off, for the test that says so):
the rates share the eval loss of their common starting model (computed by the first run), and the
chosen run, when it was the last one tried, scores the dev rows as loaded for its validation rows.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

from tunelab.compare.analysis import lower_is_better
from tunelab.compare.plan import read_jsonl, task_from_eval
from tunelab.config import load_config
from tunelab.evaluation import predictions as P
from tunelab.evaluation.prediction_rows import class_log_loss, prediction_metrics, write_predictions
from tunelab.methods import get as get_method
from tunelab.models import load_model, resolve_device
from tunelab.models.loading import TASK_HEADS, hub_commit, unwrap
from tunelab.models.precision import native_bf16, task_heads_in_fp32
from tunelab.stages.runs import load_run
from tunelab.training import checkpoint as ckpt
from tunelab.training import train
from tunelab.training.harness import timed

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PHASES = ("startup", "loading", "training", "scoring", "saving", "other", "exit")
# training.loop's RunResult.phases -> the cell's phases
RUN_PHASES = {"load": "loading", "data": "loading", "train": "training", "eval": "scoring", "score": "scoring",
              "save": "saving"}  # fmt: skip


def _folder_bytes(folder: Path, suffixes: tuple[str, ...] | None = None) -> int:
    if not folder.is_dir():
        return 0
    return sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and (suffixes is None or p.name.endswith(suffixes))
    )


def _peak_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _cuda_peak_mb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def loss_curve(run_dir: Path, max_points: int = 400) -> dict:
    """{"train": [[step, loss], ...], "eval": [[step, eval_loss], ...]} from the run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    train, evals = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r:
                train.append([r["step"], r["loss"]])
            if r.get("eval_loss") is not None:
                evals.append([r["step"], r["eval_loss"]])
    if len(train) > max_points:
        every = -(-len(train) // max_points)
        train = train[::every] + ([train[-1]] if (len(train) - 1) % every else [])
    return {"train": train, "eval": evals}


def predict_rows(model, tokenizer, task, mode: str, rows: list[dict], device, max_length: int = 256) -> list[dict]:
    """Per-row predictions of a loaded model on `rows`, by the cell's scorer (docs/compare.md)."""
    model.eval()
    if mode == "head":
        return P.classifier_predictions(model, tokenizer, task, rows, device, max_length=max_length)
    if mode == "verbalizer":
        return P.verbalizer_predictions(model, tokenizer, task, rows, device, progress=False)
    return P.perplexity_predictions(model, tokenizer, rows, device, progress=False)


def _score(model_and_tokenizer, cfg, ev: dict, split: str, result: dict) -> list[dict]:
    model, tokenizer = model_and_tokenizer
    rows = read_jsonl(ev["rows"][split])
    max_length = cfg.task.max_length if cfg.task else 256
    device = resolve_device(cfg.training.device)
    keep = None  # why this model is scored as loaded whatever the grid asks
    if get_method(cfg.method.name).CAPABILITIES.quantized_base:
        keep = "a quantized base"
    model = scoring_precision(model, ev.get("score_dtype", "as_loaded"), device, result, keep)
    return predict_rows(model, tokenizer, task_from_eval(ev), ev["mode"], rows, device, max_length)


def scoring_precision(model, wanted: str, device, result: dict, keep: str | None = None):
    """The model in the grid's `score_dtype` where the device runs it natively and nothing `keep`s it as loaded;
    the precision that scored goes into the result (`score_dtype`, with `score_dtype_note` where it is not the
    one asked for)."""
    import torch

    if wanted == "bfloat16":
        ok, why = native_bf16(device)
        if keep:
            ok, why = False, keep
        if ok:
            model = model.to(torch.bfloat16)  # in place: a model loaded for scoring is not trained afterwards
            task_heads_in_fp32(unwrap(model), TASK_HEADS)  # a classifier's few logits would tie in bf16
        else:
            result["score_dtype_note"] = f"bfloat16 asked, scored as loaded: {why}"
    result["score_dtype"] = str(unwrap(model).dtype).removeprefix("torch.")
    return model


def _load_run(run_dir: Path, cfg):
    return load_run(str(run_dir), device=cfg.training.device, trust_remote_code=cfg.model.trust_remote_code)


def run_cell(spec: dict) -> dict:
    """Run the cell `spec` (see Cell.spec) in this process; return and write its result."""
    t0 = time.perf_counter()
    # the executor stamps the spec when it starts the process: the time until here is start-up
    startup = max(0.0, time.time() - spec["launched_at"]) if spec.get("launched_at") else 0.0
    cell_dir = Path(spec["cell_dir"])
    cell_dir.mkdir(parents=True, exist_ok=True)
    previous = _read(cell_dir / "result.json")
    earlier_s = float(previous.get("wall_s_total") or 0.0) if previous.get("status") != "done" else 0.0
    result: dict = {
        "key": spec["key"],
        "label": spec.get("label"),
        "status": "failed",
        "error": None,
        "metrics": {},
        "train": {},
        "attempt": int(previous.get("attempt") or 0) + 1,
        "trained": False,
        "resumed_from_step": None,
        "pid": os.getpid(),
        "phases": {},
    }
    _write(cell_dir / "result.json", {**result, "status": "running"})
    run_dir = Path(spec["config"]["output_dir"])
    try:
        run_dir = _run(spec, result, cell_dir)
    except KeyboardInterrupt:
        result["status"], result["error"] = "interrupted", "interrupted (Ctrl-C / SIGTERM) before training ended"
    except BaseException as e:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        result["status"], result["error"] = "failed", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        result["peak_rss_mb"] = _peak_rss_mb()
        result["cuda_peak_mb"] = _cuda_peak_mb()
        result["run_dir"] = str(run_dir)
        result["size_mb"] = round(_folder_bytes(run_dir / "final") / 2**20, 3)
        result["weights_mb"] = round(_folder_bytes(run_dir / "final", WEIGHT_SUFFIXES) / 2**20, 3)
        result["curve"] = loss_curve(run_dir)
        inside = time.perf_counter() - t0
        # "other" is what no phase measured: never negative unless phases overlap (a test checks)
        phases = {"startup": startup, **result["phases"], "other": inside - sum(result["phases"].values())}
        result["phases"] = {k: round(phases.get(k, 0.0), 3) for k in PHASES[:-1]}  # "exit": the executor's
        result["wall_s"] = round(startup + inside, 2)
        result["wall_s_total"] = round(earlier_s + result["wall_s"], 2)
        _write(cell_dir / "result.json", result)
    return result


def sweep_dir(run_dir: Path, lr: float) -> Path:
    return run_dir.with_name(f"{run_dir.name}-lr{lr:g}")


def _run(spec: dict, result: dict, cell_dir: Path) -> Path:
    """Train (each learning rate of a sweep), pick on the validation rows, score the dev rows; the run used."""
    cfg = load_config(spec["config"])
    if cfg.training.threads:
        import torch

        torch.set_num_threads(cfg.training.threads)
    ev = spec["eval"]
    task = task_from_eval(ev)
    run_dir = Path(cfg.output_dir)
    if spec.get("zero_shot"):  # the reference: the untrained model through the same scorer
        with timed(result["phases"], "loading"):
            loaded = load_model(cfg.model, device=resolve_device(cfg.training.device))
        result["train"] = {"trainable_params": 0, "total_params": sum(p.numel() for p in loaded[0].parameters())}
        if commit := hub_commit(cfg.model):  # as a trained cell records its base's
            result["train"]["base_commit"] = commit
    else:
        sweep = spec.get("sweep") or []
        tried = []
        eval_before = None  # every learning rate starts from the same model: its eval loss is computed once
        plain = (spec.get("hooks") or {}).get("plain")  # testing aid: no shortcut (eval loss, loaded model)
        for lr in sweep or [None]:
            loaded = None  # not held while the next rate trains: the cell's peak memory stays a run's
            c = cfg
            if lr is not None:
                c = load_config({**spec["config"], "output_dir": str(sweep_dir(run_dir, lr)),
                                 "training": {**spec["config"]["training"], "lr": lr}})  # fmt: skip
            run_metrics = _train(c, spec, result, eval_before)
            if not plain:
                eval_before = eval_before or step0_eval(Path(c.output_dir))
            if run_metrics is None:  # interrupted: the checkpoint is written, a re-run resumes
                return Path(c.output_dir)
            entry = {"lr": c.training.lr, "run_dir": c.output_dir, "train": _train_metrics(run_metrics)}
            if sweep:  # choose on the validation rows (carved from the train split), never on the dev rows
                with timed(result["phases"], "loading"):
                    loaded = _load_run(Path(c.output_dir), c)
                with timed(result["phases"], "scoring"):
                    val_predictions = _score(loaded, c, ev, "val", result)
                    write_predictions(Path(c.output_dir) / "val_predictions.jsonl", val_predictions)
                entry["val_metrics"] = prediction_metrics(task, val_predictions)
                log_loss = class_log_loss(val_predictions)
                if log_loss is not None:
                    entry["val_metrics"]["log_loss"] = log_loss
            tried.append(entry)
        chosen = _choose(tried, ev["main_metric"]) if sweep else tried[0]
        if sweep:
            result["sweep"] = [{k: v for k, v in e.items() if k != "train"} for e in tried]
            result["chosen"] = {"lr": chosen["lr"]}
        run_dir = Path(chosen["run_dir"])
        result["train"] = chosen["train"]
        if (spec.get("hooks") or {}).get("fail_scoring"):
            raise RuntimeError("scoring failed (testing hook)")
        if loaded is not None and Path(tried[-1]["run_dir"]) == run_dir and not plain:
            print(f"[compare] scoring the dev rows with the chosen run as loaded for its validation rows ({run_dir})",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            with timed(result["phases"], "loading"):
                loaded = _load_run(run_dir, cfg)
    t = time.perf_counter()
    with timed(result["phases"], "scoring"):
        predictions = _score(loaded, cfg, ev, "dev", result)
        write_predictions(cell_dir / "predictions.jsonl", predictions)
    result["metrics"] = prediction_metrics(task, predictions)
    result["n"] = len(predictions)
    result["score_s"] = round(time.perf_counter() - t, 2)
    result["status"] = "done"
    return run_dir


def _choose(tried: list[dict], metric: str) -> dict:
    """The best run on the validation rows. Classification: the lowest class log-loss (a proper scoring
    rule, far less noisy than accuracy on ~100 rows, which moves in steps of 1/n), then the higher main
    metric; other tasks: the main metric. Remaining ties: the smaller learning rate."""
    sign = 1.0 if lower_is_better(metric) else -1.0

    def rank(e):
        val = e["val_metrics"]
        return (val.get("log_loss", 0.0), sign * val[metric], e["lr"])

    return min(tried, key=rank)


def step0_eval(run_dir: Path) -> dict | None:
    """The evaluation before training logged in a run's metrics.jsonl ({"eval_loss": ..., eval_* extras})."""
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r.get("step") == 0 and "eval_loss" in r:
            return {k: v for k, v in r.items() if k == "eval_loss" or k.startswith("eval_")}
    return None


def _train(cfg, spec: dict, result: dict, eval_before: dict | None = None) -> dict | None:
    """Train one config to its end, resuming from its latest checkpoint; its results.json metrics, or None
    when interrupted. A run that already finished is not trained again. `eval_before`: see training.train."""
    run_dir = Path(cfg.output_dir)
    if (run_dir / "final" / "tunelab.json").is_file() and (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        result["resumed_from_step"] = int(str(latest.name).rsplit("-", 1)[-1])
    callbacks = []
    stop_at = (spec.get("hooks") or {}).get("interrupt_at_step")
    if stop_at and latest is None:  # testing aid: a Ctrl-C at this step of the first attempt

        def _interrupt(step, record):
            if step >= stop_at:
                raise KeyboardInterrupt

        callbacks.append(_interrupt)
    t = time.perf_counter()
    run = train(cfg, resume=latest is not None, callbacks=callbacks, eval_before=eval_before)
    spent = time.perf_counter() - t
    phases = result["phases"]
    for name, seconds in (run.phases or {"train": spent}).items():  # a loop without a split: all training
        phases[RUN_PHASES[name]] = phases.get(RUN_PHASES[name], 0.0) + seconds
    result["trained"] = True
    if run.metrics.get("interrupted"):
        result["train"] = _train_metrics(run.metrics)
        result["status"], result["error"] = "interrupted", f"interrupted at step {run.metrics['steps']}"
        return None
    return run.metrics


def _train_metrics(m: dict) -> dict:
    keys = (
        "steps",
        "train_loss",
        "eval_loss",
        "eval_loss_before",
        "trainable_params",
        "total_params",
        "tokens",
        "tokens_per_s",
    )
    # a hub id's commit (training/loop.py), only where there is one: a local model's rows stay as they were
    return {k: m.get(k) for k in keys} | ({"base_commit": m["base_commit"]} if m.get("base_commit") else {})


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tunelab.compare.cell CELL.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run_cell(spec)
    return {"done": 0, "interrupted": 130}.get(result["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
