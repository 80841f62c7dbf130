"""The Chat tab: talk to a run (or a named / local model), optionally with its base model beside it.

The replies come from tunelab.inference.generate, what `tunelab chat` and `tunelab generate` call, with
the same defaults and the same checks of the settings; a reply streams into the page token by token
(transformers' TextIteratorStreamer, filled by the generation thread). Models load once per (spec,
device, trust_remote_code) and stay in this process for the next message, a few at a time.
"""

from __future__ import annotations

import shlex
import threading
from collections import OrderedDict
from collections.abc import Iterator

from tunelab.config import ConfigError
from tunelab.export.hf import base_model_spec
from tunelab.inference import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    check_generation_settings,
    generate,
)
from tunelab.stages.runs import load_run, run_manifest
from tunelab.ui.context import UIContext
from tunelab.ui.shared import error_markdown, model_picker

# A run and its base side by side are two; a third lets a user switch back to the previous run without a
# reload. More would hold a model's memory per entry (~0.5 GB for the default model in float32).
CACHE_SIZE = 3
_cache: OrderedDict[tuple, tuple] = OrderedDict()
_cache_lock = threading.Lock()


def load(spec: str, device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) of a run folder or model spec, loaded by load_run once and kept (LRU)."""
    key = (str(spec), device, bool(trust_remote_code))
    with _cache_lock:  # one load at a time: two at once would double the peak memory
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        model, tokenizer = load_run(str(spec), device=device, trust_remote_code=trust_remote_code)
        _cache[key] = (model.eval(), tokenizer)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return _cache[key]


def base_of(spec: str) -> str:
    """The model spec a run was trained from, to chat with beside it."""
    manifest = run_manifest(spec)
    if manifest is None:
        raise ConfigError(f"{spec}: not a run folder (no final/tunelab.json), so it has no base model to show "
                          "beside it; untick 'base model beside it' or pick a run")  # fmt: skip
    base = base_model_spec(spec, manifest)
    if not base:
        raise ConfigError(f"{spec}: trained from scratch (model.architecture), so it has no base model to show "
                          "beside it; untick 'base model beside it'")  # fmt: skip
    return base


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P) -> Iterator[str]:  # fmt: skip
    """The reply so far, as it grows; the last item is tunelab.inference.generate's reply itself."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out: dict = {}

    def work():
        try:
            out["reply"] = generate(model, tokenizer, messages, max_new_tokens, temperature, streamer, top_p)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e
            streamer.end()  # else the loop below waits for tokens forever

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if "error" in out:
        raise out["error"]
    yield out["reply"]


def conversation(history: list[dict], system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + history


def chat_command(spec, temperature, top_p, max_new_tokens, system, trust_remote_code=False) -> str:
    """The `tunelab chat` command line that holds the same conversation settings, shown under the form (and
    updated by the server on each change, so what the page shows is what the next message sends)."""
    words = ["tunelab", "chat", (spec or "").strip() or "RUN"]
    for flag, value in (("--temperature", temperature), ("--top-p", top_p), ("--max-new-tokens", max_new_tokens)):
        if value is not None:
            words += [flag, str(int(value)) if flag == "--max-new-tokens" else format(value, "g")]
    if system and system.strip():
        words += ["--system", system]
    if trust_remote_code:
        words.append("--trust-remote-code")
    return "The same settings in a terminal: `" + shlex.join(words) + "`"


def respond(spec, beside, message, history, base_history, temperature, top_p, max_new_tokens, system,
            trust_remote_code=False, device="auto"):  # fmt: skip
    """Gradio's handler: yields (history, base history, error text, message box) as the replies stream."""
    history, base_history = list(history or []), list(base_history or [])
    try:
        if not (spec or "").strip():
            raise ConfigError("pick a run or a model (a run folder, a named model, a folder, a .gguf or a hub id)")
        if not (message or "").strip():
            raise ConfigError("type a message first")
        given = {"--temperature": temperature, "--top-p": top_p, "--max-new-tokens": max_new_tokens}
        empty = [flag for flag, v in given.items() if v is None]  # a cleared number field
        if empty:
            raise ConfigError(f"{', '.join(empty)}: give a number (the defaults: --temperature {DEFAULT_TEMPERATURE}, "
                              f"--top-p {DEFAULT_TOP_P}, --max-new-tokens {DEFAULT_MAX_NEW_TOKENS})")  # fmt: skip
        max_new_tokens, temperature, top_p = int(max_new_tokens), float(temperature), float(top_p)
        check_generation_settings(max_new_tokens, temperature, top_p)
        targets = [(spec, history)] + ([(base_of(spec), base_history)] if beside else [])
        models = [load(s, device, trust_remote_code) for s, _ in targets]  # every load before any reply
        for (_, h), (model, tokenizer) in zip(targets, models):
            h.append({"role": "user", "content": message})
            prompt = conversation(h, system)
            h.append({"role": "assistant", "content": ""})
            for text in stream_reply(model, tokenizer, prompt, max_new_tokens, temperature, top_p):
                h[-1] = {"role": "assistant", "content": text}
                yield history, base_history, "", ""
        yield history, base_history, "", ""
    except Exception as e:  # noqa: BLE001 - shown beside the form, as the CLI words it
        yield history, base_history, error_markdown(e), message


def build_tab(ctx: UIContext) -> None:
    import gradio as gr

    spec, beside = model_picker(ctx.runs, "base model beside it")
    with gr.Accordion("Generation settings (the defaults of tunelab chat)", open=False):
        with gr.Row():
            temperature = gr.Number(DEFAULT_TEMPERATURE, label="--temperature (0 = greedy)", minimum=0)
            top_p = gr.Number(DEFAULT_TOP_P, label="--top-p (1 = no nucleus cut)")
            max_new = gr.Number(DEFAULT_MAX_NEW_TOKENS, label="--max-new-tokens", precision=0)
        system = gr.Textbox(label="--system (optional system message)", lines=1)
        trust = gr.Checkbox(False, label="--trust-remote-code (runs the model's own Python code)")
    command = gr.Markdown(chat_command(None, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS, None),
                          elem_id="chat-command")  # fmt: skip
    error = gr.Markdown(elem_id="chat-error")
    with gr.Row():
        chat = gr.Chatbot(label="Run", elem_id="chat-run", height=360)
        base_chat = gr.Chatbot(label="Base model", elem_id="chat-base", height=360, visible=False)
    history, base_history = gr.State([]), gr.State([])
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=5,
                             elem_id="chat-message")  # fmt: skip
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=0)

    def run(spec, beside, message, history, base_history, temperature, top_p, max_new, system, trust):
        for h, b, err, box in respond(spec, beside, message, history, base_history, temperature, top_p, max_new,
                                      system, trust):  # fmt: skip
            yield h, b, h, b, err, box

    inputs = [spec, beside, message, history, base_history, temperature, top_p, max_new, system, trust]
    outputs = [history, base_history, chat, base_chat, error, message]
    send.click(run, inputs, outputs)
    message.submit(run, inputs, outputs)
    clear.click(lambda: ([], [], [], [], ""), None, [history, base_history, chat, base_chat, error])
    beside.change(lambda b: gr.update(visible=b), beside, base_chat)
    settings = [spec, temperature, top_p, max_new, system, trust]
    for field in settings:
        field.change(chat_command, settings, command, show_progress="hidden")
