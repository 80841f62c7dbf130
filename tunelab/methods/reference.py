"""The reference policy pi_ref of DPO and PPO: the model as it was when training started.

How it is obtained is the method's declaration (`CAPABILITIES.reference`, see base.py):

  adapter_off   the method wrapped the untouched base in a PEFT adapter (lora, qlora, ia3, prefix, prompt):
                pi_ref is the same model with the adapter switched off (`disable_adapter`), so there is no
                second copy in memory. For lora, qlora and ia3 that is exactly the starting policy (B = 0,
                scales of 1). For prefix and prompt tuning it is the base model without the virtual tokens:
                their starting soft prompt is an arbitrary initialisation (vocabulary embeddings or text),
                so the anchor is the model the user started from, and the step-0 DPO loss is not ln 2
  frozen_copy   the method trains the model's own weights or modules of its own (full, freeze, bitfit,
                adapter ...): pi_ref is a frozen deep copy taken once, before training

An adapter that starts from trained values (lora's `start_from`: the model carries base.STARTED_ADAPTER) is no
no-op to switch off: pi_ref is the model with the adapter at its starting values, a copy of its trainable
parameters taken at `prepare` (the adapter's size, not the model's) and put in their place, in eval mode, for the
reference pass.

    reference.prepare(model, method)      # once the method is applied, before a resume restores weights
    with reference.policy(model) as ref:  # every time pi_ref is needed
        ref(**batch)

`prepare` runs after `method.apply` (the copy holds what apply added: zero biases, fake quantization,
new identity blocks, so at step 0 the policy *is* the reference) and before a resumed run loads its
trained weights (so a resume keeps the original reference). For PPO the model is the SFT policy it starts
from (a merged earlier run: `stages/ppo.py load_policy`) with the method applied, so that is pi_ref.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

from tunelab.methods.base import STARTED_ADAPTER

# trained model -> its frozen starting copy, or None where the reference is the model with its adapter off
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# trained model -> values computed from its pi_ref alone (memo), emptied whenever prepare sets pi_ref anew
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(model, method) -> None:
    """Make `model`'s reference policy available to `policy(model)`; `method` is the registered method module
    that was applied to it."""
    kind = method.CAPABILITIES.reference
    if kind == "adapter_off":
        if not hasattr(model, "disable_adapter"):
            raise TypeError(
                f"method {method.__name__.rsplit('.', 1)[-1]} declares reference 'adapter_off', but its model "
                f"({type(model).__name__}) has no disable_adapter"
            )
        started = getattr(model, STARTED_ADAPTER, None) is not None
        _PREPARED[model] = {p: p.detach().clone() for p in model.parameters() if p.requires_grad} if started else None
    else:
        _PREPARED[model] = frozen_copy(model)
    _MEMO[model] = {}


def memo(model) -> dict | None:
    """A dict for what a pass of `model`'s pi_ref gives and nothing else changes (dpo's log-probs of a row), kept as
    long as pi_ref is: pi_ref never trains, so a value computed once holds for the whole run. None where no reference
    was prepared."""
    return _MEMO.get(model)


def frozen(model):
    """The frozen copy that is `model`'s pi_ref, or None (the adapter switched off, no reference prepared)."""
    ref = _PREPARED.get(model)
    return None if ref is None or isinstance(ref, dict) else ref


def on_the_model(model) -> bool:
    """Whether pi_ref's passes run on `model` itself (its adapter switched off, or at its starting values), so that a
    thread running a pass beside one would see that state (accel's thread shares stay off). False for a frozen copy,
    and where no reference was prepared (dpo's reference-free losses)."""
    return model in _PREPARED and (_PREPARED[model] is None or isinstance(_PREPARED[model], dict))


_BESIDE = threading.local()  # `on` in a thread whose passes run beside other threads' on the same model


@contextlib.contextmanager
def beside_other_passes():
    """Within, in this thread: `policy` refuses to switch the trained model's adapter (accel's thread shares run
    their passes so: another thread's pass would see the switch)."""
    _BESIDE.on = True
    try:
        yield
    finally:
        _BESIDE.on = False


def frozen_copy(model):
    """A deep copy in eval mode whose parameters take no gradient."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@contextlib.contextmanager
def policy(model):
    """Yields pi_ref: the frozen copy, or (adapter_off) the base model inside `model.disable_adapter()`, i.e.
    without the adapter layers and without the PEFT wrapper's virtual tokens / logits hook."""
    if model not in _PREPARED:
        raise RuntimeError(
            "no reference policy for this model: call tunelab.methods.reference.prepare(model, method) once the "
            "method is applied, before training"
        )
    ref = _PREPARED[model]
    if (ref is None or isinstance(ref, dict)) and getattr(_BESIDE, "on", False):
        raise RuntimeError(
            "pi_ref's pass would switch the adapter of the model that other thread shares are running passes on: "
            "compute it before the shares, in the loop's thread (Stage.ahead)"
        )
    if isinstance(ref, dict):
        with starting_values(model, ref):
            yield model
        return
    if ref is not None:
        yield ref
        return
    with model.disable_adapter():
        yield model.get_base_model()


@contextlib.contextmanager
def starting_values(model, start: dict):
    """Within: `model` in eval mode (no dropout on the adapter) with each parameter of `start` holding its starting
    value; after: the very tensors and modes it had (a policy pass's autograd graph sees its own values again)."""
    now = {p: p.data for p in start}
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for p, value in start.items():
            p.data = value
        yield
    finally:
        for p, value in now.items():
            p.data = value
        for m, training in modes:
            m.training = training
