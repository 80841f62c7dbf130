"""The Runs tab: every run folder under the UI's runs folder, with its config, metrics, curves and final
scores; two or more picked are overlaid on one plot.

What a run folder holds is what `tunelab train` writes (training/harness.py): config.yaml (the full config),
metrics.jsonl (one JSON object per logged step or evaluation), results.json (the final metrics, once it
finished) and checkpoints/ (while it can be resumed). Read here, never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tunelab.ui import jobs
from tunelab.ui.context import UIContext, on_page_load

CURVES = ("loss", "eval_loss", "lr")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; a line still being written (the run is live) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_config(run_dir: Path) -> dict:
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def is_run(path: Path) -> bool:
    return (
        path.is_dir()
        and not path.name.startswith(".")
        and any((path / f).exists() for f in ("config.yaml", "metrics.jsonl", "results.json"))
    )


def run_state(run_dir: Path, running: set[str]) -> str:
    if str(run_dir) in running:
        return "running"
    if (run_dir / "results.json").is_file():
        return "finished"
    if (run_dir / "checkpoints").is_dir():
        return "stopped (resumable)"
    return "incomplete"


def last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if key in r), None)


def list_runs(ctx: UIContext) -> list[dict]:
    """One summary per run folder under ctx.runs (also runs the CLI wrote there), newest first."""
    root = ctx.runs
    if not root.is_dir():
        return []
    running = {j.run_dir for j in jobs.list_jobs(ctx.jobs) if j.run_dir and j.running()}
    out = []
    for d in sorted((p for p in root.iterdir() if is_run(p)), key=lambda p: p.stat().st_mtime, reverse=True):
        cfg, results, metrics = read_config(d), read_json(d / "results.json"), read_metrics(d)
        out.append({
            "run": d.name,
            "state": run_state(d, running),
            "stage": cfg.get("stage", ""),
            "method": (cfg.get("method") or {}).get("name", ""),
            "model": (cfg.get("model") or {}).get("name", ""),
            "steps": results.get("steps", last(metrics, "step")),
            "train loss": results.get("train_loss", last(metrics, "loss")),
            "eval loss": results.get("eval_loss", last(metrics, "eval_loss")),
        })  # fmt: skip
    return out


def curve_rows(metrics: list[dict], keys: tuple[str, ...], series: str | None = None) -> list[dict]:
    """Long-format points {step, value, series} of the given metrics (series: the metric, or `series` given)."""
    return [
        {"step": r["step"], "value": float(r[k]), "series": series or k}
        for r in metrics
        for k in keys
        if isinstance(r.get(k), int | float)
    ]


def frame(points: list[dict]):
    import pandas as pd

    return pd.DataFrame(points, columns=["step", "value", "series"])


def scores_table(results: dict) -> list[list]:
    """results.json as (metric, value) rows, numbers as they are (the page shows what the file holds)."""
    return [[k, v if isinstance(v, int | float | str) else json.dumps(v)] for k, v in results.items()]


def overlay(ctx: UIContext, names: list[str], key: str) -> list[dict]:
    return [p for n in names or [] for p in curve_rows(read_metrics(ctx.runs / n), (key,), series=n)]


# ---------------------------------------------------------------------------------------------- the tab
def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    columns = ["run", "state", "stage", "method", "model", "steps", "train loss", "eval loss"]

    def table():
        return [[r[c] for c in columns] for r in list_runs(ctx)]

    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
    runs_table = gr.Dataframe(headers=columns, value=table, interactive=False, label=f"runs under {ctx.runs}",
                              elem_id="runs-table")  # fmt: skip
    picked = gr.Dropdown(choices=[], multiselect=True, label="runs to show (two or more: their curves overlaid)",
                         elem_id="runs-picked")  # fmt: skip
    with gr.Row():
        loss_plot = gr.LinePlot(frame([]), x="step", y="value", color="series", title="training loss",
                                elem_id="runs-loss")  # fmt: skip
        eval_plot = gr.LinePlot(frame([]), x="step", y="value", color="series", title="eval loss",
                                elem_id="runs-eval-loss")  # fmt: skip
        lr_plot = gr.LinePlot(frame([]), x="step", y="value", color="series", title="learning rate",
                              elem_id="runs-lr")  # fmt: skip
    with gr.Row():
        scores = gr.Dataframe(headers=["metric", "value"], interactive=False, label="final scores (results.json)",
                              elem_id="runs-scores")  # fmt: skip
        config = gr.Code(language="yaml", label="config.yaml", interactive=False, max_lines=24, elem_id="runs-config")

    def refresh_list(current):
        names = [r["run"] for r in list_runs(ctx)]
        keep = [n for n in current or [] if n in names]
        return table(), gr.update(choices=names, value=keep)

    def show(names):
        names = names or []
        first = ctx.runs / names[0] if names else None
        text = (first / "config.yaml").read_text() if first and (first / "config.yaml").is_file() else ""
        results = read_json(first / "results.json") if first else {}
        plots = [frame(overlay(ctx, names, k)) for k in CURVES]
        return [*plots, scores_table(results), text]

    def colors(names):
        # sent after the data: a new colour map redraws the plot from the data it has now, with every run in
        # its legend (the page's plot otherwise keeps the series of its first drawing)
        palette = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names or [])}
        return [gr.update(color_map=palette) for _ in CURVES]

    refresh.click(refresh_list, [picked], [runs_table, picked])
    picked.change(show, [picked], [loss_plot, eval_plot, lr_plot, scores, config]).then(
        colors, [picked], [loss_plot, eval_plot, lr_plot], show_progress="hidden"
    )
    on_page_load(refresh_list, [picked], [runs_table, picked])
