"""Generate from a loaded model (a run loaded with tunelab.stages.runs.load_run, or any model):
`tunelab generate` and `tunelab chat`."""

from __future__ import annotations

# The generation defaults of `tunelab generate`, `tunelab chat` and `tunelab serve` (a request that sends no
# temperature), in one place: greedy, so the same prompt gives the same answer everywhere; pass
# --temperature (or the request's `temperature`) to sample. docs/getting-started.md documents them.
DEFAULT_TEMPERATURE = 0.0
TOP_P = 0.95  # nucleus sampling of generate / chat when temperature > 0
GENERATE_MAX_NEW_TOKENS = 128
CHAT_MAX_NEW_TOKENS = 256


def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    max_new_tokens: int = GENERATE_MAX_NEW_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    streamer=None,
) -> str:
    """Answer one user message (or a list of chat messages) with the chat template; greedy by default,
    sampled (top_p 0.95) when temperature > 0. A thin wrapper over tunelab.models.generation.generate."""
    from tunelab.data import build_prompt_ids
    from tunelab.models.generation import generate as generate_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = generate_ids(model, tokenizer, [build_prompt_ids(messages, tokenizer)], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=TOP_P, streamer=streamer)  # fmt: skip
    return out.texts()[0].strip()


def chat(model, tokenizer, max_new_tokens: int = CHAT_MAX_NEW_TOKENS, temperature: float = DEFAULT_TEMPERATURE,
         system: str | None = None) -> None:
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
