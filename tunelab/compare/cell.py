"""Run one cell of a grid: `python -m tunelab.compare.cell CELL.json` (or `run_cell(spec)` in a fresh process).

Trains (resuming from the cell's latest checkpoint if an earlier attempt was interrupted), scores the
result on the task, measures it, and writes CELL_DIR/result.json:

  status          done | failed | interrupted
  metrics         the task metrics (accuracy, f1, mcc / pearson, spearman / perplexity ...)
  train           steps, train_loss, eval_loss, eval_loss_before, trainable_params, total_params, tokens,
                  tokens_per_s (training throughput of this attempt)
  peak_rss_mb     this process's peak resident memory (getrusage ru_maxrss): the cell runs alone in it
  cuda_peak_mb    torch.cuda.max_memory_allocated, on CUDA
  wall_s          seconds of this attempt (load + train + score); wall_s_total sums every attempt
  size_mb         what the method saved (the run's final/ folder); weights_mb: its weight files only

A cell that already has final/ (training finished, scoring did not) is only scored again.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def score(run_dir: Path, ev: dict, run_metrics: dict, device: str) -> dict:
    """The task metrics of a finished run (see cells.py for which scorer a cell uses)."""
    if ev["mode"] == "head":  # the classification stage scored its dev rows at the end of training
        return {k[4:]: v for k, v in run_metrics.items() if k.startswith("dev_")}
    if ev["preset"] and not ev.get("dev_file"):
        from tunelab.evaluation.runner import evaluate

        out = evaluate(
            str(run_dir), ev["preset"], limit=ev["dev_limit"], device=device, seed=ev["seed"], progress=False
        )
        return out["metrics"]
    # your own dev file: the same scorers as tunelab.evaluation.runner, on the cell's dev rows
    from tunelab.compare.cells import task_object, task_rows
    from tunelab.compare.grid import TaskEntry
    from tunelab.evaluation.runner import response_perplexity, verbalizer_scores
    from tunelab.inference import load_run
    from tunelab.models import resolve_device

    fp = ev["fingerprint"]
    fields = {k: fp[k] for k in ("name", "type", "labels", "train_limit", "dev_limit") if fp.get(k) is not None}
    entry = TaskEntry.model_validate({**fields, "train_file": ev["train_file"], "dev_file": ev["dev_file"]})
    task = task_object(entry)
    rows = task_rows(entry, "dev", ev["seed"])
    model, tokenizer = load_run(str(run_dir), device=device)
    dev = resolve_device(device)
    if ev["mode"] == "verbalizer":
        return verbalizer_scores(model, tokenizer, task, rows, dev, progress=False)
    return response_perplexity(model, tokenizer, rows, dev, progress=False)


def run_cell(spec: dict) -> dict:
    """Run the cell `spec` (see Cell.spec) in this process; return and write its result."""
    t0 = time.perf_counter()
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
    }
    _write(cell_dir / "result.json", {**result, "status": "running"})
    try:
        _run(spec, result)
    except KeyboardInterrupt:
        result["status"], result["error"] = "interrupted", "interrupted (Ctrl-C / SIGTERM) before training ended"
    except BaseException as e:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        result["status"], result["error"] = "failed", f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        run_dir = Path(spec["config"]["output_dir"])
        result["peak_rss_mb"] = _peak_rss_mb()
        result["cuda_peak_mb"] = _cuda_peak_mb()
        result["wall_s"] = round(time.perf_counter() - t0, 2)
        result["wall_s_total"] = round(earlier_s + result["wall_s"], 2)
        result["size_mb"] = round(_folder_bytes(run_dir / "final") / 2**20, 3)
        result["weights_mb"] = round(_folder_bytes(run_dir / "final", WEIGHT_SUFFIXES) / 2**20, 3)
        result["curve"] = loss_curve(run_dir)
        _write(cell_dir / "result.json", result)
    return result


def _run(spec: dict, result: dict) -> None:
    import tunelab
    from tunelab.config import load_config
    from tunelab.training import checkpoint as ckpt

    cfg = load_config(spec["config"])
    if cfg.training.threads:
        import torch

        torch.set_num_threads(cfg.training.threads)
    run_dir = Path(cfg.output_dir)
    finished = (run_dir / "final" / "tunelab.json").is_file() and (run_dir / "results.json").is_file()
    if finished:
        run_metrics = json.loads((run_dir / "results.json").read_text())
    else:
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
        run = tunelab.train(cfg, resume=latest is not None, callbacks=callbacks)
        result["trained"] = True
        run_metrics = run.metrics
        if run_metrics.get("interrupted"):
            result["train"] = _train_metrics(run_metrics)
            result["status"], result["error"] = "interrupted", f"interrupted at step {run_metrics['steps']}"
            return
    result["train"] = _train_metrics(run_metrics)
    if (spec.get("hooks") or {}).get("fail_scoring"):
        raise RuntimeError("scoring failed (testing hook)")
    t = time.perf_counter()
    result["metrics"] = score(run_dir, spec["eval"], run_metrics, cfg.training.device)
    result["score_s"] = round(time.perf_counter() - t, 2)
    result["status"] = "done"


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
    return {k: m.get(k) for k in keys}


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
