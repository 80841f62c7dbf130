"""The FastAPI application: limits on what a request may cost, the endpoints, the responses."""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, imported
# inside create_app) at definition time.

import asyncio
import contextlib
import json
import logging
import time
import uuid

from tunelab.models.generation import Sampler
from tunelab.serve.protocol import (
    DEFAULT_CHAT_MAX_TOKENS,
    APIError,
    ChatRequest,
    CompletionRequest,
    stop_list,
    text_content,
)
from tunelab.serve.scheduler import Job, Scheduler
from tunelab.serve.served import Served

log = logging.getLogger("tunelab.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # ~1M tokens of text: far above any context served here
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BATCH = 32


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ------------------------------------------------------------------------------------ limits
class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` gets 413 before any of it is parsed.

    A Content-Length above the limit is refused without reading the body; a chunked body is read up to
    the limit and refused as soon as it passes it. The 413 closes the connection, so the rest of a huge
    upload is never read. A body within the limit is handed on to the app unchanged."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(send)
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, send):
        payload = json.dumps(error_body(f"request body larger than {self.max_bytes} bytes",
                                        code="request_too_large")).encode()  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(body: bytes, receive):
    """An ASGI receive that gives the buffered body once, then the connection's own events (disconnect)."""
    first = True

    async def replay():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def check_prompt_chars(served: Served, chars: int, requested: int | None, param: str) -> None:
    """Refuse a prompt that cannot fit before tokenising it: it has at least chars / longest-token tokens."""
    ctx = served.context_length
    if not ctx:
        return
    least = -(-chars // served.max_token_chars)
    if least + (requested or 1) > ctx:
        raise APIError(400, f"the prompt has {chars} characters, at least {least} tokens; this model's context "
                       f"is {ctx}", param=param, code="context_length_exceeded")  # fmt: skip


def budget(served: Served, ids: list[int], requested: int | None, default: int | None) -> int:
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


# ----------------------------------------------------------------------------------- the jobs
def start_job(scheduler: Scheduler, req, ids: list[int], max_tokens: int) -> tuple[Job, asyncio.Queue]:
    """Queue a job for `req`; its events arrive on the returned asyncio queue (503 if the queue is full)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(kind: str, value) -> None:  # called on the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    sampler = Sampler(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
    job = Job(req.model, ids, max_tokens, sampler, stop_list(req.stop), emit)
    scheduler.submit(job)
    return job, events


async def cancel_on_disconnect(request, job: Job) -> None:
    """Cancel `job` once the client has gone (uvicorn reports http.disconnect; the caller cancels this
    task when the response is done)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def job_events(events: asyncio.Queue):
    while True:
        kind, value = await events.get()
        yield kind, value
        if kind != "text":
            return


# ----------------------------------------------------------------------------------------- app
def create_app(served: Served, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               max_batch: int = DEFAULT_MAX_BATCH, api_docs: bool = False):  # fmt: skip
    """The FastAPI application for `served` (run it with uvicorn, or use `serve`); its scheduler thread
    starts now and stops with the application. `api_docs` publishes /openapi.json, /docs and /redoc."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from tunelab.data import DataError, build_prompt_ids

    scheduler = Scheduler(served, max_batch=max_batch, max_queue=max_queue).start()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.stop()

    docs = dict(docs_url="/docs", redoc_url="/redoc", openapi_url="/openapi.json") if api_docs else \
        dict(docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    app = FastAPI(title="tunelab", lifespan=lifespan, **docs)
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    def error(status, message, type_="invalid_request_error", param=None, code=None):
        return JSONResponse(error_body(message, type_, param, code), status_code=status)

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
        # The details (paths, shapes, library internals) go to the server log, never to the client.
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error(500, "internal server error", type_="server_error")

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": served.created, "owned_by": "tunelab"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card(m) for m in served.ids()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str):
        served.check(model_id)
        return model_card(model_id)

    async def respond(request: Request, req, ids: list[int], max_tokens: int, chat: bool):
        job, events = start_job(scheduler, req, ids, max_tokens)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))

        def done():  # the response is over, finished or not: stop watching, and stop generating
            watcher.cancel()
            job.cancel()

        reply = Reply(req, chat)
        if not req.stream:
            try:
                text, usage = "", None
                async for kind, value in job_events(events):
                    if kind == "error":
                        raise APIError(500, "internal server error")
                    text, usage = (text + value, usage) if kind == "text" else (text, value)
            finally:
                done()
            return reply.whole(text, usage)

        async def stream():
            try:
                if chat:
                    yield reply.chunk(delta={"role": "assistant", "content": ""})
                async for kind, value in job_events(events):
                    if kind == "text":
                        yield reply.chunk(delta={"content": value}, text=value)
                    elif kind == "end":
                        yield reply.chunk(delta={}, text="", finish=value["finish_reason"])
                        if (req.stream_options or {}).get("include_usage"):
                            yield reply.chunk(usage=value)
                    else:  # the status line is gone: report the error as the last event
                        yield f"data: {json.dumps({'error': {'message': 'internal server error', 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                done()

        return StreamingResponse(stream(), media_type="text/event-stream")

    def common(req) -> None:
        served.check(req.model)
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        stop_list(req.stop)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        common(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: send one prompt per request", param="prompt")
        check_prompt_chars(served, len(prompts[0]), req.max_tokens, param="prompt")
        ids = await run_in_threadpool(served.tokenizer.encode, prompts[0], add_special_tokens=False)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        return await respond(request, req, ids, budget(served, ids, req.max_tokens, None), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        common(req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": text_content(m, i)}
                    for i, m in enumerate(req.messages)]  # fmt: skip
        requested = req.max_completion_tokens or req.max_tokens
        check_prompt_chars(served, sum(len(m["content"]) for m in messages), requested, param="messages")
        try:
            ids = await run_in_threadpool(build_prompt_ids, messages, served.tokenizer)
        except DataError as e:
            raise APIError(400, str(e), param="messages") from None
        return await respond(request, req, ids, budget(served, ids, requested, DEFAULT_CHAT_MAX_TOKENS), chat=True)

    return app


class Reply:
    """The response bodies of one request, in OpenAI's shapes (whole, or server-sent event chunks)."""

    def __init__(self, req, chat: bool):
        self.req, self.chat = req, chat
        self.kind = "chat.completion" if chat else "text_completion"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    @staticmethod
    def usage(end: dict) -> dict:
        p, c = end["prompt_tokens"], end["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def whole(self, text: str, end: dict) -> dict:
        choice = {"index": 0, "finish_reason": end["finish_reason"], "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.req.model,
                "choices": [choice], "usage": self.usage(end)}  # fmt: skip

    def chunk(self, delta=None, text=None, finish=None, usage=None) -> str:
        body = {"id": self.id, "object": self.kind + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.req.model, "choices": []}  # fmt: skip
        if usage is not None:
            body["usage"] = self.usage(usage)
        else:
            c = {"index": 0, "logprobs": None, "finish_reason": finish}
            c.update({"delta": delta} if self.chat else {"text": text})
            body["choices"] = [c]
        return f"data: {json.dumps(body)}\n\n"
