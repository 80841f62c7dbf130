"""RoPE scaling measured where a CPU can afford it (the acceptance check of docs/long-context.md).

A small Llama is trained from scratch at a 256-token context on text (the Python standard library's source
files: real text with long-range structure, on every machine), then held-out perplexity is taken at 1x, 2x and
4x that context without scaling and with each scaling type, and again after a short fine-tune at 4x (packed
rows of 1,024 tokens) with yarn, and, for reference, the same fine-tune without scaling. Each perplexity comes
with a 95% bootstrap interval over the held-out windows, and the fine-tuned yarn model is compared with the
others window by window (paired bootstrap). Everything goes through tunelab: `tunelab.train` (stage
pretrain, method full) and evaluation/context.py.

    python bench/rope_context.py [--steps 300] [--ft-steps 40] [--out rope.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

NATIVE = 256


def corpus(tmp: Path, seed: int = 0) -> tuple[str, list[str]]:
    """(train .txt, held-out texts): stdlib .py files, split by file. The training files go into one plain-text
    corpus, which stage pretrain cuts into blocks of the run's length over all of it (rows of a .jsonl would
    each be truncated to one block: the first 256 tokens of every file, learnt by heart in a few passes)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    random.Random(seed).shuffle(files)
    texts = [f.read_text(errors="ignore") for f in files]
    texts = [t for t in texts if len(t) > 4000]
    held, train = texts[:12], texts[12:]
    path = tmp / "train.txt"
    path.write_text("\n\n".join(t[:20000] for t in train))
    return str(path), held


def train(base: str, data: str, out: Path, length: int, steps: int, lr: float, rope: dict | None = None) -> str:
    from tunelab.config import load_config

    model = {"name": base, **({"rope_scaling": rope} if rope else {})}
    cfg = load_config({
        "output_dir": str(out), "stage": "pretrain", "model": model,
        "data": {"train": data, "val_fraction": 0.02, "max_length": length, "packing": True},
        "method": {"name": "full"},
        "training": {"max_steps": steps, "batch_size": max(1, 2048 // length), "lr": lr, "warmup_ratio": 0.05,
                     "progress": False, "tensorboard": False},
    })  # fmt: skip
    return str(train_whole(cfg).run_dir / "final")


def train_whole(cfg):
    """`tunelab.train(cfg)`, or the bench stops: Ctrl-C / SIGTERM end a run cleanly, and a bench that went on
    would score a partial run (also bench/distill_student.py's runs)."""
    import tunelab

    result = tunelab.train(cfg)
    if result.metrics.get("interrupted"):
        raise SystemExit(
            f"{cfg.output_dir}: interrupted at step {result.metrics.get('steps')}; no figures from a partial run"
        )
    return result


def ppl(model_dir: str, held: list[str], context: int, rope: dict | None = None, windows: int = 24) -> dict:
    """Held-out perplexity at `context` over the first `windows` windows: the value, a 95% percentile
    bootstrap interval over windows (each window's tokens resampled together: neighbouring tokens are not
    independent), and the per-window NLLs for paired comparisons."""
    import numpy as np

    from tunelab.config import ModelConfig
    from tunelab.evaluation.context import context_perplexity
    from tunelab.metrics.stats import bootstrap_mean_interval
    from tunelab.models import load_model

    model, tok = load_model(ModelConfig(name=model_dir, rope_scaling=rope))
    scores = context_perplexity(model, tok, held, context, "cpu", limit=windows)
    per_token = np.asarray(scores["window_nll"]) / (context - 1)  # every window has context - 1 targets
    lo, hi = bootstrap_mean_interval(per_token, n_boot=2000)
    return {"ppl": round(scores["perplexity"], 2), "interval": [round(math.exp(lo), 2), round(math.exp(hi), 2)],
            "windows": scores["windows"], "loss_per_window": per_token.tolist()}  # fmt: skip


def paired(a: dict, b: dict) -> dict:
    """a against b on the same windows: the ratio of perplexities, its 95% bootstrap interval over windows and
    the paired bootstrap p-value (the same resampled windows score both)."""
    import numpy as np

    from tunelab.metrics.stats import bootstrap_mean_interval, paired_bootstrap_pvalue

    x, y = np.asarray(a["loss_per_window"]), np.asarray(b["loss_per_window"])
    lo, hi = bootstrap_mean_interval(x - y, n_boot=2000)
    p = paired_bootstrap_pvalue(lambda i: x[i].mean(), lambda i: y[i].mean(), len(x), n_boot=2000)
    return {"ppl_ratio": round(math.exp((x - y).mean()), 4), "interval": [round(math.exp(lo), 4), round(math.exp(hi), 4)],
            "p": round(p, 4)}  # fmt: skip


def main() -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.models import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="from-scratch steps at 256 tokens")
    ap.add_argument("--ft-steps", type=int, default=40, help="fine-tune steps at 1,024 tokens")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="rope-bench-"))
    data, held = corpus(tmp)
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))  # a real BPE vocabulary
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=NATIVE,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp / "init")
    tok.save_pretrained(tmp / "init")
    base = train(str(tmp / "init"), data, tmp / "scratch", NATIVE, args.steps, 2e-3)
    print(f"trained at {NATIVE} in {time.time() - t0:.0f}s", file=sys.stderr)
    settings = {
        "none": lambda f: None,
        "linear": lambda f: {"type": "linear", "factor": f},
        "dynamic": lambda f: {"type": "dynamic", "factor": f},
        "yarn": lambda f: {"type": "yarn", "factor": f},
        "llama3": lambda f: {"type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }
    table = {"native": {"none": ppl(base, held, NATIVE)}}
    for mult in (2, 4):
        table[f"{mult}x"] = {k: ppl(base, held, NATIVE * mult, s(float(mult))) for k, s in settings.items()}
    yarn4 = settings["yarn"](4.0)
    tuned = train(base, data, tmp / "ft-yarn", 4 * NATIVE, args.ft_steps, 5e-4, yarn4)
    plain = train(base, data, tmp / "ft-none", 4 * NATIVE, args.ft_steps, 5e-4)
    table["4x after fine-tune"] = {"yarn": ppl(tuned, held, 4 * NATIVE), "none": ppl(plain, held, 4 * NATIVE)}
    after = table["4x after fine-tune"]
    compare = {"yarn+ft vs none (no fine-tune)": paired(after["yarn"], table["4x"]["none"]),
               "yarn+ft vs none+ft": paired(after["yarn"], after["none"]),
               "yarn+ft vs yarn (no fine-tune)": paired(after["yarn"], table["4x"]["yarn"])}  # fmt: skip
    for row in table.values():
        for v in row.values():
            v.pop("loss_per_window")
    result = {"perplexity": table, "paired at 4x (ratio < 1: the first is better)": compare, "steps": args.steps,
              "ft_steps": args.ft_steps, "seconds": round(time.time() - t0)}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
