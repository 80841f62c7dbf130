"""DPO, KTO and reward modelling on CPU: TRL's DPOTrainer / KTOTrainer / RewardTrainer + PEFT (the references) and
tunelab's `stage: dpo` / `stage: kto` / `stage: reward`, back to back on the same job (issue 26, item 5).

The job: SmolLM2-135M-Instruct in fp32, the first Anthropic hh-rlhf harmless-base test pairs whose prompt and
both replies fit in 256 tokens of the model's chat template (so neither side truncates anything and both
see the same tokens), 64 pairs to train on and the next 64 held out; LoRA r=16 alpha=32 dropout 0 on all
linear layers, batch 8, 1 epoch, linear schedule, no warm-up; DPO beta 0.1 with the adapter switched off as
the reference on both sides (TRL's default with a PEFT model and no ref_model). KTO trains on the same pairs split
into 128 labelled replies (chosen desirable, rejected not: TRL's unpaired format; tunelab's kto splits the pair
file itself), weights 1, z_ref from mismatched replies on both sides. Each run is a fresh
subprocess, so its peak RSS is its own (loading + training; the held-out scoring is not counted).

Speed is pairs per second of training (the same 64 pairs on both sides; for kto the 128 replies, its rows, a
second; loading and data preparation are excluded on both). Quality is measured the same way for both trained
models, by one function each:
  dpo     held-out DPO loss and implicit-reward accuracy: log-ratios of the trained model against the base
          model on the response tokens (one `logps` function, the chat template rendered once for both);
  kto     the same measure on the same held-out pairs (KTO's implicit reward is DPO's: beta log pi / pi_ref);
  reward  held-out Bradley-Terry loss and pairwise accuracy of each side's scores (each scored with its own
          model class on the same rendered text: prompt + reply through the chat template).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/align_speed.py                    # dpo, kto and reward, TRL then tunelab
    .venv/bin/python bench/align_speed.py --stages dpo --max-steps 2   # a smoke run
    .venv/bin/python bench/align_speed.py --stages reward --bf16 --packing   # tunelab's reward job packed

`--packing` sets tunelab's `data.packing: true` for the reward job: each batch's 16 sequences packed into rows of
up to 256 tokens, each attended on its own and scored at its last token (TRL's RewardTrainer has no packing, so
its side pads every batch to its longest sequence as before).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_speed import TRL_CHECKPOINTING, _cell, cpu_from_first_step, cpu_seconds, peak_rss_mb, run_child

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
JOB = {"pairs": 64, "held_out": 64, "max_length": 256, "batch_size": 8, "r": 16, "alpha": 32, "beta": 0.1,
       "seed": 0, "lr": {"dpo": 5e-4, "kto": 5e-4, "reward": 1e-3}}  # fmt: skip


def tokenizer_and_path():
    from transformers import AutoTokenizer

    from tunelab.models.sources import resolve

    src = resolve("smollm2-135m-instruct")
    return AutoTokenizer.from_pretrained(src), src


def render(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], int]:
    """(token ids of prompt + reply through the chat template, number of prompt tokens)."""
    p = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                         return_dict=True)["input_ids"]  # fmt: skip
    return list(full), len(p)


def pairs(tokenizer) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) in TRL's conversational preference format, all fitting max_length."""
    from tunelab.data.preference import load_preference_pairs

    keep = []
    for p in load_preference_pairs(str(DATA), limit=2000):
        if all(len(render(tokenizer, p["prompt"], p[k])[0]) <= JOB["max_length"] for k in ("chosen", "rejected")):
            keep.append({"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                         "rejected": [{"role": "assistant", "content": p["rejected"]}]})  # fmt: skip
        if len(keep) == JOB["pairs"] + JOB["held_out"]:
            break
    assert len(keep) == JOB["pairs"] + JOB["held_out"], f"only {len(keep)} pairs fit {JOB['max_length']} tokens"
    held_out = keep[JOB["pairs"] :]
    return keep[: JOB["pairs"]], held_out[:8] if JOB.get("max_steps") else held_out  # a smoke run scores 8


def unpaired(train: list[dict]) -> list[dict]:
    """KTO's rows from pairs: each pair's chosen reply desirable, its rejected reply not (TRL's unpaired format)."""
    return [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
        for p in train
        for k in ("chosen", "rejected")
    ]


def rows(train: list[dict], stage: str) -> int:
    """What a stage trains on: pairs, or for kto the replies."""
    return 2 * len(train) if stage == "kto" else len(train)


# ------------------------------------------------------------------------------------------ quality
def logps(model, tokenizer, pair: dict, key: str):
    import torch

    ids, n_prompt = render(tokenizer, pair["prompt"], pair[key][0]["content"])
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return float(lp[n_prompt - 1 :].sum())


def dpo_quality(model, tokenizer, base, held_out: list[dict]) -> dict:
    import torch
    import torch.nn.functional as F

    h = torch.tensor([
        (logps(model, tokenizer, p, "chosen") - logps(base, tokenizer, p, "chosen"))
        - (logps(model, tokenizer, p, "rejected") - logps(base, tokenizer, p, "rejected"))
        for p in held_out
    ])  # fmt: skip
    return {"loss": float(-F.logsigmoid(JOB["beta"] * h).mean()), "accuracy": float((h > 0).float().mean())}


def reward_quality(score, held_out: list[dict]) -> dict:
    import torch
    import torch.nn.functional as F

    rc = torch.tensor([score(p, "chosen") for p in held_out])
    rr = torch.tensor([score(p, "rejected") for p in held_out])
    return {"loss": float(-F.logsigmoid(rc - rr).mean()), "accuracy": float((rc > rr).float().mean())}


def scorer(model, tokenizer):
    """score(pair, key): the model's scalar for prompt + reply rendered with the chat template."""
    import torch

    def score(pair, key):
        ids, _ = render(tokenizer, pair["prompt"], pair[key][0]["content"])
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    return score


# ------------------------------------------------------------------------------------------ jobs
def job_trl(stage: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

    tokenizer, src = tokenizer_and_path()
    train, held_out = pairs(tokenizer)
    common = dict(
        per_device_train_batch_size=JOB["batch_size"], num_train_epochs=1, learning_rate=JOB["lr"][stage],
        lr_scheduler_type="linear", warmup_steps=0, max_length=JOB["max_length"], logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=bool(JOB.get("bf16")), seed=JOB["seed"], disable_tqdm=True,
        max_steps=JOB.get("max_steps") or -1, gradient_checkpointing=TRL_CHECKPOINTING,  # TRL's default: on
    )  # fmt: skip
    task = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
    lora = LoraConfig(
        r=JOB["r"], lora_alpha=JOB["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type=task
    )
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "dpo":
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            args = DPOConfig(output_dir=tmp, beta=JOB["beta"], **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                                 processing_class=tokenizer, peft_config=lora)  # fmt: skip
        elif stage == "kto":
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            args = KTOConfig(output_dir=tmp, beta=JOB["beta"], **common)
            trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(unpaired(train)),
                                 processing_class=tokenizer, peft_config=lora)  # fmt: skip
        else:
            model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32)
            model.config.pad_token_id = tokenizer.pad_token_id
            args = RewardConfig(output_dir=tmp, **common)
            trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                                    processing_class=tokenizer, peft_config=lora)  # fmt: skip
        t0, c0 = time.perf_counter(), cpu_seconds()
        out = trainer.train()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        peak = peak_rss_mb()
    trained = trainer.model.eval()
    if stage in ("dpo", "kto"):
        base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        quality = dpo_quality(trained, tokenizer, base, held_out)
    else:
        quality = reward_quality(scorer(trained, tokenizer), held_out)
    return {"pairs": rows(train, stage), "steps": trainer.state.global_step, "seconds": seconds, "cpu_seconds": cpu,
            "train_loss": out.training_loss, "peak_rss_mb": peak, "precision": "bf16=True" if JOB.get("bf16") else "fp32",
            **quality}  # fmt: skip


def job_tunelab(stage: str) -> dict:
    import tunelab
    from tunelab.accel.memory import skip_unused_imports
    from tunelab.config import load_config
    from tunelab.models.sources import resolve
    from tunelab.stages.runs import load_run

    tokenizer, src = tokenizer_and_path()
    train, held_out = pairs(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in train))
        cfg = load_config({
            "output_dir": f"{tmp}/run", "stage": stage,
            "model": {"name": "smollm2-135m-instruct", "dtype": "auto" if JOB.get("bf16") else "float32"},
            "data": {"train": str(path), "format": "preference", "val_fraction": 0.0, "max_length": JOB["max_length"],
                     "packing": bool(JOB.get("packing")) and stage == "reward"},
            "method": {"name": "lora", "r": JOB["r"], "alpha": JOB["alpha"], "dropout": 0.0, "target_modules": "all-linear"},
            **({stage: {"beta": JOB["beta"]}} if stage in ("dpo", "kto") else {}),
            "training": {"epochs": 1, "batch_size": JOB["batch_size"], "lr": JOB["lr"][stage], "scheduler": "linear",
                         "warmup_ratio": 0.0, "seed": JOB["seed"], "progress": False, "tensorboard": False,
                         "device": "cpu", "max_steps": JOB.get("max_steps")},
        })  # fmt: skip
        skip_unused_imports(cfg)
        t0 = time.perf_counter()
        with cpu_from_first_step() as cpu:
            result = tunelab.train(cfg)
        wall = time.perf_counter() - t0
        peak = peak_rss_mb()
        m = result.metrics
        model, _ = load_run(str(result.final_dir), device="cpu", merge=True)
        model.eval()
        if stage in ("dpo", "kto"):
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct")).eval()
            quality = dpo_quality(model, tokenizer, base, held_out)
        else:
            quality = reward_quality(scorer(model, tokenizer), held_out)
    return {"pairs": rows(train, stage), "steps": m["steps"], "seconds": m["tokens"] / m["tokens_per_s"], "wall": wall,
            "cpu_seconds": cpu["seconds"], "precision": m.get("precision"),
            "train_loss": m["train_loss"], "peak_rss_mb": peak, **quality}  # fmt: skip


# ------------------------------------------------------------------------------------------ driver
def run_job(side: str, stage: str) -> dict:
    from tunelab.accel.memory import allocator_environment

    cmd = [sys.executable, __file__, "--job", side, "--stages", stage]
    if JOB.get("max_steps"):
        cmd += ["--max-steps", str(JOB["max_steps"])]
    if JOB.get("bf16"):
        cmd += ["--bf16"]
    if JOB.get("packing"):
        cmd += ["--packing"]
    cmd += ["--seed", str(JOB["seed"])]
    env = allocator_environment() if side == "tunelab" else None  # as `tunelab train` restarts itself
    out = run_child(cmd, env, f"{side} {stage}")
    trained = min(out["pairs"], out["steps"] * JOB["batch_size"])  # max_steps: fewer
    out["pairs_per_s"], out["pairs_per_cpu_s"] = trained / out["seconds"], trained / out["cpu_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="dpo,kto,reward", help="stages to time (comma separated: dpo, kto, reward)")
    parser.add_argument("--max-steps", type=int, help="stop every run early (a smoke test, not the benchmark)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="run every job N times; report medians")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run TRL and tunelab at the same time (a shared, loaded machine: both meet the same load)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="each side's bf16: TRL bf16=True (autocast), tunelab model.dtype auto (bf16 passes on a CPU "
        "with native bf16, else fp32); both print the precision they used",
    )
    parser.add_argument(
        "--packing",
        action="store_true",
        help="tunelab's reward job with data.packing: true (TRL's RewardTrainer has none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of both sides (the rows stay the same): the spread of "
        "the held-out figures across seeds is the noise a difference has to beat",
    )
    parser.add_argument("--job", choices=["trl", "tunelab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    JOB["max_steps"], JOB["bf16"], JOB["packing"], JOB["seed"] = args.max_steps, args.bf16, args.packing, args.seed
    if args.job:
        import torch

        torch.manual_seed(JOB["seed"])
        print(json.dumps((job_trl if args.job == "trl" else job_tunelab)(args.stages)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; job: {JOB}; rounds: {args.repeat}")
    spread, table = args.repeat > 1, []
    for stage in args.stages.split(","):
        runs = {"trl": [], "tunelab": []}
        for k in range(args.repeat):
            if args.concurrent:  # both sides at once: on a shared machine they meet the same load
                with ThreadPoolExecutor(2) as pool:  # each job is a child process: the threads only wait
                    outs = dict(zip(runs, pool.map(run_job, runs, [stage] * len(runs))))
            for side in runs:
                runs[side].append(outs[side] if args.concurrent else run_job(side, stage))
                print(f"round {k + 1}: {side} {stage}: {runs[side][-1]}", flush=True)
        for side, rs in runs.items():
            ref = runs["trl"]
            xs = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(rs, ref)]
            xc = [a["pairs_per_cpu_s"] / b["pairs_per_cpu_s"] for a, b in zip(rs, ref)]
            xm = [a["peak_rss_mb"] / b["peak_rss_mb"] for a, b in zip(rs, ref)]
            name = "TRL + PEFT" if side == "trl" else "tunelab"
            table.append(f"| {stage} | {name} | {_cell([r['pairs_per_s'] for r in rs], 3, spread)} | "
                         f"{_cell([r['pairs_per_cpu_s'] for r in rs], 3, spread)} | "
                         f"{_cell([r['peak_rss_mb'] for r in rs], 0, spread)} | {rs[0]['loss']:.4f} | "
                         f"{rs[0]['accuracy']:.3f} | {_cell(xs, 2, spread)} | {_cell(xc, 2, spread)} | "
                         f"{_cell(xm, 2, spread)} |")  # fmt: skip
    print("\n| stage | run | pairs/s | pairs/CPU-s | peak RSS MB | held-out loss | held-out accuracy | x pairs/s | "
          "x pairs/CPU-s | x RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    print(f"Held-out: {JOB['held_out']} pairs (accuracy's 95% interval is about +-0.12 at this size).")


if __name__ == "__main__":
    main()
