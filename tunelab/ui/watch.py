"""The Watch tab: the background jobs (jobs.py) with live progress, curves and the log tail.

Progress is read from what the run writes as it goes, polled by a gr.Timer: the step, total and ETA from
the progress bar's last state in the job's log, loss / eval loss / learning rate and tokens/s from the run's
metrics.jsonl, the final scores from results.json. Nothing lives in the UI process: a job started from an
earlier UI (or a closed tab) is listed from its record under ctx.jobs and read the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.ui import jobs
from tunelab.ui.context import UIContext, on_page_load
from tunelab.ui.runs import curve_rows, frame, last, read_json, read_metrics, scores_table

TICK_S = 2.0
LOSSES = ("loss", "eval_loss")
COLORS = {"loss": "#1f77b4", "eval_loss": "#ff7f0e", "lr": "#2ca02c"}
# tqdm's bar as training/harness.py's progress_bar draws it: "train:  50%|█████     | 3/6 [00:01<00:01, ..."
_BAR = re.compile(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def bar_state(log_tail: str) -> dict:
    """{step, total, elapsed, eta} of the last progress bar state in the log text, or {}."""
    found = _BAR.findall(log_tail)
    if not found:
        return {}
    step, total, elapsed, eta = found[-1]
    return {"step": int(step), "total": int(total), "elapsed": elapsed, "eta": eta}


def job_label(job: jobs.Job) -> str:
    what = Path(job.run_dir).name if job.run_dir else " ".join(job.argv[:2])
    return f"{what} · {job.argv[0]} · {job.state()} · {job.id}"


def progress(job: jobs.Job) -> dict:
    """What the Watch tab shows of a job: its state, the bar's step / total / ETA, the last metrics, and
    (finished) the final scores."""
    state = job.state()
    out = {"state": state, **bar_state(job.tail(200))}
    if job.run_dir:
        run = Path(job.run_dir)
        metrics = read_metrics(run)
        out.update(loss=last(metrics, "loss"), eval_loss=last(metrics, "eval_loss"), lr=last(metrics, "lr"),
                   tokens_per_s=last(metrics, "tokens_per_s"), metrics_step=last(metrics, "step"))  # fmt: skip
        if state == "finished":
            out["results"] = read_json(run / "results.json")
    return out


def progress_markdown(p: dict) -> str:
    parts = [f"**{p['state']}**"]
    if "step" in p:
        parts.append(f"step {p['step']} / {p['total']}, elapsed {p['elapsed']}, ETA {p['eta']}")
    elif p.get("metrics_step") is not None:
        parts.append(f"step {p['metrics_step']}")
    if p.get("tokens_per_s") is not None:
        parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.4f}")
    if p.get("eval_loss") is not None:
        parts.append(f"eval loss {p['eval_loss']:.4f}")
    text = " · ".join(parts)
    results = p.get("results") or {}
    if "train_loss" in results:  # the exact number results.json (and metrics.jsonl's last step) holds
        text += f"\n\nfinal train loss: **{results['train_loss']!r}**"
    if "eval_loss" in results:
        text += f" · final eval loss: **{results['eval_loss']!r}**"
    return text


def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    def choices():
        return [(job_label(j), j.id) for j in jobs.list_jobs(ctx.jobs)]

    with gr.Row():
        job_dd = gr.Dropdown(choices=[], label="job", info="every job started from this UI (newest first); they "
                             "run on when the page closes", elem_id="watch-job", scale=4)  # fmt: skip
        refresh = gr.Button("Refresh", size="sm", elem_id="watch-refresh", scale=1)
        stop = gr.Button("Stop (checkpoint)", variant="stop", size="sm", elem_id="watch-stop", scale=1)
    status = gr.Markdown(elem_id="watch-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(frame([]), x="step", y="value", color="series", title="loss and eval loss",
                                elem_id="watch-loss")  # fmt: skip
        lr_plot = gr.LinePlot(frame([]), x="step", y="value", color="series", title="learning rate",
                              elem_id="watch-lr")  # fmt: skip
    scores = gr.Dataframe(headers=["metric", "value"], interactive=False, label="final scores (results.json)",
                          elem_id="watch-scores")  # fmt: skip
    log = gr.Textbox(label="log (the end)", lines=12, max_lines=12, interactive=False, elem_id="watch-log")
    timer = gr.Timer(TICK_S)
    seen = gr.State([])  # the job list last sent: the dropdown is only updated when it changes
    drawn = gr.State(None)  # [job, metrics rows, state] the plots show

    def find(job_id):
        return next((j for j in jobs.list_jobs(ctx.jobs) if j.id == job_id), None)

    def update(job_id, known, drawn):
        now = choices()
        ids = [c[1] for c in now]
        dd = gr.update()
        if ids != known or not job_id:
            started = [i for i in ids if i not in known]
            if known and started:  # a job started since: follow it
                job_id = started[0]
            elif job_id not in ids:
                job_id = ids[0] if ids else None
            dd = gr.update(choices=now, value=job_id)
        job = find(job_id)
        if job is None:
            return dd, ids, None, "no jobs yet: start one in the Train tab", frame([]), frame([]), [], ""
        p = progress(job)
        metrics = read_metrics(Path(job.run_dir)) if job.run_dir else []
        mark = [job.id, len(metrics), p["state"]]
        if mark == drawn:  # nothing new since the last tick: leave the plots as they are (no redraw in the page)
            return dd, ids, mark, progress_markdown(p), gr.update(), gr.update(), gr.update(), job.tail(40)
        # the colours sent with the data: a plot in the page otherwise keeps the series of its first drawing
        # (eval_loss alone, at step 0) and never shows the loss that comes after
        curves = [gr.update(value=frame(curve_rows(metrics, keys)), color_map=COLORS) for keys in (LOSSES, ("lr",))]
        return (dd, ids, mark, progress_markdown(p), *curves, scores_table(p.get("results") or {}), job.tail(40))

    def do_stop(job_id):
        job = find(job_id)
        if job is None or not job.running():
            return "nothing to stop"
        job.stop()
        return f"stopping {job.id}: it writes a checkpoint and exits (Resume in the Train tab continues it)"

    outputs = [job_dd, seen, drawn, status, loss_plot, lr_plot, scores, log]
    timer.tick(update, [job_dd, seen, drawn], outputs, show_progress="hidden")
    refresh.click(update, [job_dd, seen, drawn], outputs)
    job_dd.input(update, [job_dd, seen, drawn], outputs)
    stop.click(do_stop, [job_dd], [status])
    on_page_load(update, [job_dd, seen, drawn], outputs)
