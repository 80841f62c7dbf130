"""Load a finished run (or any model spec) and generate from it: `tunelab generate` and `tunelab chat`."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def result_dir(run: str | Path) -> Path | None:
    """The `final/` folder of a run, given the run folder or `final/` itself; None if `run` is no run."""
    p = Path(run)
    for cand in (p / "final", p):
        if (cand / "tunelab.json").exists():
            return cand
    return None


_STAGE_AUTO_CLASS = {
    "extractive_qa": "AutoModelForQuestionAnswering",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "mlm": "AutoModelForMaskedLM",
}


def run_manifest(run: str | Path) -> dict | None:
    """A run's final/tunelab.json (method, base model, stage, task settings), or None for a plain model."""
    final = result_dir(run)
    return json.loads((final / "tunelab.json").read_text()) if final is not None else None


def load_run(run: str, device: str = "auto", merge: bool = False):
    """(model, tokenizer) for a run folder, or for a plain model spec (then the base model itself)."""
    from tunelab.config import ModelConfig
    from tunelab.methods import get as get_method
    from tunelab.models import load_model, load_tokenizer, resolve_device

    dev = resolve_device(device)
    final = result_dir(run)
    if final is None:
        if Path(run).exists() and not (Path(run) / "config.json").exists() and not str(run).endswith(".gguf"):
            raise FileNotFoundError(f"{run}: no finished run here (no final/tunelab.json); did training complete?")
        return load_model(ModelConfig(name=str(run)), device=dev)
    manifest = json.loads((final / "tunelab.json").read_text())
    base_cfg = ModelConfig(**manifest["base_model"])
    extra = {}
    if manifest.get("stage") == "classification":  # the base gets the run's (fresh) head; load() restores it
        from transformers import AutoModelForSequenceClassification

        task = manifest["task"]
        problem = "regression" if task["type"] == "regression" else "single_label_classification"
        extra = {
            "auto_class": AutoModelForSequenceClassification,
            "num_labels": task["num_labels"],
            "problem_type": problem,
            "ignore_mismatched_sizes": True,
        }
    elif manifest.get("stage") == "reward":  # a scalar head on the LM (training/reward.py); load() restores it
        from transformers import AutoModelForSequenceClassification

        extra = {"auto_class": AutoModelForSequenceClassification, "num_labels": 1, "ignore_mismatched_sizes": True}
    elif manifest.get("stage") in _STAGE_AUTO_CLASS:  # span QA head, encoder-decoder, masked LM
        import transformers

        extra = {"auto_class": getattr(transformers, _STAGE_AUTO_CLASS[manifest["stage"]])}
    if manifest.get("base_run"):  # trained on top of another run (ppo from an SFT run): that run, merged
        base, base_tokenizer = load_run(manifest["base_run"], device=device, merge=True)
    else:
        base, base_tokenizer = load_model(base_cfg, device=dev, **extra)
    method = get_method(manifest["method"])
    model = method.load(base, final)
    if merge and method.MERGEABLE:
        model = method.merge(model)
    # the run's own tokenizer (it may carry a chat template set for training)
    has_tokenizer = (final / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(ModelConfig(name=str(final))) if has_tokenizer else base_tokenizer
    return model.to(dev).eval(), tokenizer


def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
) -> str:
    """Answer one user message (or a list of chat messages) with the chat template; greedy by default."""
    from tunelab.data import build_prompt_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = torch.tensor([build_prompt_ids(messages, tokenizer)], device=next(model.parameters()).device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=0.95 if sample else None,
            top_k=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def chat(model, tokenizer, max_new_tokens: int = 256, temperature: float = 0.7, system: str | None = None) -> None:
    """An interactive, streaming chat in the terminal; the conversation is kept as context."""
    from transformers import TextStreamer

    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    print("Chat with the model. Empty line or Ctrl-D quits; /reset clears the history.")
    while True:
        try:
            user = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not user:
            return
        if user == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": user})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate(model, tokenizer, messages, max_new_tokens, temperature, streamer=streamer)
        messages.append({"role": "assistant", "content": reply})
