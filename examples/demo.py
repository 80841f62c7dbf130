"""The short demo (`make sft-demo`; the main job, `make demo`, is examples/compare-sst2.yaml): LoRA-tune the
default model on a small real instruction set.

Prints the eval loss before and after training and one generation before and after, using the
same Python API the CLI uses. Runs in a few minutes on a 2-core CPU.

    python examples/demo.py [--set training.max_steps=5 ...]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import tunelab
from tunelab.inference import generate
from tunelab.stages.runs import load_run

HERE = Path(__file__).resolve().parent
PROMPT = "Give three tips for staying healthy."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "sft-lora.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from tunelab.data import shared_data_dir

    data = shared_data_dir() / "llamafactory-demo" / "alpaca_en_demo.json"
    overrides = [f"data.train={data}", "output_dir=runs/demo", *args.set]
    cfg = tunelab.load_config(args.config, overrides)
    t0 = time.time()

    base, tokenizer = load_run(cfg.model.name, device=cfg.training.device)  # fetches + caches the model once
    before = generate(base, tokenizer, PROMPT, max_new_tokens=80)
    del base

    run_dir = Path(cfg.output_dir)
    if (run_dir / "final").exists():  # a finished earlier demo: start afresh
        shutil.rmtree(run_dir)
    resume = (run_dir / "checkpoints").exists()  # an interrupted one: continue it
    result = tunelab.train(cfg, resume=resume)

    model, tokenizer = load_run(str(result.run_dir), device=cfg.training.device)
    after = generate(model, tokenizer, PROMPT, max_new_tokens=80)

    m = result.metrics
    print("\n" + "=" * 72)
    print(f"model: {cfg.model.name}   method: {cfg.method.name}   steps: {m['steps']}")
    print(f"trainable parameters: {m['trainable_params']:,} of {m['total_params']:,}")
    print(f"eval loss before: {m['eval_loss_before']:.4f}")
    print(f"eval loss after:  {m['eval_loss']:.4f}")
    print(f"training throughput: {m['tokens_per_s']:.0f} tokens/s")
    print(f"\nprompt: {PROMPT}\n\n--- before ---\n{before}\n\n--- after ---\n{after}")
    print(f"\nadapter (loads with PeftModel.from_pretrained): {result.final_dir}")
    print(f"try it:  .venv/bin/tunelab chat {result.run_dir}")
    print(f"total time: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
