"""The CPU speed code, all of it, behind one switch: `training.accelerate: auto | off` (docs/performance.md).

The training loop (tunelab/training/loop.py) is plain PyTorch + PEFT. With `auto` these pieces plug into it,
each at one visible line:

    speed = accel.start(tcfg, device)                 # allocator settings (memory.py)
    loading_into(... or speed.load_plan(cfg, multi))  # lora: frozen linears read straight into compact form
    speed.prepare(model, cfg, total, dist.multi, autocast)  # after the method: the pieces that change the model
    if precision.autocast and not speed.autocast: ...  # bf16 passes that need no autocast (below)
    with speed.collating(dtype): stage.collate(...)   # bf16 on a CPU: widths rounded up (memory.py)
    with autocast(), speed.forward(): ...             # norm outputs rebuilt in the backward pass (norm.py)
    if speed.shares > 1: accel.sharded_step(...)      # a micro-batch as shares in threads (threads.py)
    speed.step_done()                                 # after each optimizer step: tbbmalloc's caches handed back
    speed.release(model, expand=...)                  # threads and buffers freed, compact weights made dense

and `tunelab train` restarts itself on tbbmalloc before any of it (memory.py, from cli.py).

| piece | module | what it does | it stays off when |
|---|---|---|---|
| bf16 passes | (the pieces above) | under bf16 mixed precision on a CPU, the passes run without autocast: fast LoRA (over 4-bit bases too, qlora; or PEFT's soft prompt / prefix, cast to bf16 as they enter), the norm and the fused head in bf16 by themselves, fp32 master weights | not a CPU, a weight trains elsewhere (full), a frozen weight not in bf16, accelerate: off |
| fast LoRA | fast_lora.py | a LoRA Linear as one autograd function (folded matmul in fp32; LoRA dropout with its mask drawn again in the backward, on a CPU by a compiled loop: masks.py), a SwiGLU MLP as one; in bf16 passes too; over a 4-bit base (qlora) the same, its weight dequantized where used | a LoRA variant other than rsLoRA and DoRA, several active adapters, a base neither Linear nor 4-bit, bf16 autocast |
| SwiGLU MLP | swiglu.py | a gated MLP (SiLU, or Gemma's tanh GELU) of bias-free Linear layers (weights that train or frozen, outside fast LoRA) as one autograd function keeping x, gate(x), up(x): half its activations | a bias, another activation, an fp32 master weight beside a bf16 input, a hook on one of its layers |
| bf16 saved activations | swiglu.py, norm.py, fast_lora.py | in an fp32 pass, the SwiGLU functions keep gate(x) and up(x) in bf16 and the fused norms their input (`training.saved_activations`; auto: beside bf16 optimizer state, or where memory would need gradient checkpointing), widened where the backward reads them; the forward unchanged | fp32 optimizer state (auto), a bf16 pass, accelerate: off |
| fused RMSNorm | norm.py | Llama-style RMSNorm (and Gemma's `1 + w`) as one autograd function; its outputs rebuilt in the backward (under autocast too when the weight is bf16); in bf16 on a CPU its rows as compiled loops (one pass forward, one backward) | the norm is another formula, an fp32 weight beside a bf16 input |
| packed attention | attention.py | one causal attention call per packed example (on bf16 inputs its backward as bf16 products and a compiled pass from 128 tokens on, attention_backward.py; widened to fp32 below: faster there on a CPU); unpacked right-padded rows (prompt tuning's after their soft prompt; prefix tuning's each after the one prefix of keys; a reward model's, scored at each row's last token) laid end to end by the loss, no compute on padding | attention not SDPA; prefix tuning: a sliding window, a prefix not in a DynamicCache |
| fused head loss | head.py | LM head + cross-entropy with the gradient made in the forward, no logits kept (under a CPU's bf16 autocast too) | a head with a bias, autocast off a CPU |
| compact weights | compact.py | frozen fp32 weights kept in the exact 8-bit blocks (or bf16) they came from, LoRA's linears so from the load on (`load_plan`); a soft prompt's (prompt / prefix tuning) frozen body too, its MLPs then on fast LoRA's SwiGLU function | compact_frozen: false, several processes, no exact form, bf16 weights |
| thread shares | threads.py | a micro-batch's rows as shares at once, a thread each; one that finishes first gives its threads to the rest | not a CPU, several processes, dropout outside fast LoRA, LoRA dropout with gradient checkpointing, most parameters train, a reference pass on the trained model in a stage without `ahead`, bf16 autocast, pass_threads: 1 |
| shape buckets | memory.py (`shape_bucket`) | in bf16 on a CPU, batch widths, packed examples' attention and the head's label count rounded up to a multiple of 32: oneDNN keeps a kernel per shape | fp32 (MKL keeps none), not a CPU |
| bf16 AdamW step | sr_adamw.py | bf16 weights (`training.master_weights`), or fp32 weights with bf16 gradients and moments (`training.optimizer_state`): AdamW with stochastic rounding as one C loop, compiled at first use (`cc`), gradient clipping's factor inside it | no C compiler or a failed build (the log's `bf16 AdamW step:` line says), not a CPU |
| allocator | memory.py | tbbmalloc preloaded (`tunelab train`), its cached blocks handed back after each step (and three times in each backward pass where most weights train); glibc's heap thresholds | allocator: system, release_memory |

bf16 passes: under `model.dtype: bfloat16` (or `auto` on a CPU with native bf16) the model loads in bf16 and the
loop would run its passes under `torch.autocast`, where fast LoRA and the fused head step aside and thread shares
cannot run (autocast's state is per thread). When every weight that trains is a fast LoRA layer's A or B (fp32
master weights) and every frozen weight is bf16, nothing in a pass needs autocast: fast LoRA computes in bf16
with A and B cast for its products and dA, dB returned in fp32 (QLoRA: over its 4-bit weights dequantized to bf16 where
used; prompt and prefix tuning: PEFT casts the virtual
tokens' embeddings or keys and values to bf16 as they enter; a task head that trains whole: its input cast up to
its fp32 weight), the norm and the head's log-sum-exp compute in
fp32 inside, and every other layer is a bf16 module on a bf16 input. `prepare` then sets `autocast` False and
the loop drops it (`Speed.autocast`).

`tunelab train` logs one line per piece that is not on: why, and the setting that would turn it on
(`Speed.describe`). Every piece gives the same training as the plain path to rounding (most bit for bit; tests/test_accel.py
compares the losses of `auto` and `off` step by step). Layering: accel imports tunelab.config, data and
models; methods, stages and training may import accel; models never does. Where the plain loss
(models/loss.py) takes a piece (packed attention, fused head), accel sets an attribute on the model
that the loss reads, so the dependency points one way.
"""

# The package itself imports nothing: `tunelab train` and `tunelab compare` read the allocator settings
# (memory.py) in a process that restarts on tbbmalloc before it imports torch; the switch (switch.py)
# and every piece load when first used.
_WHERE = {"MASKS": "switch", "Speed": "switch", "check": "switch", "start": "switch", "sharded_step": "threads"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"tunelab.accel.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
