"""`tunelab export --check`: what an exported GGUF file lost, measured in llama.cpp itself.

The file is run by llama.cpp (through llama-cpp-python, the runtime users load it in) and the model it
was exported from by PyTorch, on the same token ids:

  - perplexity of each over held-out texts (every token after the first), with bootstrap intervals
    over texts;
  - KL(p_model || p_file) of the next-token distributions, averaged over tokens: the number
    llama.cpp's own `llama-perplexity --kl-divergence` reports for a quantised file; zero for a
    lossless one. Its interval is a bootstrap over texts (tokens of one text are not independent);
  - top-1 agreement: how often both pick the same next token;
  - with a task preset scored by a verbalizer (a causal LM on `sst2` ...): the accuracy of each, with
    Wilson intervals and an exact McNemar test of the paired predictions ("tied within noise" when
    the test cannot tell them apart).

Held-out texts are the run's own validation rows (its `data.validation` file, or the `val_fraction`
rows the run held out with its seed), rendered as in training (prompt and response), or a file given
with `--check-data`. Written by hand: neither llama.cpp's Python package nor gguf-py compares a file
with the model it came from (llama.cpp's perplexity tool needs its own build and a base logits file).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tunelab.config import DataConfig, load_config
from tunelab.data import tasks
from tunelab.data.build import read_split
from tunelab.data.errors import where
from tunelab.data.tasks import read_source
from tunelab.data.templating import render_example
from tunelab.evaluation.predictions import common_prefix_length, verbalizer_prompts
from tunelab.export import ExportError
from tunelab.metrics.stats import bootstrap_interval, mcnemar_exact, wilson_interval
from tunelab.stages.runs import result_dir

INSTALL = "tools/install-llama-cpp.sh (or: make llama-cpp), which builds llama.cpp's library, a few minutes"
TEXTS = 64  # held-out texts scored by default
N_CTX = 512  # longest text scored, in tokens (longer ones are cut)


def heldout_texts(run: str, tokenizer, data: str | None = None, limit: int = TEXTS) -> tuple[list[list[int]], str]:
    """Token ids of up to `limit` held-out texts and where they came from."""
    final = result_dir(run)
    cfg = (
        load_config(final.parent / "config.yaml")
        if final is not None and (final.parent / "config.yaml").exists()
        else None
    )
    data_cfg = cfg.data if cfg is not None else DataConfig()
    configs: dict = {}  # the run's own data: each file's format and columns, as training read them
    if data:
        rows, source = read_source(data), data
    elif cfg is not None and (cfg.data.validation or cfg.data.val_fraction > 0):
        _, rows, _, configs = read_split(cfg.data, cfg.training.seed)
        source = (
            cfg.data.validation
            or f"{cfg.data.train} (the rows the run held out: val_fraction {cfg.data.val_fraction:g})"
        )
    else:
        rows = []
    if not rows:
        raise ExportError(f"{run}: no held-out rows to check the export on; give a file with --check-data FILE")
    ids = [render_example(row, configs.get(file, data_cfg), tokenizer, where=where(file, number))["input_ids"][:N_CTX]
           for file, number, row in rows[:limit]]  # fmt: skip
    ids = [t for t in ids if len(t) >= 2]
    if not ids:
        raise ExportError(f"{source}: no row with two or more tokens to score")
    return ids, source


def require_llama_cpp():
    """The llama_cpp module, or a named error saying how to install it (asked before any work is done)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"--check runs the file in llama.cpp: llama-cpp-python is not installed ({INSTALL})") from e
    return llama_cpp


def open_llama(path: str | Path, n_ctx: int = N_CTX):
    """A llama.cpp context on the file that keeps every position's logits (f32 KV cache: the file's own
    precision, not the cache's, is what is measured)."""
    return require_llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, seed=0, verbose=False,
                           type_k=0, type_v=0, logits_all=True)  # fmt: skip


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits from llama.cpp; the KV cache of the previous call's common prefix is kept."""
    keep = min(common_prefix_length([list(llm.input_ids[: llm.n_tokens]), ids]) if llm.n_tokens else 0, len(ids) - 1)
    llm.n_tokens = keep  # eval() drops the cache from here on
    llm.eval(ids[keep:])
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0].double().cpu().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    """Per-text sums over positions 0..n-2 (each predicting the next id): NLL of both, KL(ref || got),
    top-1 agreements, and the count."""
    lp, lq = _log_softmax(ref[:-1]), _log_softmax(got[:-1])
    nxt = np.asarray(ids[1:])
    rows = np.arange(len(nxt))
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {"nll_ref": float(-lp[rows, nxt].sum()), "nll": float(-lq[rows, nxt].sum()), "kl": float(kl.sum()),
            "kl_max": float(kl.max()), "same_top1": int((lp.argmax(-1) == lq.argmax(-1)).sum()), "tokens": len(nxt)}  # fmt: skip


def text_report(per_text: list[dict]) -> dict:
    """Perplexities, mean KL per token and top-1 agreement, each with a 95% bootstrap interval over texts."""
    cols = {k: np.array([t[k] for t in per_text], dtype=float) for k in ("nll_ref", "nll", "kl", "same_top1", "tokens")}
    n = len(per_text)

    def ratio(key: str, f=lambda v: v):
        value = f(cols[key].sum() / cols["tokens"].sum())
        lo, hi = bootstrap_interval(lambda i: f(cols[key][i].sum() / cols["tokens"][i].sum()), n)
        return {"value": value, "ci95": [lo, hi]}

    return {"texts": n, "tokens": int(cols["tokens"].sum()), "perplexity_model": ratio("nll_ref", math.exp),
            "perplexity_file": ratio("nll", math.exp), "kl_mean": ratio("kl"),
            "kl_max": max(t["kl_max"] for t in per_text), "top1_agreement": ratio("same_top1")}  # fmt: skip


def task_predictions(task, rows, tokenizer, logits_of) -> list[dict]:
    """Verbalizer predictions (evaluation/predictions.py's prompts and label words) from any runtime's
    next-token logits: `logits_of(ids)` -> [len(ids), vocab]."""
    import torch

    verbalizer, prompts = verbalizer_prompts(task, rows, tokenizer)
    out = []
    for k, ids in enumerate(prompts):
        scores = verbalizer.scores(torch.tensor(logits_of(ids)[-1:], dtype=torch.float32))[0]
        out.append(
            {"index": k, "label": int(rows[k]["label"]), "prediction": int(scores.argmax()), "scores": scores.tolist()}
        )
    return out


def task_report(task, ref: list[dict], got: list[dict]) -> dict:
    """Accuracy of the model and of the file with Wilson intervals, and McNemar on the paired predictions."""
    n = len(ref)
    right_ref = np.array([p["prediction"] == p["label"] for p in ref])
    right = np.array([p["prediction"] == p["label"] for p in got])
    test = mcnemar_exact(right_ref, right)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(ref, got))
    return {"task": task.name, "rows": n,
            "accuracy_model": {"value": float(right_ref.mean()), "ci95": list(wilson_interval(int(right_ref.sum()), n))},
            "accuracy_file": {"value": float(right.mean()), "ci95": list(wilson_interval(int(right.sum()), n))},
            "same_prediction": same, "mcnemar_p": test["p"],
            "verdict": "tied within noise" if test["p"] >= 0.05 else
                       ("file better" if right.sum() > right_ref.sum() else "file worse")}  # fmt: skip


class Reference:
    """The unexported model's side, computed once and reused for every file checked against it."""

    def __init__(self, model, tokenizer, texts: list[list[int]], task=None, task_rows=None):
        self.model, self.tokenizer, self.texts = model, tokenizer, texts
        self.logits = [torch_logits(model, ids) for ids in texts]
        self.task, self.task_rows = task, task_rows
        self.task_preds = (
            task_predictions(task, task_rows, tokenizer, lambda ids: torch_logits(model, ids)) if task else None
        )


def check_file(path: str | Path, ref: Reference) -> dict:
    """The quality report of one GGUF file against the reference."""
    llm = open_llama(path, n_ctx=max(N_CTX, max(len(t) for t in ref.texts)))
    try:
        per_text = [compare_logits(r, llama_logits(llm, ids), ids) for r, ids in zip(ref.logits, ref.texts)]
        report = {"file": str(path), **text_report(per_text)}
        if ref.task is not None:
            got = task_predictions(ref.task, ref.task_rows, ref.tokenizer, lambda ids: llama_logits(llm, ids))
            report["task"] = task_report(ref.task, ref.task_preds, got)
    finally:
        llm.close()
    return report


def task_setup(name: str | None, limit: int, seed: int = 0):
    """(task, dev rows) for --check-task, or (None, None); only classification presets (a verbalizer reads them)."""
    if not name:
        return None, None
    task = tasks.get_task(name)
    if task.type != "classification":
        raise ExportError(f"--check-task scores classification presets with a verbalizer; {name} is a {task.type} task")
    return task, tasks.load_split(task, "dev", limit=limit, seed=seed)


def summary_line(report: dict) -> str:
    kl, p0, p1 = report["kl_mean"], report["perplexity_model"], report["perplexity_file"]
    line = (f"{Path(report['file']).name}: perplexity {p1['value']:.3f} (model {p0['value']:.3f}), "
            f"KL {kl['value']:.5f} [{kl['ci95'][0]:.5f}, {kl['ci95'][1]:.5f}], top-1 agreement "
            f"{report['top1_agreement']['value']:.3f}, {report['tokens']:,} tokens of {report['texts']} texts")  # fmt: skip
    if "task" in report:
        t = report["task"]
        line += (f"; {t['task']} accuracy {t['accuracy_file']['value']:.3f} (model {t['accuracy_model']['value']:.3f}, "
                 f"n {t['rows']}, McNemar p {t['mcnemar_p']:.3g}: {t['verdict']})")  # fmt: skip
    return line
