"""Post-training quantisation vs quantisation-aware training, measured on the shipped GGUF files.

Fine-tunes the default model (SmolLM2-135M-Instruct) twice on the same alpaca-style rows (the
LLaMA-Factory demo set) with the same settings: once normally (`method: full`) and once with
`method: qat` (4-bit fake quantisation in the forward pass, symmetric groups of 32 = GGUF q4_0).
Both are exported with `tunelab export --format gguf`, the GGUF files are loaded back through
transformers (which dequantises them), and perplexity is measured on held-out rows of the same
file (response tokens only, as in training).

    .venv/bin/python bench/export_quality.py      # ~10 min on an idle 2-core CPU (estimated from its parts)
    .venv/bin/python bench/export_quality.py --steps 2 --val 4 --train-rows 16 --out /tmp/eq   # smoke run

The fp32 perplexities come from the training loop's own evaluation on the same held-out rows
(before and after training); the rest from the exported files. Prints a Markdown table and writes
results.json into --out. Finished runs are reused when run again (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/export_quality")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "llamafactory-demo" / "alpaca_en_demo.json"))
    p.add_argument("--train-rows", type=int, default=200)
    p.add_argument("--val", type=int, default=16, help="held-out rows")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--quant", default="q4_0", choices=["q4_0", "q4_1"], help="4-bit GGUF type (QAT matches it)")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def split_data(src: Path, out: Path, n_train: int, n_val: int) -> tuple[Path, Path]:
    """The first n_train rows to train on, the n_val after them held out (fixed, file order)."""
    rows = json.loads(src.read_text())
    train, val = out / "train.json", out / "heldout.json"
    train.write_text(json.dumps(rows[:n_train]))
    val.write_text(json.dumps(rows[n_train : n_train + n_val]))
    return train, val


def config(args, method: dict, train: Path, val: Path, run_dir: Path) -> dict:
    return {
        "output_dir": str(run_dir),
        "data": {"train": str(train), "validation": str(val), "format": "instruction", "max_length": args.max_length},
        "method": method,
        "training": {"max_steps": args.steps, "batch_size": 4, "lr": args.lr, "scheduler": "cosine",
                     "warmup_ratio": 0.1, "tensorboard": False, "progress": False, "threads": args.threads,
                     "seed": 0},
    }  # fmt: skip


def train_once(cfg: dict) -> dict:
    from tunelab.config import load_config
    from tunelab.training import train

    run_dir = Path(cfg["output_dir"])
    if (run_dir / "results.json").exists() and (run_dir / "final" / "tunelab.json").exists():
        return json.loads((run_dir / "results.json").read_text())
    t = time.perf_counter()
    metrics = train(load_config(cfg)).metrics
    metrics["train_seconds"] = time.perf_counter() - t
    (run_dir / "results.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def gguf_perplexity(gguf_path: Path, cfg: dict) -> float:
    """exp(mean loss over the held-out response tokens) of the model the GGUF file holds."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config import load_config
    from tunelab.models import load_tokenizer
    from tunelab.stages import get as stage_for
    from tunelab.training.loop import evaluate_loss

    c = load_config(cfg)
    stage = stage_for(c.stage)
    tokenizer = load_tokenizer(c.model)
    data = stage.build_data(c, tokenizer)
    batches = [stage.collate(data.val[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(data.val), 4)]
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return math.exp(evaluate_loss(model.eval(), batches, torch.device("cpu"), contextlib.nullcontext, stage))


def main() -> int:
    args = parse_args()
    import torch

    from tunelab.export.hf import export

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = split_data(Path(args.data), out, args.train_rows, args.val)
    symmetric = args.quant == "q4_0"
    runs = {
        "full": config(args, {"name": "full"}, train, val, out / "full"),
        "qat": config(args, {"name": "qat", "group_size": 32, "symmetric": symmetric}, train, val, out / "qat"),
    }
    t0 = time.perf_counter()
    metrics = {name: train_once(cfg) for name, cfg in runs.items()}
    rows = [
        ("base model", "fp32 (safetensors)", None, math.exp(metrics["full"]["eval_loss_before"])),
        (f"base model, {args.quant} fake-quant (PTQ)", "fp32 sim.", None, math.exp(metrics["qat"]["eval_loss_before"])),
        ("fine-tuned (full)", "fp32", None, math.exp(metrics["full"]["eval_loss"])),
        ("QAT fine-tuned (fake-quant forward)", "fp32 sim.", None, math.exp(metrics["qat"]["eval_loss"])),
    ]
    files = {}
    for name, quant in (("full", "f16"), ("full", "q8_0"), ("full", args.quant), ("qat", args.quant)):
        path = out / f"{name}-{quant}.gguf"
        report = export(str(out / name), "gguf", quant, str(path))
        # f16: size only (its perplexity equals fp32's to 0.01; measuring it costs a minute of CPU)
        ppl = None if quant == "f16" else gguf_perplexity(path, runs[name])
        files[(name, quant)] = (report["bytes"], ppl)
        if quant == "f16":
            path.unlink()
        label = {"full": "fine-tuned (full)", "qat": "QAT fine-tuned"}[name]
        kind = "PTQ" if name == "full" and quant.startswith("q4") else ""
        rows.append((f"{label} -> GGUF {quant} {kind}".strip(), f"GGUF {quant}", *files[(name, quant)]))
    seconds = time.perf_counter() - t0

    print(f"\nheld-out perplexity, {args.val} rows (response tokens), {args.steps} steps x 4 rows, lr {args.lr}")
    print("| model | weights | file size | held-out perplexity |\n|---|---|---|---|")
    for label, kind, size, ppl in rows:
        print(f"| {label} | {kind} | {f'{size / 1e6:.1f} MB' if size else '—'} | {f'{ppl:.2f}' if ppl else '—'} |")
    ptq, qat = files[("full", args.quant)][1], files[("qat", args.quant)][1]
    verdict = "lower" if qat < ptq else "NOT lower"
    print(
        f"\nQAT {args.quant} perplexity {qat:.2f} is {verdict} than PTQ {args.quant} {ptq:.2f} ({seconds:.0f} s total)"
    )
    result = {"args": vars(args), "rows": [dict(zip(("model", "weights", "bytes", "perplexity"), r)) for r in rows],
              "train": metrics, "seconds": seconds, "qat_beats_ptq": qat < ptq}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0 if qat < ptq else 1


if __name__ == "__main__":
    sys.exit(main())
