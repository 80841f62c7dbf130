"""Chat messages -> token ids and a loss mask, through the tokenizer's own chat template.

How the mask is found: for assistant turn i, render(messages[:i], add_generation_prompt=True)
is the prompt up to where the reply starts, and render(messages[:i+1]) ends where the reply
(including the template's end-of-turn text, e.g. ChatML's `<|im_end|>\n`) ends. Those two
renderings must be *text* prefixes of the full rendering; if a template breaks that (e.g. it
rewrites earlier turns), we raise a DataError rather than guess a mask. The full text is then
tokenized once and each token is labelled by where its first character lies (offset mapping),
so the ids are exactly what the tokenizer gives for the whole conversation (the same ids
`generate` sees) and a BPE merge across a boundary cannot shift the mask. Tokenizers without
offsets (slow ones) tokenize the prompt/response pieces separately instead.
"""

from __future__ import annotations

import bisect

from tunelab.config import DataConfig
from tunelab.data.errors import DataError
from tunelab.data.formats import resolved, row_to_messages, row_to_text, row_tools

IGNORE = -100


def supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a `tools` list (it reads the variable)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return isinstance(template, str) and "tools" in template


def render_text(messages: list[dict], tokenizer, *, add_generation_prompt: bool, where: str = "example",
                tools: list | None = None) -> str:  # fmt: skip
    if tools and not supports_tools(tokenizer):
        raise DataError(
            f"{where}: the row has tools, but the tokenizer's chat template does not support tools (it never "
            "reads `tools`); use a model whose template renders tool definitions, or drop the tools column."
        )
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)  # fmt: skip
    except Exception as e:  # jinja errors, e.g. a template that refuses a system message
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation: {e}") from None


def build_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Ids of the conversation plus the assistant header, ready for generation."""
    text = render_text(messages, tokenizer, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already holds any bos


def response_spans(messages: list[dict], tokenizer, where: str = "example",
                   tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The full rendering and the character spans [start, end) of each assistant reply."""

    def render(msgs: list[dict], generation: bool) -> str:
        return render_text(msgs, tokenizer, add_generation_prompt=generation, where=where, tools=tools)

    return spans_by_renders(messages, render, where)


def spans_by_renders(messages: list[dict], render, where: str = "example") -> tuple[str, list[tuple[int, int]]]:
    """response_spans with `render(messages, add_generation_prompt) -> text`: each reply located by rendering
    the conversation up to it (the module docstring's method)."""
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], True)
        end = full  # the last message: messages[: i + 1] is all of them, rendered once already
        if i < len(messages) - 1:
            end = render(messages[: i + 1], False)
        if not (end.startswith(start) and full.startswith(end)):
            raise DataError(
                f"{where}: this tokenizer's chat template renders earlier turns differently once later turns "
                f"follow (turn {i + 1}), so the reply tokens cannot be located. Use a template without that "
                "behaviour, split multi-turn rows into one row per reply, or set data.train_on_prompt: true."
            )
        spans.append((len(start), len(end)))
    return full, spans


def encode_messages(
    messages: list[dict],
    tokenizer,
    *,
    train_on_prompt: bool = False,
    where: str = "example",
    use_offsets: bool | None = None,
    tools: list | None = None,
) -> dict:
    """Messages -> {"input_ids", "labels"}: loss on every assistant reply (and its end of turn) only;
    `tools` (tool definitions) are rendered by the chat template when it supports them."""
    full, spans = response_spans(messages, tokenizer, where, tools)
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn.")
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    ids, turn = (ids_by_offsets if use_offsets else ids_by_pieces)(full, spans, tokenizer)
    return with_labels(ids, turn, full, spans, tokenizer, train_on_prompt)


def with_labels(ids: list[int], turn: list[int], full: str, spans, tokenizer, train_on_prompt: bool) -> dict:
    """{"input_ids", "labels"} from the tokens and the reply each lies in (-1: none)."""
    labels = [t if k >= 0 else IGNORE for t, k in zip(ids, turn)]
    eos = tokenizer.eos_token_id
    last_reply = [t for t, k in zip(ids, turn) if k == len(spans) - 1]
    # The model must learn to stop: when the conversation ends with a reply whose end of turn
    # holds no eos (the template's end-of-turn token is not the tokenizer's eos), append one, with loss.
    if eos is not None and eos not in last_reply and not full[spans[-1][1] :].strip():
        ids, labels = ids + [eos], labels + [eos]
    if train_on_prompt:
        labels = list(ids)
    return {"input_ids": ids, "labels": labels}


def _turn_of(pos: int, spans: list[tuple[int, int]]) -> int:
    """Index of the reply span holding character `pos`, or -1 (spans are sorted and disjoint)."""
    k = bisect.bisect_right(spans, (pos, float("inf"))) - 1
    return k if k >= 0 and pos < spans[k][1] else -1


def ids_by_offsets(full: str, spans, tokenizer) -> tuple[list[int], list[int]]:
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), turns_of([a for a, _ in enc["offset_mapping"]], spans)


def turns_of(starts: list[int], spans) -> list[int]:
    """_turn_of for every token start at once (numpy: a row has hundreds of tokens)."""
    import numpy as np

    if not spans:
        return [-1] * len(starts)
    at = np.asarray(starts, dtype=np.int64)
    first, last = np.asarray(spans, dtype=np.int64).T
    k = np.searchsorted(first, at, side="right") - 1
    inside = (k >= 0) & (at < last[np.maximum(k, 0)])
    return np.where(inside, k, -1).tolist()


def ids_by_pieces(full: str, spans, tokenizer) -> tuple[list[int], list[int]]:
    cuts = sorted({0, len(full), *(c for span in spans for c in span)})
    ids, turn = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        turn += [_turn_of(a, spans)] * len(piece)
    return ids, turn


def encode_text(text: str, tokenizer) -> dict:
    """Continued pre-training: loss on every token, eos appended so documents end cleanly."""
    return text_example(list(tokenizer(text)["input_ids"]), tokenizer)  # special tokens on: a bos where expected


def text_example(ids: list[int], tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return {"input_ids": ids, "labels": list(ids)}


def render_examples(rows: list[tuple[dict, DataConfig, str]], tokenizer) -> list[dict]:
    """render_example over (row, cfg, where) triples, the same examples, with the tokenizer called once for
    all of them: a fast tokenizer's batch call skips the per-call overhead and encodes on every core."""
    fast = bool(getattr(tokenizer, "is_fast", False)) and hasattr(tokenizer, "backend_tokenizer")
    if not fast:
        return [render_example(row, cfg, tokenizer, where=w) for row, cfg, w in rows]
    texts, chats = [], []  # (position in rows, text); (position, full, spans, train_on_prompt)
    for j, (row, cfg, w) in enumerate(rows):
        cfg = resolved(row, cfg, w)
        if cfg.format == "text":
            texts.append((j, row_to_text(row, cfg, w)))
            continue
        full, spans = response_spans(row_to_messages(row, cfg, w), tokenizer, w, row_tools(row, cfg, w))
        if not spans:
            raise DataError(f"{w}: the conversation has no assistant message, so there is nothing to learn.")
        chats.append((j, full, spans, cfg.train_on_prompt))
    out: list = [None] * len(rows)
    backend = tokenizer.backend_tokenizer
    # the backend's own batch call: what tokenizer(full, return_offsets_mapping=True) runs, minus its
    # conversion of every encoding into Python dicts (a third of the time); tests/test_datapipe.py compares
    encodings = backend.encode_batch([c[1] for c in chats], add_special_tokens=False) if chats else []
    for (j, full, spans, on_prompt), enc in zip(chats, encodings):
        turn = turns_of([a for a, _ in enc.offsets], spans)
        out[j] = with_labels(list(enc.ids), turn, full, spans, tokenizer, on_prompt)
    if texts:
        for (j, _), ids in zip(texts, tokenizer([t for _, t in texts])["input_ids"]):
            out[j] = text_example(list(ids), tokenizer)
    return out


def render_example(row: dict, cfg: DataConfig, tokenizer, *, where: str = "row") -> dict:
    """One data row -> {"input_ids", "labels"} (not truncated; labels are -100 where there is no loss)."""
    cfg = resolved(row, cfg, where)
    if cfg.format == "text":
        return encode_text(row_to_text(row, cfg, where), tokenizer)
    messages = row_to_messages(row, cfg, where)
    return encode_messages(messages, tokenizer, train_on_prompt=cfg.train_on_prompt, where=where,
                           tools=row_tools(row, cfg, where))  # fmt: skip
