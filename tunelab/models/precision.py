"""Which precision a run computes in: `model.dtype` resolved against the device, with the reason.

    auto      CUDA with bf16: bf16 weights, bf16 autocast, trainable weights kept in fp32 (master weights).
              A CPU with native bf16 (see below), for LoRA, prompt or prefix training with
              `training.accelerate: auto`, and QLoRA training, on a causal-LM stage: bf16 frozen weights (4-bit
              matmuls in bf16), fp32 master weights, the passes in bf16 (tunelab/accel's bf16 passes, no
              autocast); for full fine-tuning (accelerate: auto, training.master_weights not fp32) on those and
              classification: bf16 autocast over bf16 weights with stochastic rounding; freeze / gradual / head /
              bitfit / adapter / ia3 SFT or pretraining: bf16 autocast (the table: tunelab/bf16_table.py). Any
              other CPU load (other stages, chat, export, a CPU without native bf16): fp32.
              Elsewhere (MPS, old GPUs): fp32.
    bfloat16  the same mixed precision on any device: frozen weights stored in bf16, the weights that train
              in fp32; the passes under `torch.autocast`, or on a CPU in bf16 by themselves where
              tunelab/accel covers every layer that trains (LoRA, QLoRA, prompt, prefix, a task head). On a
              CPU without native bf16 every bf16 matmul is emulated (~250x slower); the log says so.
    float32   fp32 throughout.
    float16   fp16 weights (autocast in fp16 on CUDA only).

Native bf16 on a CPU means instructions that multiply bf16 directly: x86's AVX512-BF16 (`avx512_bf16`,
Zen 4, Cooper Lake, Sapphire Rapids) or AMX (`amx_bf16`), Arm's BF16 extension (`bf16`). AVX-512 alone
(this repository's CI hosts) or AVX2 (Zen 3) convert to fp32 per element instead. Read from
/proc/cpuinfo: torch's `get_cpu_capability()` reports the vector width (AVX512) and not these extensions.

Why `auto` takes bf16 on such a CPU for LoRA training, and only there: measured on a Sapphire-Rapids-class
Xeon (`amx_bf16`, 2 threads, a busy machine), the bench's LoRA SFT job ran at 1.35-1.94x fp32's tokens/s in
bf16 passes (three rounds), to the same held-out loss within 0.4% (docs/performance.md, "bf16 on a CPU"); QLoRA
on the 1.7B config ran at 3.1x fp32's tokens/s at 0.79x its peak memory, and on the default model (40 steps
of alpaca rows) at 2.0x to a held-out loss 0.26% above fp32's; prompt tuning on the bench job at 1.73x fp32's
tokens/s to the same held-out loss (prefix: docs/performance.md); full fine-tuning with bf16 weights on the bench
job at 1.74x fp32's tokens/s and 0.60x its peak memory, held-out loss 1.6799 against 1.6798 (docs/performance.md,
"bf16 weights"; with fp32 master weights it took more memory than fp32, so that setting keeps fp32 under `auto`).
Freeze, gradual unfreezing, head, BitFit, bottleneck adapters and IA3 on the bench's SFT job: 1.6-2.2x fp32's
tokens/s at 0.6-1.0x its peak, the held-out losses tied (docs/performance.md); their SFT and pretraining runs take
bf16 too, other stages (classification, QA ...) fp32. LoRA, QLoRA, prompt, prefix and full fine-tuning take bf16 on
the causal-LM stages (SFT, pretraining, DPO, reward, distillation; PPO's own loop stays fp32) and full fine-tuning on classification too
(MiniLM on SST-2: 1.25x, accuracy tied); encoder stages otherwise stay fp32 (bf16_table.py's comment).
The training loop says which kind of run it is
(`choose_precision(..., measured=True)`); the loader alone resolves `auto` to fp32 on a CPU.
`CPU_BF16_AUTO = False` (or TUNELAB_CPU_BF16_AUTO=0 in the environment) turns the choice off.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.bf16_table import measured_text

if TYPE_CHECKING:  # torch is imported where used: `tunelab --help` stays fast
    import torch

# whether `model.dtype: auto` trains LoRA in bf16 on a CPU with native bf16: measured faster at the same loss; and
# whether `training.optimizer_state: auto` keeps an fp32 run's gradients and moments in bf16 (training/harness.py).
# TUNELAB_CPU_BF16_AUTO=0 turns both off for a process and its children: the test suite, whose expectations are
# fp32's (losses to 1e-5, compact fp32 weights) as on its CI hosts, which have no native bf16
CPU_BF16_AUTO = os.environ.get("TUNELAB_CPU_BF16_AUTO", "1") != "0"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX, Arm BF16 (aarch64 Features)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # what the model's weights are loaded in
    autocast: bool  # matmuls under torch.autocast(device, dtype); the trainable weights kept in fp32
    reason: str  # for the run log
    # the trainable weights in fp32 beside frozen ones in `dtype`, the passes in `dtype` without autocast: every
    # layer that trains runs in bf16 by itself (tunelab/accel's bf16 passes)
    master: bool = False
    # the weights that train kept in bf16 too, AdamW rounding stochastically (training.master_weights: bf16)
    bf16_weights: bool = False

    @property
    def name(self) -> str:
        kind = str(self.dtype).removeprefix("torch.")
        weights = "bf16 weights (stochastic rounding)" if self.bf16_weights else "fp32 master weights"
        if self.autocast:
            return f"{kind} autocast, {weights}"
        return f"{kind}, {weights}" if self.master or self.bf16_weights else kind

    def with_bf16_weights(self) -> Precision:
        return replace(self, bf16_weights=True)

    def without_autocast(self) -> Precision:
        """The same weights, the passes in bf16 without autocast (accel's bf16 passes: `master`)."""
        return replace(self, autocast=False, master=True)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo's `flags` (x86) or `Features` (Arm) line; empty where
    there is no such file (macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def native_bf16(device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 natively, and what says so. `flags`: the CPU's (default: this one's)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16 (compute capability < 8.0)"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 not used"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if have:
        return True, f"the CPU has native bf16 ({', '.join(have)})"
    if not flags:
        return False, f"no CPU flags to read on {platform.system() or 'this system'}: bf16 taken as emulated"
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return False, f"the CPU has no native bf16 ({widest}, no avx512_bf16 / amx_bf16): bf16 would be emulated"


def choose_precision(
    setting: str, device, flags: set[str] | None = None, measured: bool = False, run: str = ""
) -> Precision:
    """`model.dtype` (`setting`) resolved on `device`: the weights' dtype, whether to autocast, and why. `measured`:
    a kind of training run whose bf16 is measured faster on a CPU at the same loss (`bf16_table.measured_bf16`); every other
    load resolves `auto` to fp32 on a CPU (module doc). `run` names the training run in the reason ("ia3 on
    dpo")."""
    import torch

    device = torch.device(device)
    native, why = native_bf16(device, flags) if device.type in ("cuda", "cpu") else (False, "")
    mixed = device.type in ("cuda", "cpu")  # where tunelab runs bf16 under autocast with fp32 master weights
    if setting == "auto":
        if device.type == "cuda" and native:
            return Precision(torch.bfloat16, True, f"model.dtype auto: {why}")
        if device.type == "cpu" and native and CPU_BF16_AUTO and measured:
            return Precision(torch.bfloat16, True, f"model.dtype auto: {why}; measured faster: {measured_text()}")
        if device.type == "cpu" and native and CPU_BF16_AUTO:
            return Precision(
                torch.float32,
                False,
                f"model.dtype auto: fp32; {why}, but bf16 is measured faster only for these training runs "
                f"(training.accelerate: auto, but for qlora): {measured_text()}"
                + (f"; not this one ({run})" if run else "")
                + ". model.dtype: bfloat16 asks for it",
            )
        if device.type == "cpu" and native:
            return Precision(
                torch.float32,
                False,
                f"model.dtype auto: fp32; {why}, but bf16 under auto is switched off here (TUNELAB_CPU_BF16_AUTO=0): "
                "model.dtype: bfloat16 tries it",
            )
        return Precision(torch.float32, False, f"model.dtype auto: fp32 ({why or device.type})")
    if setting == "bfloat16":
        note = "" if native else f"; slow: {why}" if device.type == "cpu" else f"; {why}" if why else ""
        return Precision(torch.bfloat16, mixed, f"model.dtype bfloat16{note}")
    if setting == "float16":
        return Precision(torch.float16, device.type == "cuda", "model.dtype float16")
    return Precision(torch.float32, False, "model.dtype float32")


HEAD_CHUNK = 8192  # vocabulary rows of a 16-bit head upcast at a time: a bounded temporary at any vocabulary size


def fp32_head(head, hidden: torch.Tensor) -> torch.Tensor:
    """`head(hidden)` with fp32 logits where the head is a plain linear layer in bf16 / fp16, for scoring: its
    logits rounded to 16 bits (8 significant bits in bf16: logits near 16 are 0.06 apart at best) would tie the
    class words' scores of many rows (a bf16-scored grid cell of the demo had 71 of 400 dev rows at an exact tie,
    then decided by class order), and put an error of that size into each token's cross-entropy. The head runs on
    the scored positions only, so its fp32 product costs little beside the backbone."""
    import torch
    import torch.nn.functional as F

    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or weight.dtype not in (torch.bfloat16, torch.float16):
        return head(hidden)
    h = hidden.float()
    logits = torch.cat([F.linear(h, weight[i : i + HEAD_CHUNK].float()) for i in range(0, len(weight), HEAD_CHUNK)], 1)
    return logits if head.bias is None else logits + head.bias.float()


def task_heads_in_fp32(model, names: tuple[str, ...]) -> int:
    """A 16-bit model's task heads (`names`: a classifier, a score head) in fp32 on their 16-bit inputs, for
    scoring: the same reason as `fp32_head` (an encoder's two class logits in bf16 tie exactly, or swap order).
    Returns how many heads were cast."""
    import torch

    def upcast(module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    n = 0
    for name in names:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module) and any(
            p.dtype in (torch.bfloat16, torch.float16) for p in head.parameters()
        ):
            head.float().register_forward_pre_hook(upcast)
            n += 1
    return n
