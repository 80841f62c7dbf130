"""Distillation against plain SFT on a smaller student (the acceptance check of docs/distillation.md).

The teacher is SmolLM2-135M-Instruct (the default model, 30 layers). The student is a shallower Llama of the
same family: SmolLM2's config with `--layers` layers, initialised from evenly spaced teacher layers (its
embedding, final norm and every (30 / layers)-th block, DistilBERT's recipe), saved as an ordinary model
folder with the teacher's tokenizer, so both share one vocabulary and chat template as stage distill asks.

Two runs from that same student, the same rows, steps, learning rate and seed, full fine-tuning:

  - distill: stage distill, alpha 0.5, tau 2, top-k 64 (the example's settings);
  - SFT:     stage distill with alpha 0: the loss is the hard-label cross-entropy alone, stage sft's loss,
             while the loop still reports the KL to the teacher on the held-out rows.

Both report, on the same held-out rows: `eval_kl` (nats per label token, the top-k KL at tau of
docs/distillation.md) and `eval_ce` (cross-entropy on the data at tau 1). Everything goes through
`tunelab.train`. Then the bench scores both final students (and the untrained one) row by row on those rows
with the stage's own loss terms and cached teacher rows (its token-weighted means must equal the loop's
eval_kl / eval_ce), and gives each difference distill - SFT with a paired bootstrap interval over the rows
and its p-value (tunelab.metrics.stats).

    python bench/distill_student.py [--layers 8] [--rows 240] [--steps 24] [--out distill.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rope_context import train_whole  # bench/ is the script's folder: on sys.path

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT.parent / "shared" / "data" / "llamafactory-demo" / "alpaca_en_demo.json")


def make_student(teacher: str, layers: int, out: Path) -> dict:
    """A `layers`-deep copy of the teacher: its embeddings, final norm and evenly spaced blocks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    big = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    depth = big.config.num_hidden_layers
    keep = [round(i * depth / layers) for i in range(layers)]
    config = AutoConfig.from_pretrained(teacher)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    small = AutoModelForCausalLM.from_config(config)
    state = {}
    for name, value in big.state_dict().items():
        if ".layers." in name:
            head, rest = name.split(".layers.", 1)
            index, tail = rest.split(".", 1)
            if int(index) not in keep:
                continue
            name = f"{head}.layers.{keep.index(int(index))}.{tail}"
        state[name] = value
    missing, unexpected = small.load_state_dict(state, strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise RuntimeError(f"student weights: missing {missing}, unexpected {unexpected}")
    small.tie_weights()
    small.save_pretrained(out)  # safetensors
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    params = sum(p.numel() for p in small.parameters())
    return {"layers": layers, "teacher_layers_kept": keep, "parameters": params,
            "teacher_parameters": sum(p.numel() for p in big.parameters())}  # fmt: skip


def run(student: str, teacher: str, out: Path, alpha: float, args) -> dict:
    cfg = run_config(student, teacher, out, alpha, args)
    t0 = time.time()
    result = train_whole(cfg)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    first, last = evals[0], evals[-1]
    return {"alpha": alpha, "steps": result.metrics.get("steps"), "seconds": round(time.time() - t0),
            "eval_kl_before": first.get("eval_kl"), "eval_ce_before": first.get("eval_ce"),
            "eval_kl": last.get("eval_kl"), "eval_ce": last.get("eval_ce"),
            "heldout_rows": result.metrics.get("data_val_rows")}  # fmt: skip


def run_config(student: str, teacher: str, out: Path, alpha: float, args):
    from tunelab.config import load_config

    return load_config({
        "stage": "distill", "output_dir": str(out), "model": {"name": student},
        "data": {"train": DATA, "format": "instruction", "limit": args.rows, "val_fraction": 0.2, "max_length": 256},
        "distill": {"teacher": teacher, "temperature": 2.0, "alpha": alpha, "top_k": 64},
        "method": {"name": "full"},
        "training": {"max_steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_ratio": 0.1,
                     "scheduler": "cosine", "progress": False, "tensorboard": False, "seed": 0, "threads": args.threads},
    })  # fmt: skip


def per_row(cfg, models: dict) -> dict:
    """{name: {"kl": [...], "ce": [...], "n": [...]}}: each held-out row's summed KL and CE (nats) and its
    label tokens, for each model (a path: a run folder or a model folder), on the held-out rows of `cfg`'s
    run with their cached teacher rows (the stage's own build reads the cache the run wrote)."""
    import torch

    from tunelab.models.loss import shift_labels
    from tunelab.stages import distill
    from tunelab.stages.runs import load_run

    out, data = {}, None
    for name, path in models.items():
        model, tok = load_run(str(path), device="cpu")
        model.eval()
        data = data or distill.stage(cfg).build_data(cfg, tok)  # the same rows for every model
        vocab, tau = len(tok), cfg.distill.temperature
        rows = {"kl": [], "ce": [], "n": []}
        with torch.no_grad():
            for e in data.val:
                ids = torch.tensor([e["input_ids"]])
                target = shift_labels(torch.tensor([e["labels"]]))[0]
                keep = target != -100
                logits = model(input_ids=ids, use_cache=False).logits[0][keep][:, :vocab]
                if int(keep.sum()) != e["teacher_ids"].shape[0]:
                    raise RuntimeError("per_row: label positions and cached teacher rows differ")
                kl, ce = distill.distill_terms(logits, target[keep], e["teacher_ids"].long(), e["teacher_logps"], tau)
                rows["kl"].append(float(kl.sum()))
                rows["ce"].append(float(ce.sum()))
                rows["n"].append(int(keep.sum()))
        out[name] = rows
        del model
    return out


def paired(rows: dict, a: str, b: str, key: str) -> dict:
    """Token-weighted means of a and b, a - b with its 95% paired bootstrap interval (rows resampled) and p."""
    import numpy as np

    from tunelab.metrics.stats import bootstrap_interval, paired_bootstrap_pvalue

    n = np.asarray(rows[a]["n"], dtype=float)
    va, vb = np.asarray(rows[a][key]), np.asarray(rows[b][key])

    mean_a = lambda idx: va[idx].sum() / n[idx].sum()  # noqa: E731
    mean_b = lambda idx: vb[idx].sum() / n[idx].sum()  # noqa: E731
    every = slice(None)
    lo, hi = bootstrap_interval(lambda idx: mean_a(idx) - mean_b(idx), len(n), n_boot=10_000)
    return {a: mean_a(every), b: mean_b(every), "difference": mean_a(every) - mean_b(every), "interval_95": [lo, hi],
            "p": paired_bootstrap_pvalue(mean_a, mean_b, len(n), n_boot=10_000),
            "rows": len(n), "tokens": int(n.sum())}  # fmt: skip


def main() -> int:
    from tunelab.models import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="student depth (the teacher has 30)")
    ap.add_argument("--rows", type=int, default=240, help="alpaca demo rows (20%% held out)")
    ap.add_argument("--steps", type=int, default=24, help="training steps of each run (8 rows a step)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--only", choices=["distill", "sft"], help="run one side (to run both sides in parallel)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--threads", type=int, help="training.threads (default: the machine's cores)")
    ap.add_argument("--keep", action="store_true", help="keep the student and the runs (else removed at the end)")
    args = ap.parse_args()
    teacher = resolve("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    result = {"student": make_student(teacher, args.layers, tmp / "student"), "rows": args.rows, "steps": args.steps}
    print(json.dumps(result["student"]), file=sys.stderr)
    for side, alpha in (("distill", 0.5), ("sft", 0.0)):
        if args.only in (None, side):
            if side == "sft" and (tmp / "distill" / "distill").is_dir():  # the same teacher cache: run it once
                shutil.copytree(tmp / "distill" / "distill", tmp / side / "distill")
            result[side] = run(str(tmp / "student"), teacher, tmp / side, alpha, args)
            print(json.dumps({side: result[side]}), file=sys.stderr)
    if args.only is None:  # per-row scores of both students on the held-out rows, paired
        cfg = run_config(str(tmp / "student"), teacher, tmp / "distill", 0.5, args)
        rows = per_row(cfg, {"before": tmp / "student", "distill": tmp / "distill", "sft": tmp / "sft"})
        result["paired"] = {key: paired(rows, "distill", "sft", key) for key in ("kl", "ce")}
        for key, side in ((k, s) for k in ("kl", "ce") for s in ("distill", "sft")):  # the loop's own figures
            if abs(result["paired"][key][side] - result[side][f"eval_{key}"]) > 1e-3:
                raise RuntimeError(f"per-row {key} of {side} does not reproduce the loop's eval_{key}")
        result["per_row"] = rows
        print(json.dumps(result["paired"]), file=sys.stderr)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"runs kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)  # three 56M-parameter models and the teacher cache: ~0.5 GB
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
