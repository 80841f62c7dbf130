"""One row -> chat messages (instruction, chat formats) or raw text (text format).

Column names come from `data.columns`; every missing or wrong-typed field is a DataError that
names the field and the `data.columns` key that maps it.
"""

from __future__ import annotations

from tunelab.config import DataConfig
from tunelab.data.errors import DataError

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}
SHAREGPT_COLUMN = "conversations"
HISTORY_COLUMN = "history"  # LLaMA-Factory's alpaca variant (e.g. LIMA): earlier [user, assistant] turns


def _expected(cfg: DataConfig) -> str:
    c = cfg.columns
    return {
        "instruction": f"{c.instruction}/{c.input}/{c.output}",
        "chat": f"{c.messages} (OpenAI role/content) or {SHAREGPT_COLUMN} (ShareGPT from/value)",
        "text": c.text,
    }[cfg.format]


def _missing(cfg: DataConfig, where: str, key: str) -> DataError:
    col = getattr(cfg.columns, key)
    return DataError(
        f"{where}: field '{col}' is missing (format: {cfg.format}; expected columns {_expected(cfg)} "
        f"— map yours with data.columns.{key})"
    )


def _text(row: dict, key: str, cfg: DataConfig, where: str, *, required: bool = True) -> str:
    col = getattr(cfg.columns, key)
    value = row.get(col)
    if value is None:
        if required:
            raise _missing(cfg, where, key)
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{col}' should be text, got {type(value).__name__} ({str(value)[:60]!r}). "
            f"Fix the data or map another column with data.columns.{key}."
        )
    return value


def row_to_text(row: dict, cfg: DataConfig, where: str = "row") -> str:
    return _text(row, "text", cfg, where)


def row_to_messages(row: dict, cfg: DataConfig, where: str = "row") -> list[dict]:
    if cfg.format == "instruction":
        messages = _instruction(row, cfg, where)
    elif cfg.format == "chat":
        messages = _chat(row, cfg, where)
    else:
        raise DataError(f"data.format: {cfg.format!r} rows have no chat messages; use format instruction or chat.")
    system = _text(row, "system", cfg, where, required=False) or cfg.system_prompt
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: the conversation has no assistant message, so there is nothing to learn. Remove the row."
        )
    return messages


def _instruction(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    instruction = _text(row, "instruction", cfg, where)
    extra = _text(row, "input", cfg, where, required=False)
    output = _text(row, "output", cfg, where)
    user = instruction + ("\n\n" + extra if extra.strip() else "")
    return _history(row, where) + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _history(row: dict, where: str) -> list[dict]:
    history = row.get(HISTORY_COLUMN) or []
    ok = isinstance(history, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in history
    )
    if not ok:
        raise DataError(f"{where}: field '{HISTORY_COLUMN}' should be a list of [user, assistant] text pairs.")
    return [{"role": r, "content": s} for pair in history for r, s in zip(("user", "assistant"), pair)]


def _chat(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    col = cfg.columns.messages if cfg.columns.messages in row else SHAREGPT_COLUMN
    turns = row.get(col)
    if turns is None:
        raise _missing(cfg, where, "messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{col}' should be a non-empty list of messages, got {turns!r:.60}.")
    return [message_dict(m, col, j, where) for j, m in enumerate(turns, 1)]


def message_dict(m, col: str, j: int, where: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{where}: message {j} in '{col}' should be an object, got {type(m).__name__}.")
    sharegpt = "from" in m or "value" in m
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    role = ROLES.get(str(m.get(role_key)).lower())
    if role is None:
        raise DataError(
            f"{where}: message {j} in '{col}' has {role_key} {m.get(role_key)!r}; expected one of "
            "system, user/human, assistant/gpt/model."
        )
    content = m.get(content_key)
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {j} in '{col}' needs a text '{content_key}', got {content!r:.60}.")
    return {"role": role, "content": content}
