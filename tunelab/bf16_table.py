"""Which training runs `model.dtype: auto` trains in bf16 on a CPU with native bf16: those measured faster at the same
loss (models/precision.py has the rest of the choice). Imports nothing, so the config's description, the note on
other toolkits' dtype keys (peer_keys) and the precision choice all read this one table.
"""

from __future__ import annotations

# The training runs whose bf16 is measured faster on a CPU at the same loss (docs/performance.md): the one place
# that says so, read by `measured_bf16` (the loop's question) and `measured_text` (the log lines, model.dtype's
# description, the note on other toolkits' dtype keys).
#   (methods, stages, needs training.accelerate: auto, how they train in bf16)
# Causal-LM stages: a decoder's big matmuls, where bf16 pays. Encoder stages (classification, tagging, QA, MLM,
# seq2seq) stay fp32 unless measured: LoRA on MiniLM's SST-2 classification ran no faster in bf16 (640 against
# 647 tokens/s) and scored 0.821 against 0.842 (872 rows); full fine-tuning of it ran 1.25x faster, tied (0.835
# against 0.836).
# (PPO runs its own loop, fp32 under auto on a CPU: training/ppo.py)
CAUSAL = ("sft", "pretrain", "dpo", "reward", "distill")
MEASURED_BF16 = (
    (("lora", "prompt", "prefix"), CAUSAL, True, "bf16 passes"),
    (("qlora",), CAUSAL, False, "bf16 passes"),  # bitsandbytes' 4-bit matmuls in bf16, with or without accel
    # examples/kto-hh.yaml: 423 against 188 tokens/s, eval loss 0.4946 against 0.4932, held-out pairwise accuracy
    # 102 against 99 of 160 (docs/alignment.md, KTO)
    (("lora",), ("kto",), True, "bf16 passes"),
    # examples/kto-hh.yaml with method qlora: 293 against 139 tokens/s, eval loss 0.4947 against 0.4936, held-out
    # pairwise accuracy 91 against 93 of 160 (docs/alignment.md, KTO)
    (("qlora",), ("kto",), False, "bf16 passes"),
    (("full",), (*CAUSAL, "classification"), True, "bf16 weights"),  # unless training.master_weights: fp32
    # examples/kto-hh.yaml with method full, lr 5e-6: 197 against 80 tokens/s, eval loss 0.4982 against 0.4991,
    # held-out pairwise accuracy 88 against 90 of 160 (docs/alignment.md, KTO)
    (("full",), ("kto",), True, "bf16 weights"),
    (("freeze", "gradual", "head", "bitfit", "adapter", "ia3"), ("sft", "pretrain"), True, "bf16 autocast"),
)


def measured_bf16(method: str, stage: str, accelerate: bool, master_weights: str = "auto") -> bool:
    """Whether this kind of training run is one of MEASURED_BF16's (`choose_precision(..., measured=...)`)."""
    if method == "full" and master_weights == "fp32":
        return False
    return any(method in methods and stage in stages and (accelerate or not needs)
               for methods, stages, needs, _ in MEASURED_BF16)  # fmt: skip


def measured_text() -> str:
    """MEASURED_BF16 for a log line: "lora / prompt / prefix (causal-LM stages) / ...: bf16 passes; ..."."""
    by_how: dict[str, list[str]] = {}
    for methods, stages, _, how in MEASURED_BF16:
        causal = stages[: len(CAUSAL)] == CAUSAL
        rest = stages[len(CAUSAL) :] if causal else stages
        named = ", ".join(["causal-LM stages"] * causal + [" / ".join(rest)] * bool(rest))
        by_how.setdefault(how, []).append(f"{' / '.join(methods)} ({named})")
    return "; ".join(f"{' / '.join(kinds)}: {how}" for how, kinds in by_how.items())
