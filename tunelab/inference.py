"""Generate from a loaded model (a run loaded with tunelab.stages.runs.load_run, or any model):
`tunelab generate` and `tunelab chat`."""

from __future__ import annotations

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
) -> str:
    """Answer one user message (or a list of chat messages) with the chat template; greedy by default,
    sampled (with `top_p`) when temperature > 0. A thin wrapper over tunelab.models.generation.generate."""
    from tunelab.data import build_prompt_ids
    from tunelab.models.generation import generate as generate_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = generate_ids(model, tokenizer, [build_prompt_ids(messages, tokenizer)], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, streamer=streamer)  # fmt: skip
    return out.texts()[0].strip()


def chat(model, tokenizer, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
         system: str | None = None, top_p: float = DEFAULT_TOP_P) -> None:
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
