"""The request side of OpenAI's API that the server speaks: request models, errors, stop strings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.inference import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

# A chat request without max_tokens gets tunelab's one default (OpenAI's chat API sets none: it runs to
# the context's end). A legacy /v1/completions request keeps OpenAI's documented 16: clients written for
# that endpoint rely on it (and send max_tokens when they want more), so it is deliberately not ours.
DEFAULT_CHAT_MAX_TOKENS = DEFAULT_MAX_NEW_TOKENS
COMPLETIONS_MAX_TOKENS = 16


class APIError(Exception):
    """An error the client sees, in OpenAI's shape; its message must never carry internal details."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (penalties, user ...)

    model: str
    # tunelab's one default (greedy), not OpenAI's 1.0: the server answers as `tunelab generate` does
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream_options: dict | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(COMPLETIONS_MAX_TOKENS, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    return stops


def text_content(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may be the start of a stop string: not sent yet."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep
