"""`tunelab serve`: an OpenAI-compatible HTTP endpoint for a run (or any model), with LoRA adapters.

    tunelab serve runs/sft-lora                                   # one model
    tunelab serve smollm2-135m-instruct --adapter alpaca=runs/a --adapter lima=runs/b

Endpoints (the subset of OpenAI's API that plain text generation needs): GET /v1/models,
POST /v1/completions, POST /v1/chat/completions, both with `stream: true` as server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`. The official `openai` client works with
`base_url="http://127.0.0.1:8000/v1"` and any api_key.

Several LoRA (or IA3) adapters trained on the same base share one copy of it: they are loaded into
one PEFT model (`load_adapter`), and the request's `model` field picks one (`set_adapter`), or the
plain base when it names the served model itself. Switching is instant, but it changes the model
for everyone, so requests are generated one at a time (a lock); this is a tool for trying and
comparing results, not a high-throughput server (use vLLM or llama.cpp's server for that, on the
exported files).

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: invalid JSON or
fields -> 400, unknown model -> 404, anything unexpected -> 500; the server keeps running.
Binds to 127.0.0.1 unless told otherwise: nothing here authenticates requests.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_CHAT_MAX_TOKENS = 256


def adapter_methods() -> list[str]:
    """The methods whose result is a PEFT adapter over the untouched, unquantized base and without virtual
    tokens (lora, ia3): several of them load side by side on one served base."""
    from tunelab.methods.registry import capabilities, names

    caps = {n: capabilities(n) for n in names()}
    return [n for n, c in caps.items() if c.reference == "adapter_off" and not c.virtual_tokens and not c.quantized_base]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"


# -------------------------------------------------------------------------------------- models
class Served:
    """The model(s) behind the endpoint: a base model and optional named PEFT adapters on it."""

    def __init__(self, model, tokenizer, name: str, adapters: list[str] | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapters = list(adapters or [])
        self.lock = threading.Lock()
        self.created = int(time.time())

    def ids(self) -> list[str]:
        return [self.name, *self.adapters]

    def check(self, model_id: str) -> None:
        if model_id not in self.ids():
            raise APIError(404, f"The model '{model_id}' does not exist; served: {', '.join(self.ids())}",
                           param="model", code="model_not_found")  # fmt: skip

    @contextlib.contextmanager
    def selected(self, model_id: str):
        """Hold the model with `model_id` active (the lock keeps other requests out meanwhile)."""
        with self.lock:
            if not self.adapters:
                yield self.model
            elif model_id == self.name:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(model_id)
                yield self.model

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def _default_name(spec: str) -> str:
    p = Path(spec.rstrip("/"))
    if p.name == "final":
        p = p.parent
    return p.name if p.exists() else spec


def load_served(spec: str, adapters: list[tuple[str, str]] = (), device: str = "auto", name: str | None = None,
                trust_remote_code: bool = False):
    """Load `spec` (run folder or model spec) merged, and each (name, run) LoRA adapter on top."""
    from tunelab.models import resolve
    from tunelab.stages.runs import load_run, result_dir, run_manifest

    model, tokenizer = load_run(spec, device=device, merge=True, trust_remote_code=trust_remote_code)
    name = name or _default_name(spec)
    names = [a for a, _ in adapters]
    if len(set(names)) != len(names) or name in names:
        raise ValueError(f"adapter names must be unique and differ from the served model's name {name!r}: {names}")
    main = run_manifest(spec)
    if adapters and hasattr(model, "peft_config"):
        raise ValueError(f"{spec}: its method keeps PEFT modules unmerged; serve adapters over a plain base model")
    if adapters:
        from peft import PeftModel

        base = resolve(main["base_model"]["name"]) if main else resolve(spec)
        for i, (aname, arun) in enumerate(adapters):
            final, manifest = result_dir(arun), run_manifest(arun)
            if manifest is None or manifest.get("method") not in adapter_methods():
                raise ValueError(
                    f"--adapter {aname}={arun}: not a finished {' / '.join(adapter_methods())} run "
                    f"(found method {manifest and manifest.get('method')!r}); other methods: serve the run itself"
                )
            if resolve(manifest["base_model"]["name"]) != base:
                raise ValueError(
                    f"--adapter {aname}={arun}: trained on {manifest['base_model']['name']!r}, but the served base "
                    f"is {spec!r}; serve that base model instead"
                )
            if i == 0:
                model = PeftModel.from_pretrained(model, str(final), adapter_name=aname)
            else:
                model.load_adapter(str(final), adapter_name=aname)
        model.eval()
    return Served(model, tokenizer, name, names)


# ------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (penalties, user ...)

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream_options: dict | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
    return stops


def _text_content(m: ChatMessage, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


# ---------------------------------------------------------------------------------- generation
def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may be the start of a stop string: not sent yet."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def generate_stream(served: Served, model_id: str, ids: list[int], max_tokens: int, req: _Request, result: dict):
    """Yield the completion text piece by piece; fill `result` with finish_reason and token counts.

    tunelab's generate (models/generation.py) runs in a worker thread and hands decoded text over a
    TextIteratorStreamer. Stop strings end generation inside generate (`stop_strings`) and are cut from
    the text here.
    """
    import torch
    from transformers import TextIteratorStreamer

    from tunelab.models.generation import generate

    tok = served.tokenizer
    stops = _stops(req.stop)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
    out: dict = {}

    def work():
        try:
            with served.selected(model_id) as model:
                if req.seed is not None:
                    torch.manual_seed(req.seed)
                gen = generate(model, tok, [ids], max_new_tokens=max_tokens, temperature=req.temperature,
                               top_p=req.top_p, stop_strings=stops, streamer=streamer)  # fmt: skip
                out["ids"] = gen.tokens[0].tolist()
        except Exception as e:  # noqa: BLE001 - reported to the client, the server lives on
            out["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text, sent, stopped = "", 0, False
    for piece in streamer:
        if stopped:
            continue  # drain: generate ends by itself at the stop string
        text += piece
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            text, stopped = text[: min(cuts)], True
        safe = len(text) if stopped else len(text) - _holdback(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    thread.join()
    if "error" in out:
        raise APIError(500, f"generation failed: {type(out['error']).__name__}: {out['error']}")
    if len(text) > sent:
        yield text[sent:]
    new = out["ids"]
    hit_eos = bool(new) and new[-1] == tok.eos_token_id
    result.update(
        finish_reason="stop" if stopped or hit_eos or len(new) < max_tokens else "length",
        prompt_tokens=len(ids),
        completion_tokens=len(new),
    )


def _budget(served: Served, ids: list[int], requested: int | None, default: int | None) -> int:
    ctx = served.context_length
    room = ctx - len(ids) if ctx else None
    if room is not None and room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {ctx}",
                       param="messages", code="context_length_exceeded")  # fmt: skip
    if requested is not None:
        if room is not None and requested > room:
            raise APIError(400, f"max_tokens {requested} + prompt {len(ids)} tokens exceed the context of {ctx}",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        return requested
    return min(default or room or DEFAULT_CHAT_MAX_TOKENS, room or DEFAULT_CHAT_MAX_TOKENS)


# ----------------------------------------------------------------------------------------- app
def create_app(served: Served):
    """The FastAPI application for `served` (run it with uvicorn, or use `serve`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None)

    def error(status, message, type_="invalid_request_error", param=None, code=None):
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
        first_loc = [str(p) for p in (e.errors() or [{}])[0].get("loc", ()) if p != "body"]
        return error(400, "invalid request: " + "; ".join(problems), param=".".join(first_loc) or None)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        return error(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": served.created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card(m) for m in served.ids()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        served.check(model_id)
        return model_card(model_id)

    def respond(req: _Request, ids: list[int], max_tokens: int, chat: bool):
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        result: dict = {}
        pieces = generate_stream(served, req.model, ids, max_tokens, req, result)

        def usage():
            p, c = result["prompt_tokens"], result["completion_tokens"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        if not req.stream:
            text = "".join(pieces)
            choice = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice],
                    "usage": usage()}  # fmt: skip

        def chunk(delta=None, text=None, finish=None, choices=True):
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            c.update({"delta": delta} if chat else {"text": text})
            body = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": req.model,
                    "choices": [c] if choices else []}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        def events():
            try:
                if chat:
                    yield chunk(delta={"role": "assistant", "content": ""})
                for piece in pieces:
                    yield chunk(delta={"content": piece}, text=piece)
                yield chunk(delta={}, text="", finish=result["finish_reason"])
                if (req.stream_options or {}).get("include_usage"):
                    yield chunk(choices=False).replace(
                        '"choices": []', f'"choices": [], "usage": {json.dumps(usage())}'
                    )
            except APIError as e:  # the status line is gone: report the error as the last event
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def common(req: _Request):
        served.check(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        _stops(req.stop)

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        common(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: send one prompt per request", param="prompt")
        ids = served.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        return respond(req, ids, _budget(served, ids, req.max_tokens, None), chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        from tunelab.data import DataError, build_prompt_ids

        common(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_content(m, i)}
                    for i, m in enumerate(req.messages)]  # fmt: skip
        try:
            ids = build_prompt_ids(messages, served.tokenizer)
        except DataError as e:
            raise APIError(400, str(e), param="messages") from None
        requested = req.max_completion_tokens or req.max_tokens
        return respond(req, ids, _budget(served, ids, requested, DEFAULT_CHAT_MAX_TOKENS), chat=True)

    return app


def serve(spec: str, adapters: list[tuple[str, str]] = (), host: str = "127.0.0.1", port: int = 8000,
          name: str | None = None, device: str = "auto", trust_remote_code: bool = False) -> None:  # fmt: skip
    import uvicorn

    served = load_served(spec, adapters, device=device, name=name, trust_remote_code=trust_remote_code)
    print(f"serving {', '.join(served.ids())} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(served), host=host, port=port, log_level="info")


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise ValueError(f"--adapter {text!r}: write NAME=RUN, e.g. --adapter alpaca=runs/sft-lora")
    return name, run
