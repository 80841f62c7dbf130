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
`tunelab.train`.

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
    from tunelab.config import load_config

    cfg = load_config({
        "stage": "distill", "output_dir": str(out), "model": {"name": student},
        "data": {"train": DATA, "format": "instruction", "limit": args.rows, "val_fraction": 0.2, "max_length": 256},
        "distill": {"teacher": teacher, "temperature": 2.0, "alpha": alpha, "top_k": 64},
        "method": {"name": "full"},
        "training": {"max_steps": args.steps, "batch_size": 8, "lr": args.lr, "warmup_ratio": 0.1,
                     "scheduler": "cosine", "progress": False, "tensorboard": False, "seed": 0},
    })  # fmt: skip
    t0 = time.time()
    result = train_whole(cfg)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in x]
    first, last = evals[0], evals[-1]
    return {"alpha": alpha, "steps": result.metrics.get("steps"), "seconds": round(time.time() - t0),
            "eval_kl_before": first.get("eval_kl"), "eval_ce_before": first.get("eval_ce"),
            "eval_kl": last.get("eval_kl"), "eval_ce": last.get("eval_ce"),
            "heldout_rows": result.metrics.get("data_val_rows")}  # fmt: skip


def main() -> int:
    from tunelab.models import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="student depth (the teacher has 30)")
    ap.add_argument("--rows", type=int, default=240, help="alpaca demo rows (20%% held out)")
    ap.add_argument("--steps", type=int, default=24, help="training steps of each run (8 rows a step)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--only", choices=["distill", "sft"], help="run one side (to run both sides in parallel)")
    ap.add_argument("--out", help="write the figures as JSON here")
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
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
