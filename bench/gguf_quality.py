"""What each GGUF type costs a trained run, measured in llama.cpp: perplexity, KL and a task metric per quant.

Exports one run (by default the LoRA cell of `make demo`: SmolLM2-135M-Instruct tuned on 96 SST-2
rows) at every GGUF type tunelab writes, runs each file in llama.cpp (llama-cpp-python, `make
llama-cpp`) and the merged model in PyTorch on the same token ids (tunelab/export/check.py): perplexity
and mean KL divergence on the run's held-out rows, top-1 agreement, and SST-2 accuracy on the whole
dev split (872 rows) through the evaluation's verbalizer, with Wilson intervals and McNemar against the
unexported model. The PyTorch side is computed once and reused for every file. Prints a Markdown table.

    .venv/bin/python bench/gguf_quality.py                       # the demo's LoRA cell (run `make demo` first)
    .venv/bin/python bench/gguf_quality.py --run runs/sft-lora --task none --texts 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUANTS = ["f32", "f16", "q8_0", "q4_k", "q4_1", "q4_0"]


def demo_lora_run() -> str:
    """The run the demo's LoRA cell kept (its learning rate was chosen on validation rows)."""
    cells = sorted((ROOT / "runs/compare-sst2/cells").glob("smollm2-135m-instruct-lora-sst2-seed42-*"))
    if not cells:
        sys.exit("no demo LoRA cell under runs/compare-sst2: run `make demo` first, or pass --run")
    return str(ROOT / json.loads((cells[-1] / "result.json").read_text())["run_dir"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run folder (default: the demo's LoRA cell)")
    p.add_argument("--quants", default=",".join(QUANTS))
    p.add_argument("--texts", type=int, default=64, help="held-out texts")
    p.add_argument("--task", default="sst2", help="classification preset scored in both ('none': skip)")
    p.add_argument("--task-rows", type=int, default=None, help="dev rows (default: all)")
    p.add_argument("--out", default="runs/gguf_quality")
    args = p.parse_args()

    from tunelab.export import check
    from tunelab.export.hf import export, load_merged

    run = args.run or demo_lora_run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tokenizer, _ = load_merged(run)
    texts, source = check.heldout_texts(run, tokenizer, limit=args.texts)
    task, rows = check.task_setup(None if args.task == "none" else args.task, args.task_rows)
    reference = check.Reference(model, tokenizer, texts, task, rows)
    print(f"run {run}; texts from {source}; reference in {time.time() - t0:.0f} s", flush=True)
    reports = []
    for quant in args.quants.split(","):
        t = time.time()
        exported = export(run, "gguf", quant, str(out / f"model-{quant}.gguf"))
        report = {"quant": quant, "bytes": exported["bytes"], **check.check_file(exported["path"], reference)}
        report["seconds"] = time.time() - t
        reports.append(report)
        print(check.summary_line(report), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    (out / "results.json").write_text(
        json.dumps({"run": run, "commit": commit, "texts_from": source, "reports": reports}, indent=2)
    )

    def ci(d, fmt):
        return f"{fmt.format(d['value'])} [{fmt.format(d['ci95'][0])}, {fmt.format(d['ci95'][1])}]"

    r0 = reports[0]
    print(f"\ncommit {commit}; {r0['texts']} held-out texts, {r0['tokens']:,} tokens; "
          f"model perplexity {ci(r0['perplexity_model'], '{:.3f}')}")  # fmt: skip
    head = "| type | MB | perplexity | mean KL | max KL | top-1 agreement |"
    if task is not None:
        t0_ = r0["task"]
        head += f" {task.name} accuracy (n {t0_['rows']}; model {ci(t0_['accuracy_model'], '{:.3f}')}) | same answers | McNemar p |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in reports:
        line = (f"| {r['quant']} | {r['bytes'] / 1e6:.1f} | {ci(r['perplexity_file'], '{:.3f}')} | "
                f"{ci(r['kl_mean'], '{:.5f}')} | {r['kl_max']:.3f} | {ci(r['top1_agreement'], '{:.3f}')} |")  # fmt: skip
        if "task" in r:
            t = r["task"]
            line += f" {ci(t['accuracy_file'], '{:.3f}')} | {t['same_prediction']} | {t['mcnemar_p']:.3g} ({t['verdict']}) |"
        print(line)


if __name__ == "__main__":
    main()
