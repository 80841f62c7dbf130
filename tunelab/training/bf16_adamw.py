"""AdamW over bf16 weights with stochastic rounding: full fine-tuning at 8 bytes a weight instead of 16.

Mixed precision keeps fp32 master weights, gradients and two moments: 16 bytes a trainable weight (2.15 GB for a
135M model, 27 GB for a 1.7B one, past a 24 GB box before any activation). Training the bf16 weights themselves
(bf16 gradients and moments too, as TRL does on a model loaded in bf16 and torchtune's bf16 recipes do) halves
that, but rounds each update to the nearest bf16: with 8 bits of mantissa a weight of 0.05 moves in steps of
~2e-4, and AdamW's updates (about the learning rate, 2e-5) round to no change at all. Stochastic rounding
(Gupta et al. 2015; Zamirai et al. 2020, "Revisiting BFloat16 Training") rounds x up with probability equal to
its distance from the bf16 value below, so every update lands in expectation: the weight's expected value follows
the fp32 trajectory.

How: each tensor a chunk at a time (a few hundred kB, in cache), widened to fp32, stepped by PyTorch's fused AdamW
kernel (the same update as `torch.optim.AdamW(fused=True)`), then rounded back: a random 16-bit integer added to
the fp32 bits below bf16's and those bits cleared. The weights and both moments are rounded so; moments rounded to
nearest would freeze the second moment (beta2 0.999 moves it by 0.1% a step, under half of bf16's step). Written
here because no maintained library does it fast on a CPU: torchao's `_AdamW(bf16_stochastic_round=True)`
compiles its step with torch.compile (a C++ compiler at run time, seconds per shape) and then ran 9x slower than
the fused kernel here; this form runs ~3x its time (docs/performance.md, "bf16 weights"). With `compiled` (what
`training.accelerate: auto` sets) a CPU's bf16 tensors take the same update as one compiled loop instead
(tunelab/accel/sr_adamw.py), 3.2x faster; where it cannot be built these PyTorch ops run.

The gradients are bf16 too, so `training.grad_accum` > 1 adds each pass's into a bf16 `.grad`, rounding each
sum. Kept: over 16 passes of SmolLM2-135M that rounding moved the sum 0.4% from the fp32 sum of the same passes,
while each bf16 pass's gradient is already ~6% from fp32's (`bench/bf16_accumulation.py`); an fp32 accumulator
would cost 4 bytes a weight, half of what this mode saves.

`bf16_state` (training.optimizer_state: bf16): fp32 weights keep fp32 but their gradients and both moments are
stored in bf16, 6 bytes a weight beside the weight's 4 instead of 12: where the weights must stay fp32 because the
passes are fp32 (a CPU without native bf16, where a bf16 weight would need widening for every product). Each fp32
gradient autograd makes is added into the weight's bf16 gradient as soon as it is accumulated
(`register_post_accumulate_grad_hook`) and freed, so at most one weight's fp32 gradient exists at a time; the step
widens gradient and moments, updates the weight in fp32 exactly as the fused kernel does, and rounds the moments
back stochastically. The gradient itself is rounded to nearest, as a bf16 pass's own gradient is.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 17  # elements widened at a time: four fp32 chunks stay within a core's L2 (2 MB)
NOISE = 4096  # the noise table's slack: each chunk reads it from its own offset


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose bf16 parameters, first and second moments are stored in bf16 and
    updated with stochastic rounding; fp32 parameters take the plain fused step. `seed` fixes the rounding noise,
    so a resumed run rounds as the uninterrupted one would. `compiled`: a CPU's bf16 tensors take the compiled step
    (accel/sr_adamw.py) where it builds; `how` says which step runs. `bf16_state`: fp32 parameters keep their
    gradients and moments in bf16 (module doc); `remove_hooks()` ends the gradients' collection."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed: int = 0,
                 compiled: bool = False, bf16_state: bool = False):  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.stepper = None
        self.grad_scale = 1.0  # the next step's gradient factor (clip_grad_norm_), applied inside the compiled step
        self.how = "PyTorch ops, a chunk at a time (training.accelerate: off)"
        self.bf16_state = bf16_state
        self._grads16: dict = {}  # an fp32 parameter (bf16_state) -> its gradient so far, in bf16
        self._hooks: dict = {}  # parameter -> its gradient hook (bf16_state)
        self._collecting = bf16_state  # until remove_hooks
        if compiled:
            from tunelab.accel import sr_adamw

            devices = {p.device.type for group in self.param_groups for p in group["params"]}
            self.stepper = sr_adamw.stepper() if devices == {"cpu"} else None
            self.how = (
                f"one compiled loop, {self.stepper.threads} thread(s) (tunelab/accel/sr_adamw.py)"
                if self.stepper is not None
                else "PyTorch ops, a chunk at a time, ~3x slower: "
                + (sr_adamw.why_not() if devices == {"cpu"} else "the compiled step is for the CPU")
            )
        self._buffers: dict = {}  # device -> fp32 chunk buffer
        self._noise: dict = {}  # device -> (step, rounding noise)
        self._hook_trainable()

    def _hook_trainable(self) -> None:
        """Collect the gradients of the fp32 parameters that train now (bf16_state). A frozen one (gradual unfreezing)
        takes no hook until it thaws; until its hook exists its gradient waits in .grad and is folded in at the step."""
        if not self._collecting:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if self._small(p) and p.requires_grad and p not in self._hooks:
                    self._hooks[p] = p.register_post_accumulate_grad_hook(self._take_grad)

    def _scratch_on(self, device: torch.device, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rounding noise of `step` (uniform in [0, 2^16): the fp32 bits below bf16's mantissa) and a buffer.
        Drawn again each step: a table kept across steps would give every step nearly the same values, and
        weights with the same fraction below bf16's step would round alike step after step (a bias of ~1/sqrt
        of the table's size, measured 5% on 20,000 equal weights)."""
        if device not in self._buffers:
            self._buffers[device] = torch.empty(4 * CHUNK, device=device)
        if self._noise.get(device, (None,))[0] != step:
            g = torch.Generator().manual_seed(hash((self.seed, step)) & (2**63 - 1))
            noise = torch.randint(0, 1 << 16, (3 * CHUNK + NOISE,), dtype=torch.int32, generator=g)
            self._noise[device] = (step, noise.to(device))
        return self._noise[device][1], self._buffers[device]

    def _small(self, p) -> bool:
        """Whether `p` keeps its gradient and moments in bf16 beside an fp32 weight (bf16_state)."""
        return self.bf16_state and p.dtype == torch.float32

    @torch.no_grad()
    def _take_grad(self, p) -> None:
        """Autograd's fp32 gradient of `p` added into its bf16 one, and freed."""
        g = self._grads16.get(p)
        if g is None:
            self._grads16[p] = p.grad.to(torch.bfloat16)
        else:
            g.add_(p.grad)
        p.grad = None

    def _gradient(self, p) -> torch.Tensor | None:
        """`p`'s gradient as the step reads it; a `.grad` set outside autograd's accumulation (thread shares add
        theirs so) is folded into the bf16 one first."""
        if not self._small(p):
            return p.grad
        if p.grad is not None:
            self._take_grad(p)
        return self._grads16.get(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._grads16.clear()

    def remove_hooks(self) -> None:
        """Stop collecting the gradients (the run is over: the model may train again under another optimizer)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        self._collecting = False
        self._grads16.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over this optimizer's gradients (the same norm and factor); with the
        compiled step the factor is applied inside the next step, not as a pass of its own over every gradient
        (~40 ms a step for SmolLM2-135M). bf16_state: each tensor's norm summed in fp32, the factor applied in the
        step (scaling a bf16 gradient in place would round it again)."""
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [g for p in params if (g := self._gradient(p)) is not None]
        if self.bf16_state:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
            self.grad_scale = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            return norm
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.stepper is None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        else:  # torch's factor
            self.grad_scale = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            b1, b2 = group["betas"]
            kw = dict(lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"], eps=group["eps"],
                      amsgrad=False, maximize=False)  # fmt: skip
            for pi, p in enumerate(group["params"]):
                small = self._small(p)
                grad = self._gradient(p)
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    kind = torch.bfloat16 if small else None
                    state["exp_avg"] = torch.zeros_like(p, dtype=kind, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=kind, memory_format=torch.contiguous_format)
                state["step"] += 1
                if small:  # torch's load_state_dict casts the moments to the weight's dtype: back to bf16, exactly
                    for k in ("exp_avg", "exp_avg_sq"):
                        if state[k].dtype != torch.bfloat16:
                            state[k] = state[k].to(torch.bfloat16)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if small:
                    if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                        raise ValueError("BF16AdamW needs contiguous parameters")
                    if self.stepper is not None:
                        step = int(state["step"])
                        self.stepper.submit(p, grad.contiguous(), m, v, lr=kw["lr"], b1=b1, b2=b2, eps=kw["eps"],
                                            wd=kw["weight_decay"], step=step, key=hash((self.seed, step, gi, pi)),
                                            scale=self.grad_scale)  # fmt: skip
                    else:
                        self._step_fp32_weight(p, grad, m, v, state["step"], kw, where=(gi, pi))
                    continue
                if p.dtype != torch.bfloat16:  # fp32 (a norm kept in fp32): the fused step, nothing to round
                    if self.grad_scale != 1.0:  # clipped for the compiled step (clip_grad_norm_)
                        p.grad.mul_(self.grad_scale)
                    torch._fused_adamw_([p], [p.grad], [m], [v], [], [state["step"].to(p.device)], **kw)
                    continue
                if self.stepper is not None and m.dtype == v.dtype == torch.bfloat16:  # the C loop reads bf16 moments
                    g = p.grad.to(p.dtype).contiguous()
                    if not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
                        raise ValueError("BF16AdamW needs contiguous parameters")
                    step = int(state["step"])
                    self.stepper.submit(p, g, m, v, lr=kw["lr"], b1=b1, b2=b2, eps=kw["eps"], wd=kw["weight_decay"],
                                        step=step, key=hash((self.seed, step, gi, pi)), scale=self.grad_scale)  # fmt: skip
                else:
                    if self.grad_scale != 1.0:  # clipped for the compiled step, which this tensor does not take
                        p.grad.mul_(self.grad_scale)
                    self._step_bf16(p, m, v, state["step"], kw, where=(gi, pi))
        if self.stepper is not None:
            self.stepper.wait()
        self.grad_scale = 1.0
        self._hook_trainable()
        return loss

    def _step_fp32_weight(self, p, g, m, v, step, kw, where) -> None:
        """One step of fp32 `p` from bf16 gradient `g` (times grad_scale) and bf16 moments `m`, `v` (bf16_state),
        a chunk at a time: the weight updated in place by the fused kernel, the moments rounded stochastically."""
        key = (int(step), *where)
        noise, buf = self._scratch_on(p.device, key[0])
        step = step.to(p.device)
        flat = [t.reshape(-1) for t in (p, g.contiguous(), m, v)]
        n_all = flat[0].numel()
        for i in range(0, n_all, CHUNK):
            n = min(CHUNK, n_all - i)
            M, V, G = buf[CHUNK : CHUNK + n], buf[2 * CHUNK : 2 * CHUNK + n], buf[3 * CHUNK : 3 * CHUNK + n]
            for dst, src in zip((G, M, V), flat[1:]):
                dst.copy_(src[i : i + n])
            if self.grad_scale != 1.0:  # clipping's factor (clip_grad_norm_)
                G.mul_(self.grad_scale)
            torch._fused_adamw_([flat[0][i : i + n]], [G], [M], [V], [], [step], **kw)
            off = hash((self.seed, *key, i)) % NOISE  # as _step_bf16: a resumed run rounds alike
            for j, x in enumerate((M, V)):
                x.view(torch.int32).add_(noise[off + j * CHUNK : off + j * CHUNK + n]).bitwise_and_(-65536)
            flat[2][i : i + n].copy_(M)
            flat[3][i : i + n].copy_(V)

    def _step_bf16(self, p, m, v, step, kw, where) -> None:
        """One step of bf16 `p` (group and index `where`) and its moments `m`, `v`, a chunk at a time."""
        key = (int(step), *where)
        noise, buf = self._scratch_on(p.device, key[0])
        step = step.to(p.device)
        g = p.grad.to(p.dtype)
        if not p.is_contiguous():  # reshape(-1) must be a view of the weight for the writes below to land
            raise ValueError("BF16AdamW needs contiguous parameters")
        flat = [t.reshape(-1) for t in (p, g, m, v)]
        n_all = flat[0].numel()
        for i in range(0, n_all, CHUNK):
            n = min(CHUNK, n_all - i)
            P, M, V, G = buf[:n], buf[CHUNK : CHUNK + n], buf[2 * CHUNK : 2 * CHUNK + n], buf[3 * CHUNK : 3 * CHUNK + n]
            for dst, src in zip((P, G, M, V), flat):
                dst.copy_(src[i : i + n])
            torch._fused_adamw_([P], [G], [M], [V], [], [step], **kw)
            # the noise read from an offset fixed by (seed, step, group, parameter, chunk): a resumed run rounds alike
            off = hash((self.seed, *key, i)) % NOISE
            if n == CHUNK:  # P, M and V lie side by side: one pass rounds all three
                buf[: 3 * CHUNK].view(torch.int32).add_(noise[off : off + 3 * CHUNK]).bitwise_and_(-65536)
            else:
                for x in (P, M, V):
                    x.view(torch.int32).add_(noise[off : off + n]).bitwise_and_(-65536)
            for dst, src in zip((flat[0], flat[2], flat[3]), (P, M, V)):
                dst[i : i + n].copy_(src)  # exact: the bits bf16 has no room for are zero
