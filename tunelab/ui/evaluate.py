"""The Evaluate & export tab: score a run on a task preset (or its perplexity on an uploaded text file),
export it to a Hugging Face folder or a GGUF file, and download the result.

Scoring calls tunelab.evaluation.runner.evaluate and exporting tunelab.export.hf.export, what `tunelab
eval` and `tunelab export` call, with the same arguments and the same errors; both run in the UI's
process (a preset's dev split on a small model takes seconds to minutes), so the result and any error
land beside the form they came from. The intervals are the ones `tunelab compare` gives a row: a seeded
percentile bootstrap over the scored rows (compare/analysis.py), from the per-row predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

from tunelab.compare.analysis import N_BOOT, statistic
from tunelab.config import ConfigError
from tunelab.data import tasks
from tunelab.evaluation.runner import evaluate
from tunelab.export.gguf import QUANT_TYPES
from tunelab.export.hf import FORMATS, HF_QUANTS, export
from tunelab.metrics import stats
from tunelab.stages.runs import run_manifest
from tunelab.ui.context import UIContext
from tunelab.ui.shared import error_markdown, model_picker, offer, zip_folder

PERPLEXITY = "perplexity"  # `tunelab eval --task perplexity --data FILE --context N`: an uploaded text file
QUANTS = {"hf": HF_QUANTS, "gguf": QUANT_TYPES, "gguf-lora": ("f32", "f16")}
FAST_INTERVALS = ("accuracy", "perplexity", "loss")  # compare.analysis.statistic computes these with numpy
DEFAULT_QUANT = {"hf": "f32", "gguf": "f16", "gguf-lora": "f32"}  # what `tunelab export` uses without --quant


def task_choices() -> list[tuple[str, str]]:
    shown = [(f"{t} ({tasks.get_task(t).type})", t) for t in tasks.task_names()]
    return shown + [("perplexity of an uploaded text file (--task perplexity)", PERPLEXITY)]


def score(run: str, task: str, limit: int | None = None, seed: int = 0, data: str | None = None,
          context: int | None = None, trust_remote_code: bool = False, device: str = "auto") -> dict:  # fmt: skip
    """`tunelab eval`'s result for these arguments, plus "intervals": metric -> (low, high), the 95% bootstrap
    interval over the scored rows where the scoring path keeps per-row predictions (else none): for the
    task's main metric (the one `tunelab compare` gives an interval) and the metrics computed straight from
    the resampled rows (accuracy, perplexity, loss). The others would take a metric call per resample (1,000
    of ~10-50 ms for F1 or MCC), too slow for a page to wait on."""
    for name, value in (("--limit", limit), ("--context", context)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: must be 1 or more")
    result = evaluate(run, task, limit=limit, device=device, seed=seed, progress=False, return_predictions=True,
                      trust_remote_code=trust_remote_code, data=data, context=context)  # fmt: skip
    preds = result.pop("predictions", None)
    result["intervals"] = {}
    if preds:
        task_obj = tasks.get_task(task)
        wanted = {task_obj.main_metric, *FAST_INTERVALS}
        for metric, value in result["metrics"].items():
            if isinstance(value, float) and metric in wanted:
                result["intervals"][metric] = stats.bootstrap_interval(statistic(task_obj, metric, preds), len(preds),
                                                                       n_boot=N_BOOT, seed=seed)  # fmt: skip
    return result


def scores_table(result: dict) -> list[list]:
    """[metric, value, 95% interval, rows scored] per metric."""
    rows = []
    for metric, value in result["metrics"].items():
        lo, hi = result["intervals"].get(metric, (math.nan, math.nan))
        ci = f"[{lo:.4f}, {hi:.4f}]" if not math.isnan(lo) else "—"
        rows.append([metric, f"{value:.4f}" if isinstance(value, float) else str(value), ci, result["n"]])
    return rows


def export_run(run: str, fmt: str, quant: str | None, out: str | None, runs: Path,
               trust_remote_code: bool = False) -> tuple[dict, str]:  # fmt: skip
    """`tunelab export`'s report, and the file to download: the .gguf itself, or the HF folder as a zip. Without
    `out` a run's export lands beside it (as the CLI's); a model spec's under the runs folder."""
    if not out and run and run_manifest(run) is None:
        name = Path(str(run).rstrip("/")).name or "model"
        out = str(runs / (f"{name}-hf" if fmt == "hf" else f"{name}-{quant or DEFAULT_QUANT.get(fmt, 'f16')}.gguf"))
    report = export(run, fmt, quant or None, out or None, device="cpu", trust_remote_code=trust_remote_code)
    path = Path(report["path"])
    return report, zip_folder(path) if path.is_dir() else offer(path)


def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    run, trust = model_picker(ctx.runs, "--trust-remote-code")

    gr.Markdown("### Evaluate (`tunelab eval`)")
    with gr.Row():
        task = gr.Dropdown(task_choices(), value="sst2", label="--task")
        limit = gr.Number(None, label="--limit (dev rows; empty = all)", precision=0)
        seed = gr.Number(0, label="--seed (of the --limit sample and the intervals)", precision=0)
    with gr.Row(visible=False) as ppl_row:
        data = gr.File(label="--data (held-out text: .txt, or .jsonl / .json / .csv rows with a text column)",
                       type="filepath")  # fmt: skip
        context = gr.Number(None, label="--context (window length in tokens)", precision=0)
    task.change(lambda t: gr.update(visible=t == PERPLEXITY), task, ppl_row)
    eval_button = gr.Button("Evaluate", variant="primary", elem_id="eval-button")
    eval_error = gr.Markdown(elem_id="eval-error")
    eval_summary = gr.Markdown(elem_id="eval-summary")
    scores = gr.Dataframe(headers=["metric", "value", "95% interval", "rows"], label="Scores", interactive=False,
                          elem_id="eval-scores")  # fmt: skip

    def on_evaluate(run, task, limit, seed, data, context, trust):
        try:
            if not (run or "").strip():
                raise ConfigError("pick a run or a model to score")
            result = score(run, task, None if limit is None else int(limit), int(seed or 0),
                           data if task == PERPLEXITY else None, None if context is None else int(context), trust)  # fmt: skip
            summary = (f"**{result['task']}** · `{result['model']}` · {result['method']} · {result['n']:,} rows · "
                       f"{result['seconds']:.1f}s")  # fmt: skip
            return "", summary, scores_table(result)
        except Exception as e:  # noqa: BLE001 - shown beside the form, as the CLI words it
            return error_markdown(e), "", None

    eval_button.click(on_evaluate, [run, task, limit, seed, data, context, trust], [eval_error, eval_summary, scores])

    gr.Markdown("### Export (`tunelab export`)")
    with gr.Row():
        fmt = gr.Radio(list(FORMATS), value="hf", label="--format")
        quant = gr.Dropdown(list(QUANTS["hf"]), value=DEFAULT_QUANT["hf"], label="--quant")
        out = gr.Textbox(label="--out (empty: beside the run)")
    fmt.change(lambda f: gr.update(choices=list(QUANTS[f]), value=DEFAULT_QUANT[f]), fmt, quant)
    export_button = gr.Button("Export", variant="primary", elem_id="export-button")
    export_error = gr.Markdown(elem_id="export-error")
    export_report = gr.JSON(label="Report", elem_id="export-report")
    download = gr.File(label="Download", elem_id="export-download", interactive=False)

    def on_export(run, fmt, quant, out, trust):
        try:
            if not (run or "").strip():
                raise ConfigError("pick a run or a model to export")
            if quant and quant not in QUANTS[fmt]:  # the format changed and its quant list had not arrived yet
                raise ConfigError(f"--quant {quant} is not one of --format {fmt}'s: {', '.join(QUANTS[fmt])}; "
                                  "pick one and export again")  # fmt: skip
            report, path = export_run(run, fmt, quant, (out or "").strip() or None, ctx.runs, trust)
            return "", report, path
        except Exception as e:  # noqa: BLE001 - shown beside the form, as the CLI words it
            return error_markdown(e), None, None

    export_button.click(on_export, [run, fmt, quant, out, trust], [export_error, export_report, download])
