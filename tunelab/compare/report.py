"""report.html: one self-contained file (no scripts, no external links): per task what the numbers
support (tunelab/compare/analysis.py: intervals, paired tests, the recommendation), plots with error
bars and reference lines (matplotlib PNGs embedded as base64), the per-method summary, the rows with
their run folders and a few misclassified dev rows per cell; then every row and what failed.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path

from tunelab.compare import analysis as A
from tunelab.compare.plan import read_jsonl, seed_for, task_object
from tunelab.compare.record import fmt, fmt_params, fmt_time, table_cells, training_share
from tunelab.data.prompts import label_words


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def _task_entries(grid) -> dict:
    return {t.shown: t for t in grid.tasks} if grid is not None else {}


def with_intervals(rows: list[dict], grid) -> list[dict]:
    """Each row with its own 95% interval (ci_low, ci_high) from its predictions (one seed, one row)."""
    entries = _task_entries(grid)
    out = []
    for r in rows:
        r = dict(r)
        t = entries.get(r.get("task"))
        lo, hi = A.row_interval(r, task_object(t), seed_for(grid, t)) if t is not None else (math.nan, math.nan)
        r["ci_low"], r["ci_high"] = (lo, hi) if _num(lo) else (None, None)
        out.append(r)
    return out


def analyse_grid(rows: list[dict], grid) -> dict[str, dict]:
    """task shown name -> analysis.analyse of its rows."""
    out = {}
    for name, t in _task_entries(grid).items():
        trows = [r for r in rows if r.get("task") == name]
        out[name] = A.analyse(trows, task_object(t), seed=seed_for(grid, t)) if trows else {}
    return out


# ------------------------------------------------------------------------------------ statements
def _ci(ci) -> str:
    lo, hi = ci
    return f"[{fmt(lo)}, {fmt(hi)}]" if _num(lo) else "[no interval]"


def _p(p) -> str:
    if not _num(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _score(g: A.Group) -> str:
    sd = f" ± {fmt(g.sd)} sd over {len(g.rows)} seeds" if g.sd is not None else ""
    n = f", n = {g.n}" if g.n else ""
    return f"{fmt(g.mean)}{sd} {_ci(g.ci)}{n}"


def statements(a: dict) -> list[str]:
    """The recommendation for one task as plain sentences (HTML-escaped by the caller)."""
    if not a or not a.get("methods"):
        return ["No finished method for this task yet."]
    m = a["metric"]
    direction = " (lower is better)" if a["lower_is_better"] else ""
    best, pick = a["best"], a["pick"]
    out = []
    if a["single"]:
        out.append(f"One method: {best.name}, {m}{direction} = {_score(best)}.")
    elif a["winner"] is not None:
        runner = a["methods"][1]
        out.append(
            f"Winner: {best.name}, {m}{direction} = {_score(best)}. It beats every other method at p < "
            f"{A.ALPHA} (Holm-corrected paired tests on the same rows); runner-up {runner.name} = "
            f"{fmt(runner.mean)} ({_p(runner.p_vs_best_holm)})."
        )
    else:
        names = ", ".join(g.name for g in a["tied"])
        out.append(
            f"Tied within noise: {names}. The best, {best.name} ({m}{direction} = {_score(best)}), does not beat "
            f"the others at p < {A.ALPHA} (Holm-corrected paired tests on the same rows)."
        )
        out.append(
            f"Pick by the tie rule (fewest trainable parameters, then least time): {pick.name} = {_score(pick)}, "
            f"{fmt_params(pick.trainable if math.isfinite(pick.trainable) else None)} trainable, "
            f"{fmt_time(pick.wall_s if math.isfinite(pick.wall_s) else None)}."
        )
    ref = a.get("reference")
    if ref is not None:
        gain, p = a["reference_gain"], a["reference_p"]
        if _num(p) and p < A.ALPHA:
            verdict = "significant" if gain > 0 else "significantly worse than this reference"
        else:
            verdict = "not significant: no better than this reference within noise"
        out.append(
            f"Strongest reference: {ref.name} = {_score(ref)}. {pick.name} gains {gain:+.4f} "
            f"{_ci(a['reference_gain_ci'])} over it ({_p(p)}, {verdict})."
        )
    others = [(r, g, p) for r, g, p in a.get("against") or [] if r is not ref]
    if others:

        def verdict(g, p):
            if not (_num(p) and p < A.ALPHA):
                return "tied within noise"
            return "better" if g > 0 else "worse"

        out.append(
            f"{pick.name} against the other references: "
            + "; ".join(f"{r.name} {fmt(r.mean)}: {g:+.4f}, {_p(p)}, {verdict(g, p)}" for r, g, p in others)
            + "."
        )
    orders = a.get("seed_orders") or {}
    if orders:
        distinct = {tuple(v) for v in orders.values()}
        if len(distinct) == 1:
            out.append(f"The methods rank in the same order on each of the {len(orders)} seeds.")
        else:
            shown = "; ".join(f"seed {s}: {' > '.join(v)}" for s, v in orders.items())
            out.append(f"The ranking changes between seeds ({shown}): read differences within the sd as noise.")
    dtypes = sorted({r["score_dtype"] for g in a.get("groups") or [] for r in g.rows if r.get("score_dtype")})
    if dtypes and dtypes != ["float32"]:  # the grid's score_dtype (or a model loaded in 16 bits): say so
        out.append(f"The model rows were scored in {' and '.join(dtypes)} (score_dtype); fp32 scoring can move "
                   "rows across a class boundary (2 to 26 of 400 measured on the demo's runs).")  # fmt: skip
    commits: dict[str, set] = {}
    for g in a.get("groups") or []:
        for r in g.rows:
            if r.get("model_commit"):
                commits.setdefault(r.get("model"), set()).add(r["model_commit"])
    for model, seen in commits.items():
        if len(seen) > 1:  # a branch that moved between cells: the rows are not of one base model
            out.append(f"The rows of {model} ran on {len(seen)} commits of its hub repo ("
                       + ", ".join(c[:10] for c in sorted(seen)) + "): its branch moved between cells. Pin "
                       "model.revision to one commit and run the grid in a fresh output_dir.")  # fmt: skip
    folders = [r.get("cell_dir") for r in pick.rows if r.get("cell_dir")]
    if folders:
        out.append(
            f"Run folder of {pick.name}: {folders[0]}" + (f" (+{len(folders) - 1} seeds)" if len(folders) > 1 else "")
        )
    return out


def markdown_summary(analyses: dict[str, dict]) -> str:
    """Per task: the statements and the per-method table, in Markdown (results.md and the CLI)."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = []
    for task, a in analyses.items():
        out += [f"## {task}", ""] + [f"- {s}" for s in statements(a)] + [""]
        for header, body in (summary_table(a), timing_table([r for g in a.get("groups") or [] for r in g.rows])):
            if not body:
                continue
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body] + [""]
    return "\n".join(out)


PHASE_HEADERS = {"startup": "Start-up", "loading": "Loading", "training": "Training", "scoring": "Scoring",
                 "saving": "Saving", "other": "Other", "exit": "Exit"}  # fmt: skip


def timing_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Where each row's wall time went (its last attempt's phases, compare/cell.py), one row per cell."""
    rows = [r for r in rows if r.get("phases")]
    header = ["Model", "Method", "Seed", "Time", *PHASE_HEADERS.values(), "Training %"]
    body = []
    for r in rows:
        phases = r["phases"]
        share = training_share(r)
        body.append([r["model"], r["method"], "—" if r.get("seed") is None else str(r["seed"]),
                     fmt_time(sum(phases.values())), *(fmt_time(phases.get(k)) for k in PHASE_HEADERS),
                     "—" if share is None else f"{100 * share:.0f}%"])  # fmt: skip
    return header, body


def summary_table(a: dict) -> tuple[list[str], list[list[str]]]:
    """Per method and reference: mean ± sd, 95% CI, rows, seeds, p against the best, costs."""
    header = ["Model", "Method", a.get("metric") or "metric", "± sd", "95% CI", "n", "seeds", "p vs best (Holm)",
              "Trainable", "Time", "Run folder"]  # fmt: skip
    body = []
    for g in a.get("groups") or []:
        best = g is a.get("best")
        p = "best" if best else (_p(g.p_vs_best_holm) if g.role == "method" else "—")
        folder = next((r.get("cell_dir") for r in g.rows if r.get("cell_dir")), "")
        body.append([
            g.model, g.method, fmt(g.mean), fmt(g.sd) if g.sd is not None else "—", _ci(g.ci), str(g.n or "—"),
            str(len(g.rows)) if g.role == "method" else "—", p,
            fmt_params(g.trainable if math.isfinite(g.trainable) else None),
            fmt_time(g.wall_s if math.isfinite(g.wall_s) else None), Path(folder).name if folder else "",
        ])  # fmt: skip
    return header, body


# ------------------------------------------------------------------------------------------ plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _styles(groups):
    methods = sorted({g.method for g in groups})
    models = sorted({g.model for g in groups})
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    markers = {m: "osD^vP*Xh<>"[i % 11] for i, m in enumerate(models)}
    return colors, markers


def _scatter(a: dict, x_of, xlabel: str, title: str, log_x: bool) -> str | None:
    """Each method at (cost, seed-mean metric) with its 95% interval as an error bar; references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [g for g in a.get("methods") or [] if _num(x_of(g)) and x_of(g) > 0]
    if not methods:
        return None
    colors, markers = _styles(methods)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for g in methods:
        x = x_of(g)
        lo, hi = g.ci
        err = [[max(g.mean - lo, 0)], [max(hi - g.mean, 0)]] if _num(lo) else None
        ax.errorbar(x, g.mean, yerr=err, color=colors[g.method], marker=markers[g.model], markersize=7,
                    capsize=4, linestyle="", zorder=3)  # fmt: skip
        ax.annotate(g.method, (x, g.mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for i, ref in enumerate(a.get("references") or []):
        ax.axhline(ref.mean, color="gray", linestyle=("--", ":", "-.")[i % 3], linewidth=1)
        ax.annotate(ref.name, (0.01, ref.mean), xycoords=("axes fraction", "data"), xytext=(0, 3),
                    textcoords="offset points", fontsize=8, color="dimgray")  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(a["metric"] + (" (lower is better)" if a["lower_is_better"] else "") + ", 95% CI")
    ax.set_title(title if len(markers) > 1 else f"{title} ({next(iter(markers))})")
    ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color="black", marker=markers[m], linestyle="", label=f"model: {m}") for m in markers]
    handles = handles if len(markers) > 1 else []
    handles += [plt.Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in colors]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.8)
    return _png(fig)


def _curves(rows: list[dict], task: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r.get("role") != "reference" and (r.get("curve_json") or {}).get("train")]
    first_seed = {}
    for r in cells:  # one curve per method: its first seed
        first_seed.setdefault((r["model"], r["method"]), r)
    cells = list(first_seed.values())
    if not cells:
        return None
    models = sorted({r["model"] for r in cells})
    methods = sorted({r["method"] for r in cells})
    import matplotlib as mpl

    colors = {m: mpl.colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in [r for r in cells if r["model"] == model]:
            curve = r["curve_json"]
            xs, ys = zip(*curve["train"])
            ax.plot(xs, ys, color=colors[r["method"]], label=f"{r['method']} train", linewidth=1.2)
            if curve.get("eval"):
                ex, ey = zip(*curve["eval"])
                ax.plot(ex, ey, color=colors[r["method"]], linestyle="--", marker="o", markersize=3,
                        label=f"{r['method']} validation")  # fmt: skip
        ax.set_title(f"{task}: {model}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin-top:18px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}
tr.failed td{background:#fdecec} tr.baseline td{background:#f4f8ff} tr.na td{color:#999}
.rec{background:#f6fbf4;border:1px solid #cfe6c6;padding:8px 14px;border-radius:4px}
img{max-width:100%;margin:6px 12px 6px 0;border:1px solid #eee} .muted{color:#777;font-size:12px}
details{margin:4px 0} summary{cursor:pointer}
"""


def _html_table(header: list[str], body: list[list[str]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, cells in enumerate(body):
        cls = (classes or [""] * len(body))[i]
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _rows_table(rows: list[dict]) -> str:
    header, body = table_cells(rows)
    classes = []
    for r in rows:
        cls = {"failed": "failed", "n/a": "na", "interrupted": "failed"}.get(r.get("status"), "")
        classes.append("baseline" if r.get("role") == "reference" else cls)
    return _html_table(header, body, classes)


def _errors_html(rows: list[dict], labels: list[str]) -> str:
    """A few misclassified dev rows per cell (first seed), in collapsible blocks."""
    parts, dev_cache = [], {}
    for r in rows:
        dev = ((r.get("eval_json") or {}).get("rows") or {}).get("dev")
        if r.get("status") != "done" or r.get("role") == "reference" or not dev or not Path(dev).is_file():
            continue
        if dev not in dev_cache:
            dev_cache[dev] = read_jsonl(dev)
        wrong = A.errors_of(r, dev_cache[dev])
        if not wrong:
            continue
        name = lambda i: labels[i] if 0 <= i < len(labels) else str(i)  # noqa: E731
        items = "".join(
            f"<li>row {w['index']}: gold <b>{html.escape(name(w['label']))}</b>, predicted "
            f"<b>{html.escape(name(w['prediction']))}</b>: “{html.escape(_text(w['row']))}”</li>"
            for w in wrong
        )  # fmt: skip
        seed = f", seed {r['seed']}" if r.get("seed") is not None else ""
        parts.append(f"<details><summary>{html.escape(r['model'])} × {html.escape(r['method'])}{seed}</summary>"
                     f"<ul>{items}</ul></details>")  # fmt: skip
    return ("<h3>Misclassified dev rows (the first three per cell)</h3>" + "".join(parts)) if parts else ""


def _text(row: dict, n: int = 160) -> str:
    text = str(row.get("text", ""))
    if row.get("text_pair"):
        text += " ‖ " + str(row["text_pair"])
    return text if len(text) <= n else text[: n - 1] + "…"


def write_report(rows: list[dict], out: Path, grid=None, analyses: dict | None = None) -> Path:
    analyses = analyses if analyses is not None else analyse_grid(rows, grid)
    entries = _task_entries(grid)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [r for r in rows if r.get("role") != "reference"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>tunelab compare — {html.escape(str(out))}</h1>",
        f"<p class='muted'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. {len(methods)} cells, "
        f"{sum(r.get('status') == 'done' for r in methods)} finished. Every score is on the task's dev rows "
        "(n per row), which no cell trains or tunes on; 95% CI: seeded bootstrap over those rows. Peak MB: peak "
        "resident memory of the cell's own process. Time: wall time of the cell's process, from its start to its "
        "exit (summed over attempts); Training %: the share of it spent in optimizer steps. Saved MB: the method's final/ folder. Tokens/s: training throughput.</p>",
    ]
    for t in tasks:
        trows = [r for r in rows if r["task"] == t]
        a = analyses.get(t) or {}
        parts.append(f"<h2>{html.escape(t)}</h2>")
        parts.append(
            '<div class="rec"><ul>' + "".join(f"<li>{html.escape(s)}</li>" for s in statements(a)) + "</ul></div>"
        )
        if a.get("groups"):
            parts.append("<h3>Per method (mean over seeds) and references</h3>")
            parts.append(_html_table(*summary_table(a)))
        if a.get("methods"):
            longest = max((g.wall_s for g in a["methods"] if math.isfinite(g.wall_s)), default=0)
            minutes = longest >= 120
            for img in (
                _scatter(a, _trainable_pct, "trainable parameters (%, log scale)", f"{t}: metric vs trainable %", True),
                _scatter(a, _minutes if minutes else _seconds, f"wall time ({'minutes' if minutes else 'seconds'})",
                         f"{t}: metric vs wall time", False),
                _curves(trows, t),
            ):  # fmt: skip
                if img:
                    parts.append(f'<img alt="plot" src="data:image/png;base64,{img}">')
        parts.append("<h3>Every row</h3>")
        parts.append(_rows_table(trows))
        header, body = timing_table(trows)
        if body:
            parts.append("<h3>Where the time went (the last attempt of each row; seconds unless marked)</h3>")
            parts.append(_html_table(header, body))
        labels = list(getattr(_task_of(entries.get(t)), "labels", ()) or ())
        parts.append(_errors_html(trows, _words(entries.get(t)) or labels))
    bad = [r for r in rows if r.get("status") in ("failed", "interrupted", "n/a", "pending", "running")]
    if bad:
        parts.append("<h2>Not finished</h2><ul>")
        for r in bad:
            parts.append(
                f"<li>{html.escape(r['model'])} × {html.escape(r['method'])} × {html.escape(r['task'])}: "
                f"<b>{html.escape(str(r.get('status')))}</b> {html.escape(str(r.get('error') or ''))}</li>"
            )
        parts.append("</ul>")
    parts.append(f"<h2>How to read it</h2><p>{html.escape(HOW_TO_READ)}</p>")
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def _trainable_pct(g: A.Group) -> float | None:
    total = next((r.get("total_params") for r in g.rows if r.get("total_params")), None)
    return 100 * g.trainable / total if total and math.isfinite(g.trainable) else None


def _seconds(g: A.Group) -> float | None:
    return g.wall_s if math.isfinite(g.wall_s) else None


def _minutes(g: A.Group) -> float | None:
    return g.wall_s / 60 if math.isfinite(g.wall_s) else None


def _task_of(entry):
    if entry is None:
        return None

    return task_object(entry)


def _words(entry) -> list[str]:
    task = _task_of(entry)
    if task is None or task.type != "classification":
        return []

    return list(label_words(task))


HOW_TO_READ = (
    "Scores are on the dev rows only; learning rates given as a list were chosen on validation rows carved "
    "from the train split. The 95% interval of a method is a seeded bootstrap over the dev rows (of the mean "
    "over seeds when it ran several). Methods are compared on the same rows: exact McNemar for accuracy with "
    "one seed, else a paired bootstrap; p-values against the best are Holm-corrected over the task's methods. "
    "A winner is named only when the best beats every other method at p < 0.05; otherwise the methods it does "
    "not beat are tied within noise and the pick among them has the fewest trainable parameters, then the least "
    "time. The gain is measured from the strongest reference (majority class, zero-shot, TF-IDF on the sample "
    "or on the whole train split), with a paired test against it."
)
