"""Preference pairs: a prompt (chat messages) and two replies, one preferred ("chosen") over the other.

    pairs = load_preference_pairs("hh-rlhf/harmless-base/test.jsonl.gz")
    pairs[0] == {"prompt": [{"role": "user", "content": ...}, ...], "chosen": "...", "rejected": "..."}
    enc = encode_preference(pairs[0], tokenizer, max_length=512)

Three row shapes are read (detected per row):

  explicit   {prompt, chosen, rejected}: prompt a string or a message list; chosen / rejected a string,
             one message, or a message list (TRL's conversational format; a list may carry more turns
             of the conversation before its final assistant reply). With no prompt column and message
             lists for chosen / rejected, their shared prefix is the prompt (TRL's "implicit prompt").
  hh-rlhf    {chosen, rejected} transcripts "\\n\\nHuman: ... \\n\\nAssistant: ...": both are parsed into
             messages and the shared turns before the last assistant reply become the prompt.
  ShareGPT   {conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}}
             (LLaMA-Factory's DPO format).

A row whose chosen and rejected conversations differ *before* their final reply is not a pair of two
replies to one prompt; it is skipped, counted and logged (hh-rlhf transcripts are compared turn by turn
with surrounding whitespace stripped, so none of harmless-base test's 2,312 rows is skipped).
Every other defect is a DataError naming the file, the line or row, the field and the fix.
"""

from __future__ import annotations

import logging
import re

from tunelab.data.errors import DataError, where
from tunelab.data.formats import SHAREGPT_COLUMN, message_dict
from tunelab.data.readers import read_rows
from tunelab.data.templating import ids_by_offsets, ids_by_pieces, response_spans

log = logging.getLogger("tunelab.data")

DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "messages": "messages",
                   "system": "system", "role": "role", "content": "content", "completion": "completion",
                   "label": "label"}  # fmt: skip
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_EXPECTED = (
    "expected {prompt, chosen, rejected}, hh-rlhf {chosen, rejected} transcripts ('\\n\\nHuman: ... "
    "\\n\\nAssistant: ...'), or ShareGPT {conversations, chosen, rejected}"
)


class _Skip(Exception):
    """A row that is no pair of replies to one prompt (the two conversations diverge earlier)."""


def load_preference_pairs(path: str, columns=None, limit: int | None = None) -> list[dict]:
    """Read preference pairs from a .json/.jsonl/.csv file (optionally .gz) or a hub id.

    `columns` maps our field names (prompt, chosen, rejected, messages, system; role and content: a
    message's keys) to yours: a dict, or the `data.columns` section. `limit` caps the rows read (before
    skipping)."""
    return read_preference_pairs(path, columns, limit)[0]


def read_preference_pairs(path: str, columns=None, limit: int | None = None, roles: dict | None = None,
                          rows=None, **hub) -> tuple[list[dict], dict]:  # fmt: skip
    """(pairs, stats): like load_preference_pairs, plus how many rows were read and skipped. `roles` names
    your messages' roles (data.roles); `rows`, when given, are the (file, line, row) rows already read."""
    cols = {**_columns(columns), "roles": roles or {}}
    rows = (read_rows(path, **hub) if rows is None else rows)[:limit]
    pairs, skipped, identical = [], [], []
    for file, number, row in rows:
        try:
            pair = row_to_pair(row, cols, where(file, number))
        except _Skip:
            skipped.append(where(file, number))
            continue
        if pair["chosen"] == pair["rejected"]:  # no preference to learn: the loss would sit at ln 2
            identical.append(where(file, number))
        else:
            pairs.append(pair)
    if skipped:
        log.warning(
            "%d rows skipped (first: %s): chosen and rejected differ before their final assistant reply, "
            "so they are not two replies to one prompt.",
            len(skipped), skipped[0],
        )  # fmt: skip
    if identical:
        log.warning("%d rows dropped (first: %s): chosen and rejected are the same reply", len(identical), identical[0])
    if not pairs:
        hint = f" ({len(skipped)} rows skipped: their conversations diverge before the final reply)" if skipped else ""
        if identical:
            hint += f" ({len(identical)} rows dropped: chosen and rejected are the same reply, first {identical[0]})"
        raise DataError(f"{path}: no preference pairs to use{hint}.")
    return pairs, {"rows_read": len(rows), "skipped": len(skipped), "identical": len(identical)}


def _columns(columns) -> dict:
    if columns is None:
        return dict(DEFAULT_COLUMNS)
    if not isinstance(columns, dict):  # the data.columns section
        columns = {k: getattr(columns, k) for k in DEFAULT_COLUMNS if hasattr(columns, k)}
    return {**DEFAULT_COLUMNS, **columns}


def row_to_pair(row: dict, cols: dict, where: str = "row") -> dict:
    """One row -> {"prompt": messages, "chosen": str, "rejected": str} (raises DataError or _Skip)."""
    for key in ("chosen", "rejected"):
        if row.get(cols[key]) is None:
            raise DataError(
                f"{where}: field '{cols[key]}' is missing (format: preference; {_EXPECTED} — map yours with "
                f"data.columns.{key})"
            )
    chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
    conv_col = next((c for c in (cols["messages"], SHAREGPT_COLUMN) if row.get(c) is not None), None)
    if conv_col is not None:
        prompt = _messages(row[conv_col], conv_col, where, cols)
    elif row.get(cols["prompt"]) is not None:
        prompt = _prompt(row[cols["prompt"]], cols["prompt"], where, cols)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = _hh_messages(chosen, cols["chosen"], where), _hh_messages(rejected, cols["rejected"], where)
        prompt = []
    else:
        prompt = []  # implicit prompt: the shared prefix of two message lists
    head_c, chosen_text = _response(chosen, cols["chosen"], where, cols)
    head_r, rejected_text = _response(rejected, cols["rejected"], where, cols)
    # a reply given as the whole conversation repeats the prompt: do not count it twice
    head_c, head_r = (h[len(prompt) :] if prompt and h[: len(prompt)] == prompt else h for h in (head_c, head_r))
    if head_c != head_r:
        raise _Skip
    prompt = prompt + head_c
    if not prompt:
        raise DataError(
            f"{where}: no prompt: give a '{cols['prompt']}' field (text or messages), a conversation in "
            f"'{conv_col or cols['messages']}', or chosen / rejected conversations that start with the prompt "
            "(map yours with data.columns.prompt)"
        )
    system = row.get(cols["system"])
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


def _prompt(value, col: str, where: str, cols: dict) -> list[dict]:
    if isinstance(value, str) and value.startswith("\n\nHuman:"):  # hh-rlhf split into prompt / replies
        msgs = _hh_messages(value, col, where)
        return msgs[:-1] if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"] else msgs
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _messages(value, col, where, cols)
    raise DataError(f"{where}: field '{col}' should be text or a list of messages, got {type(value).__name__}.")


def _messages(value, col: str, where: str, cols: dict) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{col}' should be a list of messages, got {type(value).__name__}.")
    keys, roles = (cols.get("role", "role"), cols.get("content", "content")), cols.get("roles")
    return [message_dict(m, col, j, where, keys, roles) for j, m in enumerate(value, 1)]


def _response(value, col: str, where: str, cols: dict) -> tuple[list[dict], str]:
    """(conversation turns before the reply, the final assistant reply's text)."""
    if isinstance(value, str):
        return [], value
    if not isinstance(value, (list, dict)):
        raise DataError(
            f"{where}: field '{col}' should be text, a message or a list of messages, got {type(value).__name__}."
        )
    msgs = _messages(value, col, where, cols)
    if not msgs or msgs[-1]["role"] != "assistant":
        got = msgs[-1]["role"] if msgs else "nothing"
        raise DataError(
            f"{where}: field '{col}' must end with an assistant reply (role assistant / from gpt), got {got}."
        )
    return msgs[:-1], msgs[-1]["content"]


def _hh_messages(text: str, col: str, where: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages; consecutive turns of one speaker are joined."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(
            f"{where}: field '{col}' is text without a prompt column, so it must be an hh-rlhf transcript "
            f"starting with '\\n\\nHuman: ' (got {text[:60]!r}). Otherwise add a prompt column ({_EXPECTED})."
        )
    msgs: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
    return msgs


# ---------------------------------------------------------------------------- unpaired (stage kto)
_LABELS = {True: True, False: False, "true": True, "false": False}  # 1 / 0 hash as True / False


def read_unpaired(path: str, columns=None, limit: int | None = None, roles: dict | None = None,
                  rows=None) -> tuple[list[dict], dict]:  # fmt: skip
    """(examples, stats) for stage kto: {"prompt": messages, "completion": str, "label": bool, "group": int} each,
    from rows that are unpaired (TRL's {prompt, completion, label}; a conversation ending with the reply plus a
    label, LLaMA-Factory's kto_tag) or preference pairs (each pair two examples: chosen desirable, rejected not, as
    TRL's `unpair_preference_dataset` does). `group`: the row an example came from (a pair's two share it), so that
    a split keeps a prompt on one side and a KL row never pairs a prompt with its own other reply."""
    cols = {**_columns(columns), "roles": roles or {}}
    rows = (read_rows(path) if rows is None else rows)[:limit]
    examples, pairs = [], 0
    for group, (file, number, row) in enumerate(rows):
        at = where(file, number)
        if row.get(cols["chosen"]) is not None or row.get(cols["rejected"]) is not None:
            try:
                pair = row_to_pair(row, cols, at)
            except _Skip:
                continue
            examples += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, "group": group},
                         {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False,
                          "group": group}]  # fmt: skip
            pairs += 1
        else:
            examples.append({**row_to_unpaired(row, cols, at), "group": group})
    if not examples:
        raise DataError(f"{path}: no examples to use.")
    labels = [e["label"] for e in examples]
    if all(labels) or not any(labels):
        kind = "desirable" if labels[0] else "undesirable"
        raise DataError(f"{path}: every example is {kind}: KTO needs both kinds of reply (label true and false)")
    return examples, {"rows_read": len(rows), "pairs_unpaired": pairs, "desirable": sum(labels),
                      "undesirable": len(labels) - sum(labels)}  # fmt: skip


def row_to_unpaired(row: dict, cols: dict, where: str = "row") -> dict:
    """One unpaired row -> {"prompt": messages, "completion": str, "label": bool} (raises DataError)."""
    label = row.get(cols["label"], row.get("kto_tag"))
    key = label.strip().lower() if isinstance(label, str) else label
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    if key not in _LABELS:
        got = "missing" if label is None else repr(label)
        raise DataError(
            f"{where}: field '{cols['label']}' is {got}: stage kto needs each reply labelled true (desirable) or "
            f"false (undesirable) — map yours with data.columns.label (LLaMA-Factory's kto_tag is read as it is)"
        )
    conv_col = next((c for c in (cols["messages"], SHAREGPT_COLUMN) if row.get(c) is not None), None)
    if row.get(cols["completion"]) is not None:
        prompt = (
            _prompt(row[cols["prompt"]], cols["prompt"], where, cols) if row.get(cols["prompt"]) is not None else []
        )
        head, text = _response(row[cols["completion"]], cols["completion"], where, cols)
        prompt = prompt + (head[len(prompt) :] if prompt and head[: len(prompt)] == prompt else head)
    elif conv_col is not None:
        prompt, text = _response(row[conv_col], conv_col, where, cols)
    else:
        raise DataError(
            f"{where}: no reply: stage kto reads {{{cols['prompt']}, {cols['completion']}, {cols['label']}}} (TRL), "
            f"a conversation in '{cols['messages']}' ending with the reply plus a label, or preference pairs"
        )
    if not prompt:
        raise DataError(f"{where}: no prompt before the reply (field '{cols['prompt']}', or the conversation's turns)")
    system = row.get(cols["system"])
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    return {"prompt": prompt, "completion": text, "label": _LABELS[key]}


def encode_unpaired(example: dict, tokenizer, max_length: int, where: str = "example") -> dict:
    """An unpaired example -> {"input_ids", "response_mask", "label", "truncated"}, truncated as a preference
    sequence is (the prompt loses its start)."""
    enc = encode_response(example["prompt"], example["completion"], tokenizer, where=where)
    truncated = len(enc["input_ids"]) > max_length
    enc = truncate_left(enc, max_length)
    return {**enc, "label": int(example["label"]), "group": example.get("group"), "truncated": truncated}


def mismatched(examples: list[dict], max_length: int, seed: int = 0) -> list[dict]:
    """Each encoded example with its KL row: its prompt followed by another row's reply, the mismatched completions
    KTO estimates KL(policy || reference) on (Ethayarajh et al. 2024; TRL and LLaMA-Factory pair them alike). The
    rows (`group`: a pair's two replies share one) in a seeded shuffle, their examples laid out in it, and each
    example given the reply as many places on as the largest row has examples: a rotation, so every reply serves
    one KL row, and never one of its own row (a pair's other reply is no mismatch). Keys kl_input_ids /
    kl_response_mask added."""
    import random

    rows: dict = {}
    for i, e in enumerate(examples):
        rows.setdefault(("example", i) if e.get("group") is None else e["group"], []).append(i)
    keys = list(rows)
    random.Random(seed).shuffle(keys)
    order = [i for k in keys for i in rows[k]]
    shift = max(len(v) for v in rows.values())
    shift = shift if shift < len(order) else 1
    partner = {i: order[(k + shift) % len(order)] for k, i in enumerate(order)}
    out = []
    for i, e in enumerate(examples):
        other = examples[partner[i]]
        start, other_start = e["response_mask"].index(1), other["response_mask"].index(1)
        kl = {"input_ids": e["input_ids"][:start] + other["input_ids"][other_start:],
              "response_mask": [0] * start + other["response_mask"][other_start:]}  # fmt: skip
        kl = truncate_left(kl, max_length)
        out.append({**e, "kl_input_ids": kl["input_ids"], "kl_response_mask": kl["response_mask"]})
    return out


def collate_unpaired(examples: list[dict], pad_id: int) -> dict:
    """B encoded examples -> one right-padded batch of 2B rows: the B examples, then their B KL rows; `label`
    [B] (1 desirable). Keys: input_ids, attention_mask, response_mask, label."""
    import torch

    from tunelab.data.collate import pad

    rows = [e["input_ids"] for e in examples] + [e["kl_input_ids"] for e in examples]
    masks = [e["response_mask"] for e in examples] + [e["kl_response_mask"] for e in examples]
    ids, attn = pad(rows, pad_id)
    resp, _ = pad(masks, 0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp,
            "label": torch.tensor([e["label"] for e in examples])}  # fmt: skip


# ------------------------------------------------------------------------------------------ encoding
def encode_response(prompt: list[dict], response: str, tokenizer, max_length: int | None = None,
                    where: str = "pair") -> dict:  # fmt: skip
    """prompt + one assistant reply, rendered with the chat template ->
    {"input_ids", "response_mask"} (1 on the reply's tokens, its end of turn, and an appended eos when the
    template's end of turn holds none — the same tokens SFT puts loss on). No truncation here."""
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    full, spans = response_spans(messages, tokenizer, where)
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    ids, turn = (ids_by_offsets if use_offsets else ids_by_pieces)(full, spans, tokenizer)
    last = len(spans) - 1  # only the final reply: earlier assistant turns belong to the prompt
    mask = [int(k == last) for k in turn]
    eos = tokenizer.eos_token_id
    reply = [t for t, m in zip(ids, mask) if m]
    if eos is not None and eos not in reply and not full[spans[-1][1] :].strip():
        ids, mask = ids + [eos], mask + [1]
    return {"input_ids": list(ids), "response_mask": mask}


def truncate_left(enc: dict, max_length: int, prompt_keep: int | None = None) -> dict:
    """Cut an encode_response result to max_length: the prompt loses tokens from its start (the reply
    survives); only a reply longer than max_length minus `prompt_keep` prompt tokens loses its end."""
    ids, mask = enc["input_ids"], enc["response_mask"]
    if len(ids) <= max_length:
        return enc
    start = mask.index(1) if 1 in mask else len(ids)
    keep = min(start, prompt_keep if prompt_keep is not None else _prompt_keep(start, len(ids) - start, max_length))
    return {"input_ids": ids[start - keep :][:max_length], "response_mask": mask[start - keep :][:max_length]}


def _prompt_keep(prompt_len: int, reply_len: int, max_length: int) -> int:
    """Prompt tokens kept: all that fit beside the reply, but at least a quarter of max_length (a reply
    judged without its question means little), so a very long reply is cut at its end instead."""
    return min(prompt_len, max(max_length - reply_len, max_length // 4))


def encode_preference(pair: dict, tokenizer, max_length: int, where: str = "pair") -> dict:
    """A pair -> {"chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask",
    "truncated"}. Both sequences keep the same number of prompt tokens when truncated, so the two
    replies are judged against the same (left-truncated) prompt."""
    c = encode_response(pair["prompt"], pair["chosen"], tokenizer, where=where)
    r = encode_response(pair["prompt"], pair["rejected"], tokenizer, where=where)
    truncated = max(len(c["input_ids"]), len(r["input_ids"])) > max_length
    if truncated:
        p_c, p_r = c["response_mask"].index(1), r["response_mask"].index(1)
        reply = max(len(c["input_ids"]) - p_c, len(r["input_ids"]) - p_r)
        keep = _prompt_keep(min(p_c, p_r), reply, max_length)
        c, r = truncate_left(c, max_length, keep), truncate_left(r, max_length, keep)
    return {
        "chosen_input_ids": c["input_ids"],
        "chosen_response_mask": c["response_mask"],
        "rejected_input_ids": r["input_ids"],
        "rejected_response_mask": r["response_mask"],
        "truncated": truncated,
    }


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """B encoded pairs -> one right-padded batch of 2B rows: the B chosen sequences, then the B rejected
    ones (one forward pass scores both). Keys: input_ids, attention_mask, response_mask."""
    from tunelab.data.collate import pad

    rows = [e[f"{side}_input_ids"] for side in ("chosen", "rejected") for e in examples]
    masks = [e[f"{side}_response_mask"] for side in ("chosen", "rejected") for e in examples]
    ids, attn = pad(rows, pad_id)
    resp, _ = pad(masks, 0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def collate_packed_pairs(examples: list[dict], pad_id: int, width: int | None = None) -> dict:
    """B encoded pairs -> the 2B sequences (chosen ones first, as in `collate_pairs`) packed into rows of up to
    `width` tokens (default, and at least: the longest sequence; the stage passes data.max_length) as SFT examples
    are (`data.packing.pack_plan`, best fit by decreasing length), then padded to the fullest row: positions restart
    at 0 for each sequence (and for a row's padding, a sequence of its own no real token sees: data/collate.py), no
    attention mask for the model. Keys: input_ids, position_ids and `last` ([2B]: the flattened position of each
    sequence's last token, where a reward model scores it)."""
    import torch

    from tunelab.data.collate import packed_positions, pad
    from tunelab.data.packing import pack_plan

    seqs = [list(e[f"{side}_input_ids"]) for side in ("chosen", "rejected") for e in examples]
    rows = pack_plan([len(s) for s in seqs], max([len(s) for s in seqs] + [width or 0]))
    ids, mask = pad([[t for i in row for t in seqs[i]] for row in rows], pad_id)
    positions = packed_positions([[p for i in row for p in range(len(seqs[i]))] for row in rows], mask)
    last = [0] * len(seqs)
    for r, row in enumerate(rows):
        end = r * ids.shape[1]
        for i in row:
            end += len(seqs[i])
            last[i] = end - 1
    return {"input_ids": ids, "position_ids": positions, "last": torch.tensor(last)}
