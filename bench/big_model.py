"""Big models on a small box: LoRA, QLoRA and full fine-tuning of a ~1.7B Llama on a CPU, peak memory and speed.

The model: SmolLM2-1.7B's published config (hidden 2048, intermediate 8192, 24 layers, 32 heads, 32 kv
heads, vocabulary 49,152, tied embeddings) with random weights, saved once in bf16 safetensors as the
published checkpoint is (3.4 GB) under `$TUNELAB_HOME/bench/smollm2-1.7b-random`, with the default model's
tokenizer (the same vocabulary). Random weights train and cost exactly like trained ones.

Each method trains a few steps at a short length (`--steps`, `--length`, `--batch`) on the alpaca demo rows,
in a fresh subprocess (its own peak RSS, ru_maxrss: loading included) on the allocator `tunelab train` uses.
Prints per method: peak RSS, tokens/s, the load time, the precision and the run log's memory lines, and
QLoRA's peak over LoRA's (the issue's target: <= 0.6).

    .venv/bin/python bench/big_model.py                     # lora and qlora, 3 steps of 2 x 128 tokens
    .venv/bin/python bench/big_model.py --methods qlora --steps 2
    .venv/bin/python bench/big_model.py --methods full --set model.dtype=bfloat16   # bf16 weights, 8 bytes each
    .venv/bin/python bench/big_model.py --load-only 360m    # LoRA's load peak: whole fp32 then compact, or straight

Memory: the LoRA run holds the 1.7B model in fp32 (6.8 GB) at some point; the bench refuses to start a
run with less than `--min-free-gb` (14) available, and runs one at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from scale_curves import available_gb, build_model, model_dir  # bench/ is the script's folder: on sys.path
from train_speed import run_child

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/llamafactory-demo/alpaca_en_demo.json"


def job(method: str, args) -> dict:
    """One training in this process; its figures as a dict (printed as the last line)."""
    import tunelab
    from tunelab.accel.memory import skip_unused_imports
    from tunelab.config import load_config

    method_cfg = {"name": method}
    if method in ("lora", "qlora"):
        method_cfg.update(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.json").write_text(DATA.read_text())
        cfg = load_config(
            {
                "output_dir": f"{tmp}/run",
                "model": {"name": str(model_dir("1.7b"))},
                "data": {"train": f"{tmp}/train.json", "val_fraction": 0.0, "max_length": args.length,
                         "packing": True, "limit": args.batch * args.steps * 4},
                "method": method_cfg,
                "training": {"max_steps": args.steps, "batch_size": args.batch, "lr": 2e-4, "warmup_steps": 0,
                             "progress": False, "tensorboard": False, "device": "cpu", "seed": 0},
            },
            args.set,
        )  # fmt: skip
        skip_unused_imports(cfg)
        t0 = time.perf_counter()
        result = tunelab.train(cfg)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = result.metrics
    train_s = m["tokens"] / m["tokens_per_s"]
    return {"method": method, "peak_rss_mb": peak, "tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
            "train_s": train_s, "load_and_rest_s": wall - train_s, "train_loss": m["train_loss"],
            "precision": m["precision"], "trainable": m["trainable_params"], "total": m["total_params"]}  # fmt: skip


def job_load(size: str, straight: bool) -> dict:
    """Peak RSS of loading a SmolLM2-config model of `size` for LoRA as `tunelab.train` does, to the end of
    `speed.prepare` (frozen weights compact): `straight` reads the frozen linears straight into their compact
    form (speed.load_plan), else the whole fp32 model is loaded and compacted afterwards (the former path)."""
    import torch

    from tunelab import accel
    from tunelab.config import load_config
    from tunelab.methods import get
    from tunelab.models import count_parameters, load_model
    from tunelab.models.loading import loading_into

    folder = build_model(size)
    cfg = load_config({"output_dir": "/unused", "model": {"name": str(folder)}, "data": {"train": str(DATA)},
                       "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0}})  # fmt: skip
    t0 = time.perf_counter()
    speed = accel.start(cfg.training, torch.device("cpu"))
    with loading_into(speed.load_plan(cfg, False) if straight else None):
        model, _ = load_model(cfg.model, device="cpu")
    model = get("lora").apply(model, cfg.method)
    total = count_parameters(model)[1] + speed.compact_parameters
    speed.prepare(model, cfg, total, False)
    return {"size": size, "straight": straight, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0, "compact_mb_saved": speed.compacted / 2**20, "parameters": total}  # fmt: skip


def run(method: str, args) -> dict:
    from tunelab.accel.memory import allocator_environment

    free = available_gb()
    if free < args.min_free_gb:
        raise SystemExit(f"{method}: only {free:.1f} GB available, the bench needs {args.min_free_gb} (--min-free-gb)")
    cmd = [sys.executable, __file__, "--job", method, "--steps", str(args.steps), "--length", str(args.length),
           "--batch", str(args.batch)] + [a for s in args.set for a in ("--set", s)]  # fmt: skip
    env = allocator_environment()  # what `tunelab train` restarts itself with (accel/memory.py)
    stderr: list[str] = []
    out = run_child(cmd, env, method, stderr)
    out["allocator"] = (env or {}).get("TUNELAB_ALLOCATOR", "system")
    out["log"] = [ln for ln in stderr if ln.startswith("[tunelab]") and any(
        w in ln for w in ("gradient checkpointing", "precision", "loaded whole", "compact", "method ", "bf16 weights", "optimizer state"))]  # fmt: skip
    out["available_gb_before"] = round(free, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--min-free-gb", type=float, default=14.0)
    parser.add_argument(
        "--load-only",
        metavar="SIZE",
        help="only the peak of loading a SmolLM2-SIZE model for LoRA "
        "(135m, 360m, 1.7b), straight into compact weights and the whole-fp32 way, a child each",
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        kind, _, size = args.job.partition(":")
        out = job_load(size, kind == "straight") if kind in ("straight", "whole") else job(args.job, args)
        print(json.dumps(out))
        return
    if args.load_only:
        from tunelab.accel.memory import allocator_environment

        for kind in ("whole", "straight"):
            free = available_gb()
            out = run_child(
                [sys.executable, __file__, "--job", f"{kind}:{args.load_only}"], allocator_environment(), kind
            )
            print(json.dumps({**out, "available_gb_before": round(free, 1)}), flush=True)
        return
    t0 = time.perf_counter()
    folder = build_model("1.7b")
    print(f"model: {folder} (random weights, SmolLM2-1.7B config; built in {time.perf_counter() - t0:.0f} s or cached)")
    results = []
    for method in args.methods.split(","):
        results.append(run(method, args))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.steps} steps of {args.batch} x {args.length} tokens (packed), r=16 all-linear\n")
    print("| method | precision | allocator | peak RSS MB | tokens/s | training s | load + rest s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['precision']} | {r['allocator']} | {r['peak_rss_mb']:,.0f} | "
              f"{r['tokens_per_s']:.1f} | {r['train_s']:.0f} | {r['load_and_rest_s']:.0f} |")  # fmt: skip
    by = {r["method"]: r for r in results}
    if {"lora", "qlora"} <= set(by):
        ratio = by["qlora"]["peak_rss_mb"] / by["lora"]["peak_rss_mb"]
        print(f"\nQLoRA peak / LoRA peak: {ratio:.2f} (target <= 0.6)")


if __name__ == "__main__":
    main()
