"""The store's encoder: render_examples' token ids and labels, with one chat-template render per conversation,
in plain data that a tokenising process started fresh (`spawn`) can use with only `tokenizers` and jinja loaded.

    enc = encoder_for(tokenizer)                          # None: a slow tokenizer (use render_examples)
    backend = Tokenizer.from_str(enc.backend)
    examples = encode_rows(rows, enc, backend, WordMemo.of(backend))   # [(ids, labels)] as int32 arrays

Why one render is enough. templating.py finds reply i's span by rendering the conversation up to it with the
generation prompt (where the reply starts) and up to and including it (where its end of turn ends). For a
template whose renderings of a prefix are prefixes of the full rendering, and that renders a reply as
`head + content + tail` (head: what add_generation_prompt adds; tail: the end of turn, e.g. ChatML's
`<|im_start|>assistant\\n` and `<|im_end|>\\n`), those two renderings end exactly around `head + content + tail`
in the full text, so the span is found there without rendering the prefixes. `template_shape` finds head and
tail once per template and keeps them only if spans found this way equal the renderings' on probe
conversations (system prompt, several turns, ending on a user turn); a row whose replies are not found
verbatim (a template that trims or rewrites content, tool calls, non-text content) takes the renderings, and
the first row of every batch is checked against them: a difference stops the encoder (ShapeMismatch), and
the store tokenises again with the renderings. The tokenizer is called once per batch; each token's label
comes from its offset as in templating.ids_by_offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tunelab.data.bytebpe import WordMemo, encode_texts
from tunelab.data.errors import DataError
from tunelab.data.formats import resolved, row_to_messages, row_to_text, row_tools
from tunelab.data.templating import IGNORE, spans_by_renders, supports_tools

_PROBES = [
    [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe answer."}],
    [{"role": "system", "content": "Probe system."}, {"role": "user", "content": "First?"},
     {"role": "assistant", "content": "One."}, {"role": "user", "content": "Second?"},
     {"role": "assistant", "content": "Two."}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "again"}],
]  # fmt: skip


class ShapeMismatch(RuntimeError):
    """A row whose reply spans from one render differ from the per-turn renderings'."""


@dataclass
class Encoder:
    backend: str  # the fast tokenizer's Rust tokenizer, serialised: what tokenizer(...) runs
    template: str
    tool_template: str  # the template apply_chat_template picks when tools are given (a dict of templates)
    template_kwargs: dict  # the special tokens apply_chat_template passes to the template
    eos: int | None
    tools_ok: bool
    shape: tuple[str, str] | None = None  # (head, tail) when one render locates the replies


def encoder_for(tokenizer) -> Encoder | None:
    """The Encoder of a fast tokenizer with a chat template; None otherwise (render_examples handles those)."""
    if not (getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")):
        return None
    try:
        template, tool_template = tokenizer.get_chat_template(), tokenizer.get_chat_template(None, [{}])
    except ValueError:  # no chat template, or several and no default: render_text reports it per row
        return None
    enc = Encoder(tokenizer.backend_tokenizer.to_str(), template, tool_template, dict(tokenizer.special_tokens_map),
                  tokenizer.eos_token_id, supports_tools(tokenizer))  # fmt: skip
    enc.shape = template_shape(enc)
    return enc


def render(
    enc: Encoder, messages: list[dict], generation: bool, tools: list | None = None, where: str = "example"
) -> str:
    """tokenizer.apply_chat_template(messages, tokenize=False, ...) as templating.render_text calls it."""
    from transformers.utils.chat_template_utils import render_jinja_template  # jinja only, not torch

    if tools and not enc.tools_ok:
        raise DataError(
            f"{where}: the row has tools, but the tokenizer's chat template does not support tools (it never "
            "reads `tools`); use a model whose template renders tool definitions, or drop the tools column."
        )
    try:
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        # apply_chat_template drops the keys whose value is None before rendering
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        out, _ = render_jinja_template(conversations=[chat], tools=tools or None,
                                       chat_template=enc.tool_template if tools else enc.template,
                                       add_generation_prompt=generation, **enc.template_kwargs)  # fmt: skip
    except Exception as e:  # jinja errors, e.g. a template that refuses a system message
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation: {e}") from None
    return out[0]


def spans_by_shape(messages: list[dict], full: str, shape: tuple[str, str]) -> list[tuple[int, int]] | None:
    """The reply spans of `full` (one render of `messages`) from the template's (head, tail), or None where a
    reply is not found verbatim as head + content + tail after the messages before it."""
    head, tail = shape
    if not messages or messages[0]["role"] == "assistant":
        return None
    spans, cursor, last = [], 0, len(messages) - 1
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str):
            return None
        if m["role"] != "assistant":
            at = full.find(content, cursor)  # the search for the next reply starts after this message
            if at < 0:
                return None
            cursor = at + len(content)
            continue
        if any(k not in ("role", "content") for k in m):  # tool calls: rendered by the template its own way
            return None
        piece = head + content + tail
        at = len(full) - len(piece) if i == last else full.find(piece, cursor)
        if at < cursor or not full.startswith(piece, at):
            return None
        spans.append((at + len(head), at + len(piece)))
        cursor = at + len(piece)
    return spans


def template_shape(enc: Encoder) -> tuple[str, str] | None:
    """(head, tail) of the template, kept only if spans_by_shape equals spans_by_renders on the probes."""
    try:
        user, reply = _PROBES[0][:1], _PROBES[0][1]["content"]
        bare, prompt, full = render(enc, user, False), render(enc, user, True), render(enc, _PROBES[0], False)
        if not (prompt.startswith(bare) and full.startswith(prompt + reply)):
            return None
        shape = (prompt[len(bare) :], full[len(prompt) + len(reply) :])
        for probe in _PROBES:
            text, spans = spans_by_renders(probe, lambda m, g: render(enc, m, g), "probe")
            if spans_by_shape(probe, text, shape) != spans:
                return None
    except DataError:
        return None
    return shape


def encode_rows(
    rows: list[tuple[dict, object, str]], enc: Encoder, backend, memo: WordMemo | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """render_examples(rows, tokenizer) as (input_ids, labels) int32 arrays; `backend`: the tokenizers.Tokenizer
    made from enc.backend, `memo`: WordMemo.of(backend), kept by the caller across batches. Raises ShapeMismatch when the batch's first one-render row disagrees with the
    renderings (see the module docstring)."""
    out: list = [None] * len(rows)
    chats, texts, checked = [], [], False
    for j, (row, cfg, where) in enumerate(rows):
        cfg = resolved(row, cfg, where)
        if cfg.format == "text":
            texts.append((j, row_to_text(row, cfg, where)))
            continue
        messages, tools = row_to_messages(row, cfg, where), row_tools(row, cfg, where)

        def by_turn(m, g, tools=tools, where=where):
            return render(enc, m, g, tools, where)

        full, spans = by_turn(messages, False), None
        if enc.shape is not None and (not tools or enc.tool_template == enc.template):
            spans = spans_by_shape(messages, full, enc.shape)
            if spans is not None and not checked:
                checked = True
                if spans_by_renders(messages, by_turn, where) != (full, spans):
                    raise ShapeMismatch(where)
        if spans is None:
            full, spans = spans_by_renders(messages, by_turn, where)
        if not spans:
            raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn.")
        chats.append((j, full, spans, cfg.train_on_prompt))
    for (j, full, spans, on_prompt), (ids, starts) in zip(chats, encode_texts([c[1] for c in chats], backend, memo)):
        first, last = np.asarray(spans, dtype=np.int64).T
        k = np.searchsorted(first, starts, side="right") - 1  # the reply a token starts in (templating.turns_of)
        inside = (k >= 0) & (starts < last[np.maximum(k, 0)])
        labels = np.where(inside, ids, IGNORE).astype(np.int32)
        # templating.with_labels: an eos learnt after the last reply when its end of turn holds none
        if enc.eos is not None and not full[spans[-1][1] :].strip():
            if not (ids[inside & (k == len(spans) - 1)] == enc.eos).any():
                ids, labels = np.append(ids, np.int32(enc.eos)), np.append(labels, np.int32(enc.eos))
        out[j] = (ids, ids.copy() if on_prompt else labels)
    if texts:  # continued pre-training: templating.encode_text, special tokens on
        for (j, _), (ids, _) in zip(texts, encode_texts([t for _, t in texts], backend, memo, special=True)):
            if enc.eos is not None and (not len(ids) or ids[-1] != enc.eos):
                ids = np.append(ids, np.int32(enc.eos))
            out[j] = (ids, ids.copy())
    return out
