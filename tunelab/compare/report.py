"""report.html: one self-contained file (no scripts, no external links): per task a recommendation,
plots (matplotlib PNGs embedded as base64) and the results table; then every row and what failed.

Recommendation rule (also in docs/compare.md), per task, over the cells that finished:

- best:       the highest main metric (lowest for perplexity / loss).
- reference:  the TF-IDF baseline's metric when the grid has it, else the worst finished cell.
- gain:       metric − reference (reference − metric where lower is better).
- best value for time:   the highest gain per minute of wall time (load + train + score), among
                         cells with a positive gain.
- smallest near-best:    the fewest trainable parameters among cells whose gain is at least 95% of
                         the best cell's gain (what to ship when storage / serving many adapters matters).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from pathlib import Path

from tunelab.compare.cells import LOWER_IS_BETTER
from tunelab.compare.store import fmt, fmt_params, fmt_pct, fmt_time, table_cells

NEAR_BEST = 0.95


def lower_is_better(metric: str | None) -> bool:
    return (metric or "") in LOWER_IS_BETTER


def _finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "done" and _num(r.get("main_value"))]


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def recommend(rows: list[dict]) -> dict:
    """Per the rule above, for the rows of one task: {best, reference, by_time, near_best, metric}."""
    cells = [r for r in _finished(rows) if r.get("kind") != "baseline"]
    base = [r for r in _finished(rows) if r.get("kind") == "baseline"]
    if not cells:
        return {}
    metric = cells[0]["main_metric"]
    low = lower_is_better(metric)
    sign = -1.0 if low else 1.0
    best = max(cells, key=lambda r: sign * r["main_value"])
    if base:
        ref_row = max(base, key=lambda r: sign * r["main_value"])
        reference, ref_name = ref_row["main_value"], f"{ref_row['method']} baseline"
    else:
        worst = min(cells, key=lambda r: sign * r["main_value"])
        reference, ref_name = worst["main_value"], f"the worst cell ({worst['model']} × {worst['method']})"

    def gain(r):
        return sign * (r["main_value"] - reference)

    positive = [r for r in cells if gain(r) > 0 and (r.get("wall_s") or 0) > 0]
    by_time = max(positive, key=lambda r: gain(r) / (r["wall_s"] / 60), default=None)
    near = [r for r in cells if gain(best) > 0 and gain(r) >= NEAR_BEST * gain(best) and r.get("trainable_params")]
    near_best = min(near, key=lambda r: (r["trainable_params"], r.get("wall_s") or 0), default=None)
    return {
        "metric": metric,
        "lower_is_better": low,
        "best": best,
        "reference": reference,
        "reference_name": ref_name,
        "gain": gain,
        "by_time": by_time,
        "near_best": near_best,
    }


# ------------------------------------------------------------------------------------------ plots
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _styles(rows):
    methods = sorted({r["method"] for r in rows if r.get("kind") != "baseline"})
    models = sorted({r["model"] for r in rows if r.get("kind") != "baseline"})
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    markers = {m: "osD^vP*Xh<>"[i % 11] for i, m in enumerate(models)}
    return colors, markers


def _scatter(rows: list[dict], x_key: str, xlabel: str, title: str, log_x: bool, x_scale: float = 1.0) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in _finished(rows) if r.get("kind") != "baseline" and _num(r.get(x_key)) and r[x_key] > 0]
    if not cells:
        return None
    colors, markers = _styles(cells)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for r in cells:
        x = r[x_key] * x_scale
        ax.scatter(x, r["main_value"], color=colors[r["method"]], marker=markers[r["model"]], s=60, zorder=3)
        ax.annotate(r["method"], (x, r["main_value"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for b in [r for r in _finished(rows) if r.get("kind") == "baseline"]:
        ax.axhline(b["main_value"], color="gray", linestyle="--", linewidth=1)
        ax.annotate(
            f"{b['method']} baseline",
            (0.01, b["main_value"]),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(cells[0]["main_metric"] + (" (lower is better)" if lower_is_better(cells[0]["main_metric"]) else ""))
    # one model: its name goes in the title (a lone black marker in the legend reads like a data point)
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

    cells = [r for r in rows if r.get("kind") != "baseline" and (r.get("curve_json") or {}).get("train")]
    if not cells:
        return None
    models = sorted({r["model"] for r in cells})
    colors, _ = _styles(cells)
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.0), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in [r for r in cells if r["model"] == model]:
            curve = r["curve_json"]
            xs, ys = zip(*curve["train"])
            ax.plot(xs, ys, color=colors[r["method"]], label=f"{r['method']} train", linewidth=1.2)
            if curve.get("eval"):
                ex, ey = zip(*curve["eval"])
                ax.plot(
                    ex,
                    ey,
                    color=colors[r["method"]],
                    linestyle="--",
                    marker="o",
                    markersize=3,
                    label=f"{r['method']} eval",
                )
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
table{border-collapse:collapse;font-size:12.5px;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}
tr.failed td{background:#fdecec} tr.baseline td{background:#f4f8ff} tr.na td{color:#999}
.rec{background:#f6fbf4;border:1px solid #cfe6c6;padding:8px 14px;border-radius:4px}
img{max-width:100%;margin:6px 12px 6px 0;border:1px solid #eee} .muted{color:#777;font-size:12px}
"""


def _table_html(rows: list[dict]) -> str:
    header, body = table_cells(rows)
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for r, cells in zip(rows, body):
        cls = {"failed": "failed", "n/a": "na", "interrupted": "failed"}.get(r.get("status"), "")
        if r.get("kind") == "baseline":
            cls = "baseline"
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _rec_html(rec: dict) -> str:
    return '<div class="rec"><ul>' + "".join(f"<li>{i}</li>" for i in _rec_items(rec)) + "</ul></div>"


def _rec_items(rec: dict) -> list[str]:
    """The recommendation as HTML fragments, one per line."""
    if not rec:
        return ["No finished cell for this task yet."]
    m, gain = rec["metric"], rec["gain"]

    def who(r):
        return f"<b>{html.escape(r['model'])} × {html.escape(r['method'])}</b>"

    best = rec["best"]
    items = [
        f"Best {html.escape(m)}: {who(best)} = {fmt(best['main_value'])} "
        f"({fmt_pct(best.get('trainable_pct'))}% trainable, {fmt_time(best.get('wall_s'))}); "
        f"reference: {html.escape(rec['reference_name'])} = {fmt(rec['reference'])}."
    ]
    if gain(best) <= 0:
        items.append("No cell beats the reference.")
    r = rec["by_time"]
    if r is not None:
        per_min = gain(r) / (r["wall_s"] / 60)
        items.append(
            f"Best value for time: {who(r)}: {'−' if rec['lower_is_better'] else '+'}{fmt(abs(gain(r)))} "
            f"over the reference in {fmt_time(r['wall_s'])} = {fmt(per_min)} per minute."
        )
    r = rec["near_best"]
    if r is not None:
        items.append(
            f"Smallest near-best: {who(r)}: {fmt(r['main_value'])} with {fmt_params(r['trainable_params'])} "
            f"trainable parameters ({fmt_pct(r.get('trainable_pct'))}%), at least {NEAR_BEST:.0%} of the best gain."
        )
    return items


def recommendations_text(rows: list[dict], tasks: list[str]) -> list[str]:
    """One plain-text line per task (for the CLI)."""
    import re

    out = []
    for t in tasks:
        items = _rec_items(recommend([r for r in rows if r["task"] == t]))
        out.append(f"{t}: " + " ".join(html.unescape(re.sub(r"<[^>]+>", "", i)) for i in items))
    return out


def write_report(rows: list[dict], out: Path, grid=None) -> Path:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>tunelab compare — {html.escape(str(out))}</h1>",
        f"<p class='muted'>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}. "
        f"{sum(r.get('kind') != 'baseline' for r in rows)} cells, "
        f"{sum(r.get('status') == 'done' and r.get('kind') != 'baseline' for r in rows)} finished. "
        "Peak MB: peak resident memory of the cell's own process. Time: wall time of load + train + score "
        "(summed over attempts). Saved MB: the method's final/ folder. Tokens/s: training throughput.</p>",
    ]
    for t in tasks:
        trows = [r for r in rows if r["task"] == t]
        parts.append(f"<h2>{html.escape(t)}</h2>")
        parts.append(_rec_html(recommend(trows)))
        longest = max((r.get("wall_s") or 0 for r in trows), default=0)
        unit, scale = ("minutes", 1 / 60) if longest >= 120 else ("seconds", 1.0)
        for img in (
            _scatter(
                trows, "trainable_pct", "trainable parameters (%, log scale)", f"{t}: metric vs trainable %", True
            ),
            _scatter(trows, "wall_s", f"wall time ({unit})", f"{t}: metric vs wall time", False, scale),
            _curves(trows, t),
        ):
            if img:
                parts.append(f'<img alt="plot" src="data:image/png;base64,{img}">')
        parts.append(_table_html(trows))
    parts.append("<h2>All rows</h2>")
    parts.append(_table_html(rows))
    bad = [r for r in rows if r.get("status") in ("failed", "interrupted", "n/a", "pending", "running")]
    if bad:
        parts.append("<h2>Not finished</h2><ul>")
        for r in bad:
            parts.append(
                f"<li>{html.escape(r['model'])} × {html.escape(r['method'])} × {html.escape(r['task'])}: "
                f"<b>{html.escape(str(r.get('status')))}</b> {html.escape(str(r.get('error') or ''))}</li>"
            )
        parts.append("</ul>")
    parts.append(
        "<h2>How to read the recommendation</h2><p>Best: the highest main metric (lowest for perplexity). "
        "Reference: the TF-IDF baseline when the grid has one, else the worst finished cell. Gain: metric minus "
        "reference (reference minus metric where lower is better). Best value for time: the highest gain per "
        "minute of wall time among cells with a positive gain. Smallest near-best: the fewest trainable "
        f"parameters among cells with at least {NEAR_BEST:.0%} of the best cell's gain.</p>"
    )
    parts.append("</body></html>")
    path = out / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
