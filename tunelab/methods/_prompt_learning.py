"""Small fixes that make PEFT 0.21's prompt-learning models (prefix / prompt tuning) work with
transformers 5.x, shared by `prefix.py` and `prompt.py`. Each is applied per instance by `patch`, and
again after loading, so a model from plain `PeftModel.from_pretrained` gets them too.

What PEFT 0.21 gets wrong with transformers 5.24 (found by the tests in tests/test_prefix_prompt.py):

1. Generation. transformers 5 renamed the cache argument `past_key_values` -> `cache` (the old name
   is a deprecated alias until 5.40). PEFT's `prepare_inputs_for_generation` still reads and writes
   `past_key_values`: it never sees generate's own cache, and the prefix it injects is dropped in
   favour of that cache ("Both `past_key_values` and `cache` are set ... ignoring past_key_values").
   Prefix tuning therefore generated as if there were no prefix after the first token (Llama) or at
   all (T5), and prompt tuning re-inserted the soft prompt at every decoding step. Fix: around PEFT's
   own `prepare_inputs_for_generation`, present the base model's `cache` to PEFT as
   `past_key_values` and hand PEFT's result back to the model as `cache`.
2. Prefix tuning on models whose task head has no cache argument (BertForSequenceClassification):
   PEFT looks for a `past_key_values` parameter on the backbone's forward, finds only `cache`, and
   raises "Model does not support past key values". Fix: call the task model itself with
   `cache=<prefix>`; its `**kwargs` pass it to the backbone, and the head and loss stay transformers'.
   PEFT 0.22 names the argument as the installed transformers does (`peft.import_utils.
   get_transformers_cache_name`) and reads `cache` itself; there this fix stands aside (`_peft_names_cache`):
   renamed back to `past_key_values`, PEFT 0.22 would not find generate's cache and would insert the prefix again
   at every decoding step.
3. Prompt tuning on a causal LM returns logits for the virtual tokens too
   ([batch, num_virtual_tokens + seq, vocab]), so they no longer line up with the labels in
   tunelab's loss (`models/loss.py`, which computes the loss from `.logits`). Fix: a forward hook
   drops the virtual positions from `.logits` (PEFT's own `.loss` is unaffected).
"""

from __future__ import annotations

import inspect
import types


def _rename(d: dict, old: str, new: str) -> dict:
    if old in d:
        value = d.pop(old)
        if value is not None or new not in d:
            d[new] = value
    return d


def _prepare_inputs_for_generation(self, *args, **kwargs):
    """PEFT's own preparation, with the transformers-5 `cache` presented to it as `past_key_values`."""
    original = self.base_model_prepare_inputs_for_generation

    def base_prepare(*a, **k):
        return _rename(original(*a, **k), "cache", "past_key_values")

    self.base_model_prepare_inputs_for_generation = base_prepare
    try:
        out = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    finally:
        self.base_model_prepare_inputs_for_generation = original
    return _rename(out, "past_key_values", "cache")


def _prefix_tuning_forward(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
):
    """PEFT's prefix forward for task heads (sequence classification ...), passing the prefix as `cache`."""
    from peft.peft_model import _get_batch_size

    batch_size = _get_batch_size(input_ids, inputs_embeds)
    extra = {
        "output_attentions": output_attentions,
        "output_hidden_states": output_hidden_states,
    }
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    return self.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        labels=labels,
        cache=self.get_prompt(batch_size),
        **kwargs,
    )


def _drop_virtual_logits(module, args, kwargs, output):
    """Forward hook: logits for the real positions only (prompt tuning on a causal LM).

    Only when the virtual tokens were really prepended: under PEFT's `disable_adapter()` (the DPO / PPO
    reference policy) the base model runs on the inputs alone and its logits are already the real ones."""
    n = module.active_peft_config.num_virtual_tokens
    logits = getattr(output, "logits", None)
    if logits is None or logits.dim() != 3:
        return output
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    real = inputs.shape[1] if inputs is not None else logits.shape[1] - n
    if logits.shape[1] == real + n:
        output.logits = logits[:, n:]
    return output


def _peft_names_cache() -> bool:
    """Whether PEFT itself hands transformers-5's cache argument by its new name (PEFT 0.22 on, fix 1 above)."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:  # PEFT 0.21: `past_key_values` throughout
        return False
    return get_transformers_cache_name() == "cache"


def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def patch(model):
    """Apply the fixes above to a PEFT prompt-learning model in place; returns it."""
    from peft import PeftType, TaskType

    cfg = model.active_peft_config
    base = model.get_base_model()
    prepare = getattr(base, "prepare_inputs_for_generation", None)
    if (
        prepare is not None
        and accepts(prepare, "cache")
        and not _peft_names_cache()
        and hasattr(model, "base_model_prepare_inputs_for_generation")
    ):
        model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_for_generation, model)
    if (
        cfg.peft_type == PeftType.PREFIX_TUNING
        and hasattr(model, "_prefix_tuning_forward")
        and not accepts(base.forward, "past_key_values")
        and not accepts(base.forward, "cache")
    ):
        model._prefix_tuning_forward = types.MethodType(_prefix_tuning_forward, model)
    causal_prompt = cfg.peft_type == PeftType.PROMPT_TUNING and cfg.task_type == TaskType.CAUSAL_LM
    if causal_prompt and not getattr(model, "_tunelab_drops_virtual_logits", False):
        model.register_forward_hook(_drop_virtual_logits, with_kwargs=True)
        model._tunelab_drops_virtual_logits = True
    return model
