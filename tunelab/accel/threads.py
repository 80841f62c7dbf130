"""The shares of a CPU micro-batch run at once, each on its own share of the cores.

Why: torch splits every op of a pass over all cores (OpenMP). The big matmuls scale, but a third
of a LoRA step on a small model is work that scales poorly or not at all: memory-bound elementwise
passes, the attention kernel on short examples, the frozen weights' decode, the Python between ops,
each op with a fork and a join. Cutting the rows into one share per core and running the shares in
threads, each op single-threaded, keeps every core busy through all of it: SmolLM2 LoRA SFT
steps 5-8% shorter on 2 cores (docs/performance.md). Each share runs its rows in passes of
rows_per_pass / shares rows, so the rows in flight, and the activation memory, stay those of a pass.

The first share accumulates its gradients into `.grad`, every other share sums its own
(`torch.autograd.grad`), and the loop adds those sums in share order (`accumulate`): the update is
the pass's to rounding and the same in every run, which accumulating into `.grad` from several
threads would not be (the order of the additions would vary). Ops release
the GIL; Python-level autograd functions take it, as in any thread.

LoRA dropout on the fast path (fast_lora.py) draws its masks from a generator of each share's own,
seeded from torch's generator once per micro-batch (in the loop's thread) plus the share's index: each
share's masks are a fixed sequence, whichever thread runs first, so the same seed gives the same run.
They are not the masks a single pass would draw (other streams of the same distribution). Any other
dropout (the model's own, attention dropout, a LoRA layer on PEFT's forward) draws from torch's one
generator in whatever order the threads reach it, and keeps the shares off; so does gradient
checkpointing with LoRA dropout, whose recomputed forward restores torch's generator, not a share's.

A share that finishes first gives its cores to those still running: the shares of a micro-batch rarely cost the
same (rows are whole: three 256-token rows and a 66-token one split 512 against 322 tokens at best), and the
cheaper share's core would wait for the rest of the step. Each running share looks between transformer blocks,
forward and backward (`watch`: a hook before each block and one on the gradient of its output), and takes
`threads // shares still running`. Prefix tuning on the bench job: the cores were ~9% idle this way
(docs/performance.md, thirtieth session). A widened share's ops split over more threads; on the host measured (an
AVX2 EPYC: there MKL's products and torch's kernels gave the same bits on one thread and on two) a run still
repeats bit for bit; where a library's kernel splits a sum by the thread count, the last bits of a run would depend
on which share finished first.

The training loop calls `sharded_step` for a step's micro-batches when `shares_for` gave more than one
share (`training.pass_threads`; never with `training.accelerate: off`); its own plain step otherwise.

Why by hand: torch's inter-op pool (`torch.jit.fork`) runs TorchScript, and DDP's one process per
core would hold a copy of the model and libraries per core; threads share both.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import torch
from torch import nn

from tunelab.accel import fast_lora, norm
from tunelab.config import ConfigError
from tunelab.data.collate import real_tokens
from tunelab.methods import reference
from tunelab.models.blocks import block_lists

T = TypeVar("T")

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_WORKERS = 0  # the pool's size
_LOCAL = threading.local()  # in a share's thread while it runs: `threads`, the torch threads it has now
_TEAM = {"running": 0, "total": 1}  # shares of the current `run` still running, and the threads they divide
_LOCK = threading.Lock()
_HOOKS: list = []  # `watch`'s hook handles


def check_pass_threads(tcfg, device: torch.device, multi: bool) -> None:
    """Refuse `training.pass_threads` > 1 where shares cannot run (not a CPU, several processes): the loop asks
    before the run folder and the model, from the device and the process count alone."""
    if tcfg.pass_threads is not None and tcfg.pass_threads > 1 and (device.type != "cpu" or multi):
        where = f"on {device.type}" if device.type != "cpu" else "with several processes"
        raise ConfigError(
            f"training.pass_threads: {tcfg.pass_threads} splits a pass over the cores of one CPU process; "
            f"{where} set it to null or 1"
        )


def parts_for(
    tcfg, device: torch.device, multi: bool, model: nn.Module, total: int | None = None
) -> tuple[int, str | None]:
    """(shares per micro-batch, why not more): `training.pass_threads`, or with null one per torch thread on a
    CPU in a single process, when nothing draws random numbers (dropout) during training and the trainable
    parameters are few (each share sums its own gradients). `total`: the model's parameter count, if some
    are no longer parameters (compacted frozen weights). Call it after `fast_lora.enable`: LoRA dropout on
    the fast path draws from each share's own generator."""
    check_pass_threads(tcfg, device, multi)
    # `auto` has been decided by now (the loop turns checkpointing on before the speed pieces): ask the model
    checkpointed = getattr(tcfg, "gradient_checkpointing", False) is True or any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
    )
    checkpointed_draws = checkpointed and shares_draw(model)
    if tcfg.pass_threads is not None and tcfg.pass_threads > 1 and checkpointed_draws:
        # the recomputed forward would draw other masks than the share's forward did: wrong gradients. With
        # gradient_checkpointing: true the config refuses this up front; here `auto` turned checkpointing on
        raise ConfigError(
            f"training.pass_threads: {tcfg.pass_threads} with LoRA dropout and gradient checkpointing: the "
            "recomputed forward would not replay a share's dropout masks; set pass_threads to null or 1, "
            "training.gradient_checkpointing to false, or method.dropout to 0"
        )
    if tcfg.pass_threads is not None:
        return tcfg.pass_threads, None
    if device.type != "cpu" or multi:
        return 1, None
    if any(getattr(m, "neftune_noise_alpha", None) for m in model.modules()):  # transformers' NEFTune hook
        return (
            1,
            "NEFTune's noise (training.neftune_alpha) draws from torch's one generator: threads would draw in a different order each run",
        )
    if draws_random_numbers(model):
        return 1, (
            "dropout outside the fast LoRA layers is active: threads would draw its random numbers in a "
            "different order each run"
        )
    if checkpointed_draws:
        return 1, (
            "LoRA dropout with gradient checkpointing: its recomputed forward would not replay a share's draws "
            "(training.gradient_checkpointing: false or method.dropout: 0 turns shares on)"
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable > 0.25 * (total or sum(p.numel() for p in model.parameters())):
        return 1, "most parameters train, and each thread would hold a gradient of its own"
    return max(1, torch.get_num_threads()), None


def draws_random_numbers(model: nn.Module) -> bool:
    """True when a training forward pass uses torch's random generator (dropout anywhere but in the LoRA
    layers whose masks the fast path draws: those come from a share's own generator)."""
    covered = {id(m) for m in fast_lora.covered_dropouts(model)}
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and id(module) not in covered:
            return True
        cfg = getattr(module, "config", None)
        if cfg is not None and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


def shares_draw(model: nn.Module) -> bool:
    """True when a training pass draws LoRA dropout masks on the fast path (then each share gets a generator)."""
    return any(getattr(m, "p", 0) > 0 for m in fast_lora.covered_dropouts(model))


# A row's compute relative to one token through the body, measured on SmolLM2-135M LoRA SFT on a CPU core
# (one token: ~5 ms, the layers' matmuls): a label position adds the head's product and its gradient
# (~0.4), an example of L tokens adds causal attention over L^2 / 2 pairs (L = 256: ~56 tokens' worth).
# Rough is enough: the estimate only has to rank rows and shares.
HEAD_COST, ATTENTION_COST = 0.4, 1 / 1200


def row_cost(example: dict) -> float:
    """The estimated compute of one training row (a packed row: its examples start where position ids
    restart at 0), in tokens; 1 for a row that is not a token sequence."""
    ids = example.get("input_ids")
    if not isinstance(ids, (list, tuple)) or not ids:
        return 1.0
    positions = example.get("position_ids")
    starts = [i for i, p in enumerate(positions) if p == 0] if isinstance(positions, (list, tuple)) else []
    bounds = (starts if starts and starts[0] == 0 else [0, *starts]) + [len(ids)]
    attention = sum((b - a) ** 2 for a, b in zip(bounds[:-1], bounds[1:])) * ATTENTION_COST
    labels = example.get("labels")
    n_labels = sum(1 for t in labels if t != -100) if isinstance(labels, (list, tuple)) else 0
    return len(ids) + HEAD_COST * n_labels + attention


def balance(rows: list, parts: int, costs: list[float]) -> list[list]:
    """`rows` as at most `parts` shares (none empty) of near-equal row counts whose summed `costs` are near
    equal: the costliest row first, each to the share with room and the least so far (ties: the first share),
    each share in `rows`' order. Equal counts keep every pass the same shape (the allocator reuses blocks).

    Why: the shares of a micro-batch all wait for the slowest one before the optimizer step, and packed rows
    differ in compute (a 256-token example labelled throughout against four short ones with prompts: ~25%).
    Deterministic, so runs repeat."""
    parts = max(1, min(parts, len(rows)))
    if parts == 1:
        return [list(rows)]
    size, extra = divmod(len(rows), parts)
    room = [size + (k < extra) for k in range(parts)]  # as many rows per share as an even split: same pass shapes
    load, members = [0.0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(rows)), key=lambda i: (-costs[i], i)):
        k = min((k for k in range(parts) if len(members[k]) < room[k]), key=lambda k: (load[k], k))
        load[k] += costs[i]
        members[k].append(i)
    return [[rows[i] for i in sorted(m)] for m in members]


def run(calls: list[Callable[[], T]]) -> list[T]:
    """Each call's result, in order. One call runs here; several run at once in worker threads, each with
    torch's threads divided among them."""
    if len(calls) == 1:
        return [calls[0]()]
    global _POOL, _WORKERS
    if _POOL is None or _WORKERS < len(calls):
        _stop_pool()
        _POOL = concurrent.futures.ThreadPoolExecutor(len(calls), thread_name_prefix="tunelab-part")
        _WORKERS = len(calls)
    total = torch.get_num_threads()
    share = max(1, total // len(calls))
    _TEAM.update(running=len(calls), total=total)
    futures = [_POOL.submit(_with_threads, share, call) for call in calls]
    try:
        concurrent.futures.wait(futures)
    finally:  # an interrupt lands here: let every part finish writing its gradients before it propagates
        concurrent.futures.wait(futures)
        torch.set_num_threads(total)
    return [f.result() for f in futures]


def add(total: list | None, grads) -> list:
    """total + grads, entry by entry, in place where total has one (None: no gradient)."""
    if total is None:
        return list(grads)
    return [b if a is None else a if b is None else a.add_(b) for a, b in zip(total, grads)]


def accumulate(params: list, shares: list[list]) -> None:
    """Add each share's gradients, in share order, into the parameters' .grad."""
    total = None
    for grads in shares:
        total = add(total, grads)
    for p, g in zip(params, total or []):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


def _with_threads(n: int, call: Callable[[], T]) -> T:
    torch.set_num_threads(n)
    _LOCAL.threads = n
    try:
        with reference.beside_other_passes():  # pi_ref with the adapter off would show in the other threads' passes
            return call()
    finally:
        _LOCAL.threads = None
        with _LOCK:
            _TEAM["running"] -= 1


def widen(*_) -> None:
    """In a share's thread: take the threads of the shares that have finished (torch's thread count is per
    thread). Elsewhere, or with nothing to take, nothing."""
    n = getattr(_LOCAL, "threads", None)
    if n is not None and (want := _TEAM["total"] // max(1, _TEAM["running"])) > n:
        _LOCAL.threads = want
        torch.set_num_threads(want)


def _widen_in_backward(module, args, output) -> None:
    """After a block's forward pass: `widen` again when its backward pass starts (the gradient of its output)."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    if getattr(_LOCAL, "threads", None) is not None and isinstance(out, torch.Tensor) and out.requires_grad:
        out.register_hook(widen)


def watch(model: nn.Module) -> int:
    """Hooks on each transformer block that let a running share `widen` between blocks: before the block's forward
    and before its backward. The number of blocks watched (none where the model's blocks are not found: a share
    then keeps its threads)."""
    unwatch()
    for _, blocks in block_lists(model):
        for block in blocks:
            _HOOKS.append(block.register_forward_pre_hook(widen))
            _HOOKS.append(block.register_forward_hook(_widen_in_backward))
    return len(_HOOKS) // 2


def unwatch() -> None:
    while _HOOKS:
        _HOOKS.pop().remove()


def sharded_step(
    micro: list[tuple[list[dict], float]],
    parts: int,
    rows_per_pass: int | None,
    stage,
    pad_id: int,
    loss_sum: Callable,
    model: nn.Module,
) -> tuple[int, list[tuple[float, dict, float, int]]]:
    """The forward and backward passes of one optimizer step on a CPU in one process, each micro-batch's rows
    as up to `parts` shares that run at once, a thread each: (label terms of the step, and per pass its
    summed loss, extra metrics, weight and real tokens), as the loop's plain step gives them.

    `micro`: the step's micro-batches, (examples, weight); `loss_sum(batch)`: the stage's loss on the model.
    The rows in flight at once stay `rows_per_pass`: two shares run passes of half as many rows."""
    shares_of = []  # per micro-batch, its shares; each share a list of passes (batch, weight, tokens)
    for examples, weight in micro:
        size = rows_per_pass or len(examples)
        n = min(parts, size)
        per_pass = max(1, size // n)
        costs = [row_cost(e) for e in examples] if n > 1 else []
        shares = []
        for share in balance(examples, n, costs):
            shares.append([])
            for j in range(0, len(share), per_pass):
                batch = stage.collate(share[j : j + per_pass], pad_id)
                shares[-1].append((batch, weight, real_tokens(share[j : j + per_pass], batch)))
        shares_of.append(shares)
    n_label = int(sum(w * stage.count(b) for shares in shares_of for share in shares for b, w, _ in share))
    draws = shares_draw(model)
    done = []
    for shares in shares_of:
        if stage.ahead is not None:  # e.g. dpo's pi_ref with the adapter off, switched here for passes at once
            batches = [batch for share in shares for batch, _, _ in share]
            stage.ahead(model, batches, by_share([len(share) for share in shares], draws))
        learning = [p for p in model.parameters() if p.requires_grad]  # a method's on_step may change it
        # mt19937 takes a 32-bit seed: one from torch's generator (this thread, so the run's seed fixes it) + k
        seed = int(torch.randint(0, 2**32 - len(shares), (1,))) if draws else None
        calls = [
            partial(
                _share_gradients,
                share,
                n_label,
                learning,
                k == 0,
                loss_sum,
                None if seed is None else torch.Generator().manual_seed(seed + k),
            )
            for k, share in enumerate(shares)
        ]
        ran = run(calls) if len(calls) > 1 else [calls[0]()]
        accumulate(learning, [grads for _, grads in ran[1:]])
        for (results, _), share in zip(ran, shares):
            done += [(loss, more, w, tokens) for (loss, more), (_, w, tokens) in zip(results, share)]
    return n_label, done


def by_share(sizes: list[int], draws: bool = False) -> Callable[[list], list]:
    """Stage.ahead's `run`: given a call per pass, in share order (`sizes`: each share's passes), each share's calls
    in turn in a thread of its own, the shares at once (a thread per call would put more threads than cores to work
    where a share has several passes); any other number of calls, a thread each. `draws`: LoRA dropout masks come from
    a generator per share seeded from torch's (as the shares' own passes draw), so a run repeats whichever thread
    runs first (kto's KL rows pass the policy in training mode)."""

    def run_calls(calls: list) -> list:
        groups = [[c] for c in calls]
        if len(calls) == sum(sizes):
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            groups = [calls[a : a + n] for a, n in zip(starts, sizes)]
        seed = int(torch.randint(0, 2**32 - len(groups), (1,))) if draws else None
        gens = [None if seed is None else torch.Generator().manual_seed(seed + k) for k in range(len(groups))]
        return [out for outs in run([partial(_in_turn, g, gen) for g, gen in zip(groups, gens)]) for out in outs]

    return run_calls


def _in_turn(calls: list, generator: torch.Generator | None) -> list:
    with fast_lora.drawing_from(generator):
        return [call() for call in calls]


def _share_gradients(share: list, n_label: int, trainable: list, first: bool, loss_sum: Callable, generator=None):
    """One thread's passes: their (loss, extras), and gradients: the first share's into .grad, every other
    share's summed here, in order, and added by `sharded_step` after it (one order of additions: the same
    update every run). A CPU in one process: the batch is where the model is, and there is no autocast.
    `generator`: the share's own, for LoRA dropout masks (None: no dropout)."""
    results, grads = [], None
    for batch, weight, _ in share:
        # norm outputs rebuilt for the backward pass, not kept; dropout masks from the share's generator
        with norm.recomputed_outputs(), fast_lora.drawing_from(generator):
            loss, _, *more = loss_sum(batch)
        scaled = loss * weight / max(n_label, 1)
        if first:
            scaled.backward()
        else:
            grads = add(grads, torch.autograd.grad(scaled, trainable, allow_unused=True))
        results.append((float(loss.detach()), more[0] if more else {}))
    return results, grads


def shutdown() -> None:
    """Stop the worker threads and remove `watch`'s hooks (the training loop calls this when it ends)."""
    unwatch()
    _stop_pool()


def _stop_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None
