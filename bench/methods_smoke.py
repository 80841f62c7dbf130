"""Every registered method runs a short SFT on the default model through `tunelab train`,
with only the `method:` section changed. Prints a table: method, trainable %, steps/s, loss
before -> after, eval loss before -> after, result size on disk.

    .venv/bin/python bench/methods_smoke.py [--steps 6] [--methods lora,adapter]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(method: str, steps: int, out: Path) -> dict:
    cfg = {
        "output_dir": str(out),
        "model": {"name": "smollm2-135m-instruct"},
        "data": {
            "train": str(ROOT.parent / "shared/data/llamafactory-demo/alpaca_en_demo.json"),
            "limit": 48,
            "val_fraction": 0.25,
            "max_length": 192,
        },
        "method": {"name": method},
        "training": {
            "max_steps": steps,
            "batch_size": 4,
            "lr": 3e-4 if method not in ("full", "freeze", "gradual", "head") else 3e-5,
            "progress": False,
            "tensorboard": False,
            "warmup_steps": 1,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = out.with_suffix(".yaml")
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path)], capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160], "seconds": seconds}
    res = json.loads((out / "results.json").read_text())
    size = sum(p.stat().st_size for p in (out / "final").rglob("*") if p.is_file())
    return {
        "method": method,
        "trainable_%": 100 * res["trainable_params"] / res["total_params"],
        "eval_before": res["eval_loss_before"],
        "eval_after": res["eval_loss"],
        "tokens_per_s": res["tokens_per_s"],
        "result_MB": size / 1e6,
        "seconds": seconds,
    }


def main() -> None:
    from tunelab.methods.registry import names

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", default=",".join(names()))
    ap.add_argument("--out", default="runs/bench-methods")
    args = ap.parse_args()
    rows = []
    for m in args.methods.split(","):
        row = run(m, args.steps, Path(args.out) / m)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| method | trainable % | eval loss before → after | tokens/s | result MB | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | {r['seconds']:.0f} |")
        else:
            print(
                f"| {r['method']} | {r['trainable_%']:.3f} | {r['eval_before']:.4f} → {r['eval_after']:.4f} | "
                f"{r['tokens_per_s']:.0f} | {r['result_MB']:.1f} | {r['seconds']:.0f} |"
            )
    failed = [r["method"] for r in rows if "error" in r]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
