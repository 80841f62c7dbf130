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
    "function_call": "assistant",  # LLaMA-Factory's tool call: an assistant turn whose value is the call (JSON)
    "observation": "tool",  # LLaMA-Factory's tool result
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}
SHAREGPT_COLUMN = "conversations"
HISTORY_COLUMN = "history"  # LLaMA-Factory's alpaca variant (e.g. LIMA): earlier [user, assistant] turns


def _expected(cfg: DataConfig) -> str:
    c = cfg.columns
    return {
        "instruction": f"{c.instruction}/{c.input}/{c.output}",
        "chat": f"{c.messages} (OpenAI role/content) or {SHAREGPT_COLUMN} (ShareGPT from/value)",
        "prompt_completion": f"{c.prompt}/{c.completion}",
        "text": c.text,
        "preference": f"{c.chosen}/{c.rejected}",
    }.get(cfg.format, "")


def detect_format(row: dict, cfg: DataConfig, stage: str = "sft", where: str = "row") -> str:
    """The format of a row by its columns (data.format: auto): preference (chosen + rejected), chat
    (messages / conversations), instruction (alpaca), prompt_completion (TRL), text."""
    c = cfg.columns
    if stage in ("pretrain", "mlm"):
        return "text"
    if c.chosen in row and c.rejected in row:
        return "preference"
    if stage in ("reward", "dpo", "kto"):
        return "preference"  # the preference reader names what is missing
    if c.messages in row or SHAREGPT_COLUMN in row:
        return "chat"
    if c.instruction in row and c.output in row:
        return "instruction"
    if c.prompt in row and c.completion in row:
        return "prompt_completion"
    if c.instruction in row or c.output in row:  # partly alpaca: the missing field is named next
        return "instruction"
    if c.prompt in row or c.completion in row:
        return "prompt_completion"
    if c.text in row:
        raise DataError(
            f"{where}: a text row ('{c.text}') has no reply to learn in stage {stage}: use stage: pretrain, or "
            "rows with instruction/output, messages or prompt/completion"
        )
    raise DataError(
        f"{where}: cannot tell the format from the columns {sorted(row)[:8]}: expected instruction/output "
        f"(alpaca), {c.messages} or {SHAREGPT_COLUMN} (chat), prompt/completion (TRL), {c.text} (pretrain) or "
        "chosen/rejected (preference). Set data.format, or map yours with data.columns"
    )


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


def resolved(row: dict, cfg: DataConfig, where: str = "row", stage: str = "sft") -> DataConfig:
    """`cfg` with data.format: auto resolved for this row."""
    if cfg.format != "auto":
        return cfg
    return cfg.model_copy(update={"format": detect_format(row, cfg, stage, where)})


def row_tools(row: dict, cfg: DataConfig, where: str = "row") -> list | None:
    """The tool definitions of a tool-calling row (a list, or its JSON text), or None."""
    import json

    col = cfg.columns.tools
    value = row.get(col)
    if value in (None, "", [], "[]"):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field '{col}' is not a JSON list of tools ({e.msg}).") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: field '{col}' should be a list of tool definitions (objects).")
    return [t if "type" in t else {"type": "function", "function": t} for t in value]


def row_to_messages(row: dict, cfg: DataConfig, where: str = "row") -> list[dict]:
    cfg = resolved(row, cfg, where)
    if cfg.format == "instruction":
        messages = _instruction(row, cfg, where)
    elif cfg.format == "chat":
        messages = _chat(row, cfg, where)
    elif cfg.format == "prompt_completion":
        messages = _prompt_completion(row, cfg, where)
    else:
        hint = " (chosen / rejected pairs are for stage: dpo or reward)" if cfg.format == "preference" else ""
        raise DataError(
            f"{where}: data.format {cfg.format!r} rows have no chat messages{hint}; stage sft reads instruction, "
            "chat or prompt_completion rows."
        )
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


def _prompt_completion(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    """TRL's {prompt, completion}: each text, or lists of messages (conversational)."""
    out = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        col = getattr(cfg.columns, key)
        value = row.get(col)
        if value is None:
            raise _missing(cfg, where, key)
        if isinstance(value, str):
            out.append({"role": role, "content": value})
        elif isinstance(value, list) and value:
            out += [message_dict(m, col, j, where, _keys(cfg), cfg.roles) for j, m in enumerate(value, 1)]
        else:
            raise DataError(
                f"{where}: field '{col}' should be text or a non-empty list of messages, got {value!r:.60}."
            )
    return out


def _chat(row: dict, cfg: DataConfig, where: str) -> list[dict]:
    col = cfg.columns.messages if cfg.columns.messages in row else SHAREGPT_COLUMN
    turns = row.get(col)
    if turns is None:
        raise _missing(cfg, where, "messages")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{col}' should be a non-empty list of messages, got {turns!r:.60}.")
    return [message_dict(m, col, j, where, _keys(cfg), cfg.roles) for j, m in enumerate(turns, 1)]


def _keys(cfg: DataConfig) -> tuple[str, str]:
    return cfg.columns.role, cfg.columns.content


def message_dict(m, col: str, j: int, where: str, keys: tuple[str, str] = ("role", "content"),
                 roles: dict | None = None) -> dict:  # fmt: skip
    """One message -> {role, content[, tool_calls]}. Its keys are `keys` (data.columns.role / .content) when
    the message has them, else ShareGPT's from / value; its role name goes through `roles` (data.roles),
    then the usual OpenAI / ShareGPT names."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: message {j} in '{col}' should be an object, got {type(m).__name__}.")
    if keys[0] not in m and ("from" in m or "value" in m):
        keys = ("from", "value")
    role_key, content_key = keys
    name = str(m.get(role_key))
    role = (roles or {}).get(name) or ROLES.get(name.lower())
    call = role == "function_call" or name.lower() == "function_call"
    role = "assistant" if call else role
    if role is None:
        known = ", ".join(roles) + ", " if roles else ""
        raise DataError(
            f"{where}: message {j} in '{col}' has {role_key} {m.get(role_key)!r}; expected one of {known}"
            "system, user/human, assistant/gpt/model, function_call, observation/tool (map yours with data.roles)."
        )
    content = m.get(content_key)
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if call and isinstance(content, str):
        return {"role": "assistant", "content": "", "tool_calls": [_tool_call(content, col, j, where)]}
    if not isinstance(content, str) and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{where}: message {j} in '{col}' needs a text '{content_key}', got {content!r:.60}.")
    out = {"role": role, "content": content}
    if m.get("tool_calls"):
        out["tool_calls"] = m["tool_calls"]
    return out


def _tool_call(text: str, col: str, j: int, where: str) -> dict:
    """LLaMA-Factory's function_call value '{"name": ..., "arguments": ...}' -> an OpenAI-style tool call."""
    import json

    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: message {j} in '{col}' (function_call) is not JSON ({e.msg}).") from None
    if isinstance(call, list) and len(call) == 1:
        call = call[0]
    if not isinstance(call, dict) or "name" not in call:
        raise DataError(f"{where}: message {j} in '{col}' (function_call) needs a JSON object with a 'name'.")
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": {"name": call["name"], "arguments": args}}
