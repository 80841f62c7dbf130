"""LoRA SFT speed on CPU: TRL SFTTrainer + PEFT (the reference) and tunelab, back to back.

The job (issue 6): SmolLM2-135M-Instruct in fp32, the first 64 rows of the LLaMA-Factory alpaca
demo set, max length 256, batch 4, packing, LoRA r=16 alpha=32 on all linear layers, 1 epoch,
the same optimiser settings on both sides. Each run is a fresh subprocess so that its peak RSS is
its own. Prints trained tokens/s, peak RSS and the loss after the epoch for both, and the ratios.

"Loss after the epoch" is measured the same way for both trained models, with one function: the
mean next-token cross-entropy over the response tokens of held-out rows 64..127 (the same rows,
rendered with the model's chat template). Tokens/s counts every non-pad token that went through
the model during training, divided by the training time (model loading and data preparation are
excluded on both sides).

Each tunelab run gets the process environment `tunelab train` would restart itself with: on Linux,
Intel's TBB allocator preloaded (training.allocator; tunelab/accel/memory.py). The TRL reference
runs as TRL does, on glibc's malloc; `--trl-allocator tbbmalloc` runs it preloaded too.

    .venv/bin/pip install -e '.[bench]'                        # TRL, for the reference
    .venv/bin/python bench/train_speed.py                      # TRL reference vs tunelab LoRA
    .venv/bin/python bench/train_speed.py --methods lora,full,qlora --skip-trl
    .venv/bin/python bench/train_speed.py --tunelab-set method.dropout=0.05   # an ablation
    .venv/bin/python bench/train_speed.py --variant training.rows_per_pass=1  # default and low-memory runs
    .venv/bin/python bench/train_speed.py --variant training.allocator=system # tunelab on glibc's malloc
    .venv/bin/python bench/train_speed.py --off        # and the job with training.accelerate: off (plain PyTorch)
    .venv/bin/python bench/train_speed.py --task lima-512 --dropout 0.05   # issue 26's job, LoRA dropout both sides
    .venv/bin/python bench/train_speed.py --precision bf16   # both sides in bf16 autocast (a CPU with avx512_bf16)

`--task lima-512` (issue 26): the first 32 rows of LIMA at max length 512 (held out: rows 32..63), the rest
as above. `--dropout P` sets LoRA dropout on both sides (TRL's LoraConfig and tunelab's method.dropout).

Precision (`--precision`, default auto): auto is what `model.dtype: auto` picks on this host
(tunelab/models/precision.py: fp32 on CPUs for now); bf16 runs tunelab with `model.dtype: bfloat16` (bf16
weights and autocast, fp32 LoRA weights) and TRL with `bf16=True` on a bf16-loaded model, each side's own
bf16 setting. The table says which precision each side used.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/llamafactory-demo/alpaca_en_demo.json"
LIMA = ROOT.parent / "shared/data/lima/lima.json"  # instruction / input / output rows, as alpaca's
TRL_CHECKPOINTING = True
JOB = {"rows": 64, "held_out": 64, "max_length": 256, "batch_size": 4, "r": 16, "alpha": 32, "lr": 2e-4, "seed": 0,
       "dropout": 0.0, "data": str(DATA), "precision": "fp32"}  # fmt: skip
TASKS = {
    "alpaca-256": {"data": str(DATA), "rows": 64, "held_out": 64, "max_length": 256},
    "lima-512": {"data": str(LIMA), "rows": 32, "held_out": 32, "max_length": 512},
}


def rows(start: int, n: int) -> list[dict]:
    return json.loads(Path(JOB["data"]).read_text())[start : start + n]


def messages(row: dict) -> list[dict]:
    user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def held_out_loss(model, tokenizer) -> float:
    """Mean CE over response tokens of the held-out rows; one function for both trained models."""
    import torch

    from tunelab.data.templating import encode_messages
    from tunelab.models.loss import per_example_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows(JOB["rows"], JOB["held_out"]):
            enc = encode_messages(messages(row), tokenizer)
            ids, labels = enc["input_ids"][: JOB["max_length"]], enc["labels"][: JOB["max_length"]]
            batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            batch["labels"] = torch.tensor([labels])
            total += float(per_example_loss(model, batch)[0])
            count += sum(1 for x in labels[1:] if x != -100)
    return total / count


# ------------------------------------------------------------------------------------------ jobs
def job_trl(method: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.sources import resolve

    assert method == "lora", "the TRL reference is the LoRA job"
    src = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(src)
    bf16 = JOB["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16 if bf16 else torch.float32)
    data = [{"prompt": m[:1], "completion": m[1:]} for m in map(messages, rows(0, JOB["rows"]))]
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=JOB["batch_size"],
            num_train_epochs=1,
            learning_rate=JOB["lr"],
            lr_scheduler_type="linear",
            warmup_steps=0,
            max_length=JOB["max_length"],
            packing=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=bf16,  # TRL's own bf16 setting (autocast) where the job is bf16; fp32 where bf16 is not native
            gradient_checkpointing=TRL_CHECKPOINTING,  # TRL's default: on
            seed=JOB["seed"],
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            max_steps=JOB.get("max_steps") or -1,
        )
        lora = LoraConfig(
            r=JOB["r"],
            lora_alpha=JOB["alpha"],
            lora_dropout=JOB["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(data), peft_config=lora, processing_class=tokenizer
        )
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()  # loading + training; the held-out scoring below is not counted
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "train_loss": out.training_loss,
        "loss_after": held_out_loss(trainer.model, tokenizer),
        "peak_rss_mb": peak,
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def tunelab_config(method: str, overrides: list[str], tmp: str):
    from tunelab.config import load_config

    method_cfg = {"name": method}
    if method in ("lora", "qlora"):
        method_cfg.update(r=JOB["r"], alpha=JOB["alpha"], dropout=JOB["dropout"], target_modules="all-linear")
    return load_config(
        {
            "output_dir": f"{tmp}/run",
            "model": {"name": "smollm2-135m-instruct", "dtype": {"bf16": "bfloat16"}.get(JOB["precision"], "float32")},
            "data": {
                "train": f"{tmp}/train.json",
                "val_fraction": 0.0,
                "max_length": JOB["max_length"],
                "packing": True,
            },
            "method": method_cfg,
            "training": {
                "epochs": 1,
                "batch_size": JOB["batch_size"],
                "lr": JOB["lr"] if method != "full" else 2e-5,
                "scheduler": "linear",
                "warmup_ratio": 0.0,
                "seed": JOB["seed"],
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
                "max_steps": JOB.get("max_steps"),
            },
        },
        overrides,
    )


def job_tunelab(method: str, overrides: list[str]) -> dict:
    import tunelab
    from tunelab.accel.memory import skip_unused_imports
    from tunelab.stages.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.json").write_text(json.dumps(rows(0, JOB["rows"])))
        cfg = tunelab_config(method, overrides, tmp)
        skip_unused_imports(cfg)  # as `tunelab train` does: this process runs this one training
        result = tunelab.train(cfg)
        peak = peak_rss_mb()  # loading + training; reloading the result for scoring is not counted
        model, tokenizer = load_run(result.final_dir)
        loss_after = held_out_loss(model, tokenizer)
    m = result.metrics
    return {
        "tokens": m["tokens"],
        "seconds": m["tokens"] / m["tokens_per_s"],
        "train_loss": m["train_loss"],
        "loss_after": loss_after,
        "peak_rss_mb": peak,
        "precision": m["precision"],
    }


# ------------------------------------------------------------------------------------------ driver
def job_environment(side: str, method: str, overrides: list[str], trl_allocator: str) -> dict | None:
    """The process environment of a job: tunelab's runs get the allocator `tunelab train` would restart
    itself with (training.allocator, tunelab/accel/memory.py); TRL's runs as plain Python, unless asked."""
    from tunelab.accel.memory import allocator_environment, wants_tbbmalloc

    if side == "trl":
        return allocator_environment() if trl_allocator == "tbbmalloc" else None
    return allocator_environment() if wants_tbbmalloc(tunelab_config(method, overrides, "/unused").training) else None


def run_child(cmd: list[str], env: dict | None, label: str, stderr: list | None = None) -> dict:
    """Run one bench job in a fresh process (so its peak RSS is its own) and return the JSON object it
    prints as its last line; a failing job stops the bench with the end of its stderr. `stderr`: a list
    that receives the job's stderr lines (for the caller's log excerpts)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    if stderr is not None:
        stderr.extend(proc.stderr.splitlines())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(side: str, method: str, overrides: list[str], trl_allocator: str = "system") -> dict:
    cmd = [sys.executable, __file__, "--job", side, "--methods", method, "--task", JOB["task"],
           "--precision", JOB["precision"]]
    cmd += ["--dropout", str(JOB["dropout"])]
    if JOB.get("max_steps"):
        cmd += ["--max-steps", str(JOB["max_steps"])]
    for o in overrides:
        cmd += ["--tunelab-set", o]
    env = job_environment(side, method, overrides, trl_allocator)
    result = run_child(cmd, env, f"{side} {method}")
    result["allocator"] = (env or {}).get("TUNELAB_ALLOCATOR", "system")
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora", help="tunelab methods to time (comma separated)")
    parser.add_argument("--skip-trl", action="store_true", help="do not run the TRL reference")
    parser.add_argument("--tunelab-set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one more tunelab LoRA run with these overrides, against the same reference (repeatable)",
    )
    parser.add_argument(
        "--off",
        action="store_true",
        help="one more tunelab LoRA run with training.accelerate: off (plain PyTorch + PEFT, no tunelab/accel); "
        "the same as --variant training.accelerate=off",
    )
    parser.add_argument("--max-steps", type=int, help="stop both runs early (a smoke test, not the benchmark)")
    parser.add_argument("--task", choices=sorted(TASKS), default="alpaca-256", help="the data, rows and max length")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (default 0)")
    parser.add_argument(
        "--trl-allocator",
        choices=["system", "tbbmalloc"],
        default="system",
        help="run the TRL reference on glibc's malloc (as TRL runs; the default) or preloaded with tbbmalloc",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="run every job N times, in rounds; report the medians"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: what model.dtype auto picks on this host (fp32 on CPUs for now); bf16: bf16 autocast on both "
        "sides (tunelab model.dtype bfloat16, TRL bf16=True)",
    )
    parser.add_argument("--job", choices=["trl", "tunelab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    JOB["max_steps"] = args.max_steps
    JOB.update(TASKS[args.task], task=args.task, dropout=args.dropout)
    JOB["precision"] = args.precision if args.precision != "auto" else _auto_precision()
    if args.off:
        args.variant.append("training.accelerate=off")

    if args.job:  # child process: run one job, print its figures as the last line
        import torch

        torch.manual_seed(JOB["seed"])
        out = job_trl(args.methods) if args.job == "trl" else job_tunelab(args.methods, args.tunelab_set)
        print(json.dumps(out))
        return

    import torch

    from tunelab.models.precision import choose_precision

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; job: {JOB}; rounds: {args.repeat}")
    print(f"precision: {JOB['precision']} (--precision {args.precision}; this host: {choose_precision('auto', 'cpu').reason})")
    jobs = [] if args.skip_trl else [("TRL SFTTrainer + PEFT", "trl", "lora", [])]
    jobs += [("tunelab", "tunelab", method, args.tunelab_set) for method in args.methods.split(",")]
    # KEY=VALUE pairs split at a comma followed by the next KEY=, so a value may be a list: k=[a,b]
    jobs += [(f"tunelab {v}", "tunelab", "lora", args.tunelab_set + re.split(r",(?=[\w.]+=)", v)) for v in args.variant]
    # rounds: every job once per round, in order, so that each round's ratios are against a reference run
    # minutes away (the machine drifts by more than the differences measured)
    results: list[list[dict]] = [[] for _ in jobs]
    for k in range(args.repeat):
        for (name, side, method, overrides), out in zip(jobs, results):
            out.append(run_job(side, method, overrides, args.trl_allocator))
            print(f"round {k + 1}: {name} {method} done: {out[-1]}", flush=True)

    ref = results[0] if not args.skip_trl else None
    spread = args.repeat > 1
    header = "| run | method | precision | allocator | tokens | tokens/s | peak RSS MB | train loss* | held-out loss after |"
    print("\n" + header + ("  x tok/s | x RSS | loss diff |" if ref else ""))
    print("|" + "---|" * (header.count("|") - 1 + (3 if ref else 0)))
    for (name, _, method, _), rs in zip(jobs, results):
        r = rs[0]
        speed, rss = [x["tokens_per_s"] for x in rs], [x["peak_rss_mb"] for x in rs]
        line = (
            f"| {name} | {method} | {r['precision']} | {r['allocator']} | {r['tokens']} | {_cell(speed, 1, spread)} | {_cell(rss, 0, spread)} | "
            f"{r['train_loss']:.4f} | {r['loss_after']:.4f} |"
        )
        if ref:  # each round's ratio against that round's reference, then their median
            x_speed = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rs, ref)]
            x_rss = [x["peak_rss_mb"] / y["peak_rss_mb"] for x, y in zip(rs, ref)]
            line += (
                f" {_cell(x_speed, 2, spread)} | {_cell(x_rss, 2, spread)} |"
                f" {100 * (r['loss_after'] - ref[0]['loss_after']) / ref[0]['loss_after']:+.2f}% |"
            )
        print(line)
    print("* TRL reports the epoch's mean training loss, tunelab its last step's; compare the held-out column.")
    if spread:
        print(f"Each cell: the median of {args.repeat} rounds (lowest-highest); ratios are per round, then the median.")


def _auto_precision() -> str:
    """What `model.dtype: auto` picks on this host's CPU: the job's precision under --precision auto."""
    from tunelab.models.precision import choose_precision

    return "bf16" if choose_precision("auto", "cpu").autocast else "fp32"


def _cell(values: list[float], digits: int, spread: bool) -> str:
    """The median of `values`, with their range when there are several."""
    median = statistics.median(values)
    if not spread:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
