"""The switch itself (`training.accelerate`): `start` reads the settings, `Speed` installs the pieces and says which
are off and why. What each piece does and where it lives: the package's docstring (tunelab/accel/__init__.py)."""

from __future__ import annotations

import contextlib

import torch

from tunelab.accel import (
    attention,
    attention_backward,
    compact,
    fast_lora,
    head,
    masks,
    memory,
    norm,
    swiglu,
    threads,
    token_rows,
)
from tunelab.data.collate import widths_rounded_to
from tunelab.methods import reference
from tunelab.models.loading import TASK_HEADS, compute_dtype, soft_prompt, unwrap
from tunelab.models.loss import backbone_and_head, virtual_token_split

# knobs of single pieces that `accelerate: off` overrides: named in the log line when a config sets them
_PIECE_SETTINGS = ("pass_threads", "compact_frozen", "allocator", "release_memory")


# what draws fast LoRA's dropout masks on a CPU (fast_lora.keep_mask): other bits for the same seed, so a resumed run
# says when its checkpoint's run drew them the other way (training/loop.py)
MASKS = {True: "a compiled loop (accel/masks.py)", False: "torch's generator"}


class Speed:
    """The speed pieces of one training run: what `start` and `prepare` turned on, and what the loop asks of
    them (`forward`, `shares`, `release`). With `training.accelerate: off` every call is a no-op."""

    def __init__(self, tcfg, device):
        self.tcfg, self.device = tcfg, device
        self.on = tcfg.accelerate == "auto"
        self.shares = 1  # shares per micro-batch that run at once, a thread each (threads.py)
        self.compacted = 0  # bytes saved by compact frozen weights (compact.py)
        self.loaded_compact: list[int] = []  # element counts of the weights made compact while loading
        self.pieces: list[str] = []  # on, for the log line
        self.skipped: list[str] = []  # not on, and why
        self.autocast = False  # whether the passes need bf16 autocast (set by `prepare`)
        self.kept = None  # the dtype narrower saved activations are kept in (training.saved_activations), if any
        self.clean_cache = None  # tbbmalloc's cached blocks handed back after each step (memory.py; `start`)
        self.masks: str | None = None  # what draws fast LoRA's dropout masks (`MASKS`; None: no dropout drawn there)

    def _compacts(self, cfg, multi: bool) -> bool:
        """Whether frozen weights are made compact: fp32 ones (compact forms are fp32's), in one process, unless
        compact_frozen: false."""
        fp32 = compute_dtype(cfg.model.dtype, self.device) == torch.float32
        return bool(self.on and self.tcfg.compact_frozen and not multi and fp32)

    def load_plan(self, cfg, multi: bool):
        """The plan the base model loads with (models/streaming.py) when LoRA's frozen linears will be kept
        compact anyway: each made compact as it is read, so the whole model never exists in fp32 (compact.py,
        `load_plan`); None: the ordinary load, compacted after `prepare`."""
        # a base the method rewrites (PiSSA) stays dense; `prepare` compacts what still decodes
        if cfg.method.name != "lora" or cfg.method.rewrites_base or not self._compacts(cfg, multi):
            return None
        tcfg = self.tcfg
        return compact.load_plan(None if tcfg.compact_frozen is True else tcfg.compact_frozen, self.loaded_compact)

    def match(self, ref, cfg, multi: bool) -> None:
        """`ref`, a frozen copy of the model taken before `prepare` (dpo / kto's reference: methods/reference.py),
        computes as the model does: the same fused RMSNorm, SwiGLU function and attention over rows laid end to end.
        The two paths agree to rounding in fp32, not in bf16: a full fine-tuning KTO run in bf16 weights read a loss
        of 0.5007 before training where policy = reference gives exactly 0.5 (0.5000 with this). Its weights are
        kept compact where compact frozen weights are on (compact.py `frozen_model`: the same values, decoded)."""
        if not self.on or ref is None:
            return
        swiglu.install(ref)
        norm.install(ref)
        attention.install(ref)
        if self._compacts(cfg, multi):
            layers, saved = compact.frozen_model(
                ref, None if self.tcfg.compact_frozen is True else self.tcfg.compact_frozen
            )
            if saved:
                self.pieces.append(
                    f"the frozen reference copy's {layers} weights kept compact: {saved / 2**20:,.0f} MB less"
                )

    @property
    def compact_parameters(self) -> int:
        """Frozen weights made compact while loading: no parameters any more, still the model's."""
        return sum(self.loaded_compact)

    def prepare(
        self, model, cfg, total: int, multi: bool, autocast: bool = False, keep: torch.dtype | None = None,
        ahead: bool = False,
    ) -> None:  # fmt: skip
        """Once the method is applied and the parameters counted (compacted weights are no longer parameters;
        `total` is the count before): install every piece the config and the model allow. `autocast`: the
        loop would run its passes under bf16 autocast (CUDA, or model.dtype: bfloat16), where fast LoRA and the
        fused head step aside; `self.autocast` says whether they still need it (bf16 passes: module doc). `keep`:
        the dtype the SwiGLU MLPs and norms keep their saved activations in, where narrower than a pass's
        (training.saved_activations). `ahead`: the stage computes what its shares need from pi_ref before they run
        (Stage.ahead), so a reference on the trained model itself keeps them on."""
        self.autocast = autocast
        if not self.on:
            return
        tcfg = self.tcfg
        skip = self.skipped.append
        routed = fast_lora.routes(model)  # PEFT LoRA layers over dense or 4-bit (qlora) bases
        n = fast_lora.enable(model) if routed else 0
        if token_rows.install(model):
            self.pieces.append(
                "new tokens' rows put in beside the frozen token table (no copy of it, no gradient of it)"
            )
        if autocast and not (why := _needs_autocast(model, self.device)):
            self.autocast = False
            for trained in _trained_heads(model):  # fp32 master weights on the bf16 backbone's output
                trained.register_forward_pre_hook(_input_in_weight_dtype)
            self.pieces.append("bf16 passes without autocast (fp32 master weights)")
        elif autocast:
            skip(f"bf16 passes without autocast: {why}; the passes run under bf16 autocast")
        if routed:
            if why := fast_lora.why_not(model):
                skip(f"fast LoRA: {why}; PEFT's own forward runs (a plain LoRA adapter on Linear layers takes it)")
            elif self.autocast:
                skip("fast LoRA: bf16 autocast; PEFT's own forward runs (model.dtype: float32 takes it)")
            else:
                over = " over 4-bit bases" if getattr(unwrap(model), "is_loaded_in_4bit", False) else ""
                dora = fast_lora.dora_with_dropout(model)
                dropped = self.device.type == "cpu" and any(
                    getattr(d, "p", 0) > 0 for d in fast_lora.covered_dropouts(model)
                )
                compiled_masks = dropped and masks.load() is not None
                self.masks = MASKS[compiled_masks] if dropped else None
                self.pieces.append(f"fast LoRA ({n} layers{over}" + (
                    ", its dropout masks drawn by a compiled loop" if compiled_masks else "") + ")" + (
                    f"; DoRA with LoRA dropout on {dora} of them: W multiplies the input and the dropped input (PEFT's "
                    "DoRA), two big products a layer where dropout 0 has one (method.dropout: 0 is ~1.6x faster)"
                    if dora else ""))  # fmt: skip
                if dropped and not compiled_masks:
                    skip(f"compiled LoRA dropout masks: {masks.why_not()}; torch's generator draws them (~10x "
                         "slower a mask; a C compiler, cc or gcc, turns it on)")  # fmt: skip
        if not routed and self._compacts(cfg, multi) and soft_prompt(model):
            fast_lora.enable(model)  # its SwiGLU function decodes the compact weights (soft_prompt_body) where used
            self.pieces.append("SwiGLU MLPs as one function over the compact frozen weights (fast LoRA's)")
        if n := swiglu.install(model):  # the MLPs fast LoRA did not take: plain Linear layers (full, freeze ...)
            self.pieces.append(f"SwiGLU MLPs as one function ({n}): gate(x) and up(x) kept, their product made again")
        if acts := swiglu.other_activations(model):
            skip(f"gated MLPs as one function: the MLPs' activation ({', '.join(acts)}) is neither SiLU nor GELU's "
                 "tanh form; their own forward runs (no setting: a property of the model)")  # fmt: skip
        # passes in bf16 on a CPU, where RMSNorm's rows and the attention backward run as compiled loops
        bf16_cpu = self.device.type == "cpu" and (
            autocast or compute_dtype(cfg.model.dtype, self.device) != torch.float32
        )
        if n := norm.install(model):
            self.pieces.append(f"fused RMSNorm ({n})")
            if bf16_cpu:
                if norm.compiled_rows() is not None:
                    self.pieces[-1] += ", its bf16 rows compiled"
                else:
                    skip(f"RMSNorm's compiled rows: {norm.compiled.why_not('rms_norm')}; torch's operations run (~3x "
                         "slower a norm; a C compiler, cc or gcc, turns it on)")  # fmt: skip
        elif norms := sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Norm")}):
            skip(
                f"fused RMSNorm: the model's norms ({', '.join(norms)}) are not Llama- or Gemma-style RMSNorm; their own "
                "forward runs (no setting: a property of the model)"
            )
        if keep is not None and (autocast or compute_dtype(cfg.model.dtype, self.device) != torch.float32):
            skip("narrower saved activations (training.saved_activations): the passes are bf16 already")
        elif keep is not None:
            mlps, norms = swiglu.keep_saved(model, keep)
            what = [f"{mlps} MLPs' gate and up outputs" if mlps else "", f"{norms} norms' inputs" if norms else ""]
            if mlps or norms:
                self.kept = str(keep).removeprefix("torch.")
                self.pieces.append(f"saved activations in {self.kept}: "
                                   f"{' and '.join(w for w in what if w)} (training.saved_activations)")  # fmt: skip
            else:
                skip("narrower saved activations: no MLP or norm on accel's functions keeps them here")
        pair = backbone_and_head(model) or virtual_token_split(model)
        said = cfg.data.packing or pair is not None  # packed rows, or an LM's rows laid end to end (not an encoder's)
        if attention.install(model) and said:
            self.pieces.append(
                "per-example attention over packed rows"
                if cfg.data.packing
                else "right-padded rows laid end to end, one attention call each (no compute on padding)"
            )
            if bf16_cpu:
                if attention_backward.load() is not None:
                    self.pieces[-1] += (f"; bf16 examples of {attention_backward.FROM}+ tokens: the backward as bf16 "
                                        "products and a compiled pass")  # fmt: skip
                else:
                    skip(f"attention backward as bf16 products: {attention_backward.why_not()}; the flash kernel's "
                         "backward runs (~1.5x slower; a C compiler, cc or gcc, turns it on)")  # fmt: skip
        elif said and not attention.active(model):
            skip(
                "packed attention: the model's attention is not SDPA; its masked call runs (no setting: "
                "a model transformers runs with SDPA takes it)"
            )
        if pair is not None:
            head.install(model)
            if getattr(pair[1], "bias", None) is not None:
                skip("fused LM head + cross-entropy: the head has a bias; the plain chunked loss runs (no setting)")
            elif token_rows.trains_rows(pair[1]) and token_rows.head_rows(pair[1]) is None:
                skip(
                    "fused LM head + cross-entropy: the new tokens' rows (model.new_special_tokens) train in a head "
                    "it cannot take (not a bias-free linear map, or several adapters); PEFT's layer and the plain "
                    "chunked loss run (no setting)"
                )
            elif self.autocast and self.device.type != "cpu":
                skip(
                    f"fused LM head + cross-entropy: {self.device.type} autocast; the plain chunked loss runs "
                    "(model.dtype: float32 takes it)"
                )
            else:
                self.pieces.append(
                    "fused LM head + cross-entropy"
                    + (" (its products in bf16 under autocast)" if self.autocast else "")
                )
        if tcfg.compact_frozen and not multi:
            only = None if tcfg.compact_frozen is True else tcfg.compact_frozen
            layers, self.compacted = compact.compact_frozen_linears(model, only)
            if self.compacted:
                at_load = f" ({len(self.loaded_compact)} since loading)" if self.loaded_compact else ""
                self.pieces.append(
                    f"{layers} frozen weights kept compact{at_load}, decoded exactly where used: "
                    f"{self.compacted / 2**20:,.0f} MB less"
                )
        elif tcfg.compact_frozen:
            skip("compact frozen weights: several processes (one process takes it)")
        frozen_half = compute_dtype(cfg.model.dtype, self.device) != torch.float32
        if tcfg.compact_frozen and not (multi or self.compacted) and frozen_half:
            skip(
                "compact frozen weights: the frozen weights are bf16 already, and compact forms are fp32's "
                "(model.dtype: float32 takes it)"
            )
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trained > total / 2 and (hand_back := memory.tbbmalloc_hand_back()) is not None:
            if n := memory.hand_back_in_backward(model, hand_back):
                self.pieces.append(
                    f"tbbmalloc's cached blocks handed back {n} times in each backward pass (most weights train: "
                    "their gradients take the freed activations' pages)"
                )
        self.shares, why_not = threads.parts_for(tcfg, self.device, multi, model, total)
        if self.shares > 1 and self.autocast:
            # autocast's state is per thread: a share running in a worker thread would compute in fp32
            self.shares, why_not = 1, "bf16 autocast is set per thread"
        if self.shares > 1 and reference.on_the_model(model) and not ahead:
            # a reference pass switches the PEFT adapter off (or to its starting values) on the one shared model: a
            # share running beside it in another thread would see that (dpo and kto run theirs first: Stage.ahead)
            self.shares, why_not = 1, f"{cfg.stage}'s reference pass switches the adapter off on the shared model"
        if self.shares > 1:
            watched = threads.watch(model)
            self.pieces.append(
                f"each micro-batch runs as up to {self.shares} shares of its rows at once, a thread each "
                "(training.pass_threads)"
                + (f"; a share that finishes first gives its threads to the rest ({watched} blocks)" if watched else "")
            )
        elif why_not:
            skip(f"thread shares: {why_not}; each pass runs on all threads")

    def describe(self) -> str:
        """The run log's lines: which pieces are on, then one line per piece that is not, with why and the
        setting that would turn it on."""
        if not self.on:
            ignored = sorted(k for k in self.tcfg.model_fields_set if k in _PIECE_SETTINGS)
            note = f" (ignored: {', '.join(f'training.{k}' for k in ignored)})" if ignored else ""
            return f"accelerate: off: plain PyTorch + PEFT, no speed piece installed{note}"
        line = "accelerate: auto (tunelab/accel): " + ("; ".join(self.pieces) or "no piece applies")
        return "\n".join([line, *(f"accelerate: not on: {why}" for why in self.skipped)])

    def forward(self):
        """The context of a training forward pass: a norm output the backward pass needs is kept as the recipe
        that rebuilds it (norm.py)."""
        return norm.recomputed_outputs() if self.on else contextlib.nullcontext()

    def collating(self, dtype: torch.dtype):
        """The context the loop collates its batches in: with passes in bf16 (or fp16: `dtype`, the precision's) on
        a CPU every batch's width rounded up to memory.SHAPE_BUCKET: oneDNN keeps a kernel per shape it meets
        (memory.shape_bucket)."""
        if self.on and self.device.type == "cpu" and dtype != torch.float32:
            return widths_rounded_to(memory.SHAPE_BUCKET)
        return contextlib.nullcontext()

    def step_done(self) -> None:
        """After each optimizer step: the allocator's cached free blocks handed back (tbbmalloc, memory.py)."""
        if self.clean_cache is not None:
            self.clean_cache()

    def release(self, model, expand: bool) -> None:
        """When training ends: stop the share threads, drop the reused buffers and, with `expand` (task metrics
        that may generate), give compact weights their dense form back: generation would decode each weight
        at every token (sft / pretrain have none and keep the smaller peak)."""
        if not self.on:
            return
        threads.shutdown()
        head.free_buffers()
        compact.free_scratch()  # the decoded weights' and the attention products' buffers
        if self.compacted and expand:
            compact.expand_compact(model)


def _needs_autocast(model, device) -> str | None:
    """Why the passes of `model` need bf16 autocast still, or None when every layer in them runs in bf16 by
    itself (module doc: bf16 passes). Call it after `fast_lora.enable`."""
    if device.type != "cpu":
        return f"{device.type} keeps autocast (bf16 passes are built and measured on CPUs)"
    adapters = [*fast_lora.bf16_adapters(model), *_virtual_tokens(model)]
    adapters += token_rows.trained(model)
    covered = {id(t) for t in [*adapters, *(p for h in _trained_heads(model) for p in h.parameters())]}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            return f"{name} trains outside the fast LoRA layers (method.name: lora with a plain adapter takes it)"
        if not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16:
            return f"the frozen {name} is {str(p.dtype).removeprefix('torch.')}, not bf16 (no setting)"
    return None if adapters else "no LoRA layer takes fast LoRA in bf16"


def _virtual_tokens(model) -> list[torch.Tensor]:
    """The trained weights of PEFT prompt or prefix tuning: PEFT casts the soft prompt to the input embeddings' dtype
    (prompt) and the key/value prefix to the base model's (prefix) before they enter the model, so a bf16 model's
    pass stays bf16 after them and the fp32 weights get fp32 gradients through the cast."""
    kind = soft_prompt(model)
    if kind is None or (kind == "PREFIX_TUNING" and getattr(model, "base_model_torch_dtype", None) != torch.bfloat16):
        return []
    return [p for p in model.prompt_encoder.parameters() if p.requires_grad]


def _trained_heads(model) -> list[torch.nn.Linear]:
    """The task heads that train whole (reward's `score`, a classifier: PEFT's modules_to_save copy) in fp32: in a
    bf16 pass their input is cast up to their weight's dtype (`_input_in_weight_dtype`), a [tokens, hidden] cast."""
    return [m for name, m in model.named_modules() if type(m) is torch.nn.Linear and m.weight.requires_grad
            and m.weight.dtype == torch.float32 and set(name.split(".")) & set(TASK_HEADS)]  # fmt: skip


def _input_in_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def check(tcfg, device, multi: bool) -> None:
    """The refusals that need the device and the process count but no model: before the run folder and the
    load (those that need only the config are the config's: `training.pass_threads`)."""
    if tcfg.accelerate == "auto":
        threads.check_pass_threads(tcfg, device, multi)


def start(tcfg, device) -> Speed:
    """At the start of a run, before the model loads: the allocator's settings (memory.py)."""
    speed = Speed(tcfg, device)
    if speed.on:
        memory.release_freed_memory(memory.releases_memory(tcfg))
        if note := memory.allocator_note(tcfg, on_cpu=device.type == "cpu"):
            speed.pieces.append(note)
        speed.clean_cache = memory.cache_cleaner() if device.type == "cpu" else None
        if memory.releases_memory(tcfg) and memory.active_allocator() == "system":
            speed.pieces.append("freed memory returned to the OS at once (training.release_memory)")
    return speed
