"""Generate from a loaded model (a run loaded with tunelab.stages.runs.load_run, or any model):
`tunelab generate` and `tunelab chat`.

A prompt goes in the tokenizer's chat template, except for a model that never learnt one (`plain_prompt_reason`):
one pre-trained from scratch on plain text with a tokenizer trained without a template, or a model folder whose
tokenizer ships none. Those continue the prompt as text; the ChatML template `load_tokenizer` falls back on would
hand them markup they have never seen.
"""

from __future__ import annotations

import json
from pathlib import Path

# The generation defaults of `tunelab generate`, `tunelab chat` and `tunelab serve` (what a request that
# leaves a field out gets), in one place; docs/getting-started.md and docs/export.md document them and
# tests/test_cli.py checks that the CLI flags and the server's request models agree with them.
# Greedy, so the same prompt gives the same answer everywhere; --temperature (the request's
# `temperature`) samples. top_p 1.0 (no nucleus cut) is what transformers' generate and OpenAI's API
# default to, so a sampled answer is plain temperature sampling unless --top-p asks for less.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MAX_NEW_TOKENS = 256


def check_generation_settings(max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """Refuse settings generation cannot use, before a model loads; the CLI and the UI give the same
    message, named by the CLI flag (the UI labels its fields with the flags' names)."""
    from tunelab.config import ConfigError

    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be 1 or more")
    if not temperature >= 0:  # also NaN
        raise ConfigError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:  # also NaN
        raise ConfigError(f"--top-p {top_p}: must be above 0 and at most 1 (1 = no nucleus cut)")


def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    streamer=None,
    top_p: float = DEFAULT_TOP_P,
    chat_template: bool = True,
) -> str:
    """Answer one user message (or a list of chat messages) with the chat template; greedy by default,
    sampled (with `top_p`) when temperature > 0. `chat_template=False`: the prompt (a string) is plain text
    to continue (tokenised as the tokenizer does, its bos included). A thin wrapper over
    tunelab.models.generation.generate."""
    from tunelab.data import build_prompt_ids
    from tunelab.models.generation import generate as generate_ids

    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = build_prompt_ids(messages, tokenizer)
    elif isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        raise TypeError("generate(chat_template=False) continues one text: give the prompt as a string")
    out = generate_ids(model, tokenizer, [ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       streamer=streamer)  # fmt: skip
    return out.texts()[0].strip()


def plain_prompt_reason(run: str) -> str | None:
    """Why `run` (a run folder or a model spec) should get its prompt as plain text, or None: use its chat
    template. A run built from scratch and trained on text only (stage pretrain or mlm) with a tokenizer that
    has no template of its own never saw a chat turn; nor did a local model folder whose tokenizer ships none."""
    from tunelab.stages.runs import run_manifest  # here, as the other imports of this module: cli imports it for --help

    manifest = run_manifest(run)
    if manifest is None:
        folder = Path(run).expanduser()
        if folder.is_dir() and (folder / "tokenizer_config.json").is_file() and not own_chat_template(folder):
            return f"{run}: its tokenizer has no chat template"
        return None
    base = manifest.get("base_model") or {}
    if not base.get("architecture") or manifest.get("stage") not in ("pretrain", "mlm"):
        return None  # a fine-tune learnt the template it was trained with (the base's, or ChatML)
    tokenizer = base.get("tokenizer")
    if isinstance(tokenizer, dict):
        template = ((tokenizer.get("train") or {}).get("chat_template") or "none") != "none"
    else:  # a tokenizer folder
        template = bool(tokenizer) and own_chat_template(Path(tokenizer).expanduser())
    if template:
        return None
    return (f"{run}: a {base['architecture']} model pre-trained from scratch on plain text (stage "
            f"{manifest['stage']}), with a tokenizer trained without a chat template")  # fmt: skip


def own_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` carries a chat template (in tokenizer_config.json or a
    chat_template.jinja / .json file beside it), before `load_tokenizer` adds ChatML to one that has none."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError):
        return False


def chat(
    model,
    tokenizer,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    system: str | None = None,
    top_p: float = DEFAULT_TOP_P,
) -> None:
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
        reply = generate(model, tokenizer, messages, max_new_tokens, temperature, streamer=streamer, top_p=top_p)
        messages.append({"role": "assistant", "content": reply})
