"""Generate from a loaded model (a run loaded with tunelab.stages.runs.load_run, or any model):
`tunelab generate` and `tunelab chat`."""

from __future__ import annotations


def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
) -> str:
    """Answer one user message (or a list of chat messages) with the chat template; greedy by default,
    sampled (top_p 0.95) when temperature > 0. A thin wrapper over tunelab.models.generation.generate."""
    from tunelab.data import build_prompt_ids
    from tunelab.models.generation import generate as generate_ids

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    out = generate_ids(model, tokenizer, [build_prompt_ids(messages, tokenizer)], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=0.95, streamer=streamer)  # fmt: skip
    return out.texts()[0].strip()


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
