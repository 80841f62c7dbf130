"""Masked-LM settings on a development slice of the training text (docs/pretraining.md, "Why it ties").

Builds the model and data of examples/pretrain-scratch-mlm.yaml through the mlm stage (tokenizer, blocks,
masking, loss and the held-out scorer are the stage's own), holds out the last `--dev` training blocks and
trains on the rest with a plain AdamW loop (the harness's decay groups, linear warmup, cosine, clipping at 1),
printing the dev slice's masked-token accuracy beside the most frequent token every `--every` steps, so the
end of the plateau can be seen. The held-out tail of the corpus is never touched: pick settings here, score
them with `tunelab train`.

    python bench/mlm_dev.py --arch bert --lr 1e-3 --warmup 30 --steps 300 \\
        --config '{"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from types import SimpleNamespace

import torch

from tunelab.config import load_config
from tunelab.metrics.stats import wilson_interval
from tunelab.stages import mlm
from tunelab.stages import pretraining as pt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--example", default="examples/pretrain-scratch-mlm.yaml")
    ap.add_argument("--arch", help="model.architecture (default: the example's)")
    ap.add_argument("--config", default="{}", help="JSON over the example's model.config")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dev", type=int, default=150, help="training blocks held out as the dev slice")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--max-length", type=int, help="data.max_length (default: the example's)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.example)
    cfg.data.max_length = args.max_length or cfg.data.max_length
    cfg.model.architecture = args.arch or cfg.model.architecture
    cfg.model.config = {**cfg.model.config, **json.loads(args.config)}
    model, tok = mlm.load(cfg, "cpu")
    data = mlm.build(cfg, tok)
    train, dev = data.train[: -args.dev], data.train[-args.dev :]
    slice_ = SimpleNamespace(train=train, val=dev)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": cfg.training.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    order, k, t0 = [], 0, time.time()
    model.train()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / max(args.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        if k + args.batch > len(order):
            order, k = torch.randperm(len(train), generator=g).tolist(), 0
        batch = mlm.mlm_collate([train[i] for i in order[k : k + args.batch]], tok.pad_token_id)
        k += args.batch
        loss, n = mlm.loss_sum(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            m = pt.masked_metrics(model, tok, cfg, slice_, "cpu")
            model.train()
            n_dev = m["masked_tokens"]
            lo, hi = wilson_interval(round(m["masked_accuracy"] * n_dev), n_dev)
            print(f"step {step + 1}: train loss {float(loss.detach()) / n:.3f}, dev accuracy {m['masked_accuracy']:.4f} "
                  f"({lo:.4f}-{hi:.4f}) vs most frequent {m['baseline_majority_token_accuracy']:.4f} over {n_dev} "
                  f"masked tokens, {time.time() - t0:.0f}s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
