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
    full = render_text(messages, tokenizer, add_generation_prompt=False, where=where, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_text(messages[:i], tokenizer, add_generation_prompt=True, where=where, tools=tools)
        end = render_text(messages[: i + 1], tokenizer, add_generation_prompt=False, where=where, tools=tools)
        if not (end.startswith(start) and full.startswith(end)):
            raise DataError(
                f"{where}: this tokenizer's chat template renders earlier turns differently once later turns "
                f"follow (turn {i + 1}), so the reply tokens cannot be located. Use a template without that "
                "behaviour, split multi-turn rows into one row per reply, or set data.train_on_prompt: true."
            )
        spans.append((len(start), len(end)))
    return full, spans


def encode_messages(messages: list[dict], tokenizer, *, train_on_prompt: bool = False, where: str = "example",
                    use_offsets: bool | None = None, tools: list | None = None) -> dict:
    """Messages -> {"input_ids", "labels"}: loss on every assistant reply (and its end of turn) only;
    `tools` (tool definitions) are rendered by the chat template when it supports them."""
    full, spans = response_spans(messages, tokenizer, where, tools)
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant message, so there is nothing to learn.")
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    ids, turn = (ids_by_offsets if use_offsets else ids_by_pieces)(full, spans, tokenizer)
    labels = [t if k >= 0 else IGNORE for t, k in zip(ids, turn)]
    eos = tokenizer.eos_token_id
    last_reply = [t for t, k in zip(ids, turn) if k == len(spans) - 1]
    # The model must learn to stop: when the conversation ends with a reply whose end of turn
    # holds no eos (the template's end-of-turn token is not the tokenizer's eos), append one, with loss.
    if eos is not None and eos not in last_reply and not full[spans[-1][1]:].strip():
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
    return list(enc["input_ids"]), [_turn_of(a, spans) for a, _ in enc["offset_mapping"]]


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
    ids = list(tokenizer(text)["input_ids"])  # special tokens on: models that expect a bos get it
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return {"input_ids": ids, "labels": list(ids)}


def render_example(row: dict, cfg: DataConfig, tokenizer, *, where: str = "row") -> dict:
    """One data row -> {"input_ids", "labels"} (not truncated; labels are -100 where there is no loss)."""
    cfg = resolved(row, cfg, where)
    if cfg.format == "text":
        return encode_text(row_to_text(row, cfg, where), tokenizer)
    messages = row_to_messages(row, cfg, where)
    return encode_messages(messages, tokenizer, train_on_prompt=cfg.train_on_prompt, where=where,
                           tools=row_tools(row, cfg, where))  # fmt: skip
