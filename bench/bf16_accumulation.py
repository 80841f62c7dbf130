"""How far gradient accumulation in bf16 moves the gradient, against how far one bf16 pass already is from fp32's.

Full fine-tuning with bf16 weights (`training.master_weights` bf16, tunelab/training/bf16_adamw.py) keeps the
gradients in bf16, so with `training.grad_accum` > 1 (or `rows_per_pass`) each pass's gradient is added into a
bf16 `.grad`: a rounding per addition. This measures that rounding on SmolLM2-135M-Instruct and alpaca rows, a row a
pass: the accumulated gradient against the fp32 sum of the same bf16 passes' gradients (what an fp32 accumulator
would give), and both against the fp32 model's gradient. Numbers are relative L2 errors over all weights.

    PYTHONPATH=. .venv/bin/python bench/bf16_accumulation.py [--rows 16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.models.sources import resolve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_tiny.json"


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16, help="passes accumulated (one row each)")
    args = ap.parse_args()
    src = resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(src)
    rows = json.loads(DATA.read_text(encoding="utf-8"))[: args.rows]
    texts = [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows]
    models = [AutoModelForCausalLM.from_pretrained(src, dtype=dt).train() for dt in (torch.float32, torch.bfloat16)]
    fp32_sum = bf16_in_fp32 = bf16_acc = None
    one_pass = []
    print(
        f"{'passes':>6} | bf16-accumulated vs fp32 sum of the bf16 grads | bf16 grads vs fp32's | accumulated vs fp32's"
    )
    for k, text in enumerate(texts, 1):
        batch = tok(text, return_tensors="pt", truncation=True, max_length=256)
        grads = []
        for m in models:
            m.zero_grad(set_to_none=True)
            (m(**batch, labels=batch["input_ids"]).loss / len(texts)).backward()
            grads.append(flat_grad(m))
        g32, g16 = grads
        one_pass.append(relative(g16, g32))
        fp32_sum = g32 if fp32_sum is None else fp32_sum + g32
        bf16_in_fp32 = g16 if bf16_in_fp32 is None else bf16_in_fp32 + g16
        bf16_acc = g16.bfloat16() if bf16_acc is None else bf16_acc + g16.bfloat16()  # what .grad += does
        if k & (k - 1) == 0 and k > 1:
            acc = bf16_acc.float()
            print(f"{k:>6} | {relative(acc, bf16_in_fp32):.5f} | {relative(bf16_in_fp32, fp32_sum):.4f} | "
                  f"{relative(acc, fp32_sum):.4f}")  # fmt: skip
    print(f"one bf16 pass against fp32's: {sum(one_pass) / len(one_pass):.4f} (mean over {len(texts)} rows)")


if __name__ == "__main__":
    main()
