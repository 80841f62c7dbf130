"""`tunelab serve`: an OpenAI-compatible HTTP endpoint for a run (or any model), with LoRA adapters.

    tunelab serve runs/sft-lora                                   # one model
    tunelab serve smollm2-135m-instruct --adapter alpaca=runs/a --adapter lima=runs/b

Endpoints (the subset of OpenAI's API that plain text generation needs): GET /v1/models,
POST /v1/completions, POST /v1/chat/completions, both with `stream: true` as server-sent events
in OpenAI's chunk format, ending with `data: [DONE]`. The official `openai` client works with
`base_url="http://127.0.0.1:8000/v1"` and any api_key.

Several LoRA (or IA3) adapters trained on the same base share one copy of it: they are loaded into
one PEFT model (`load_adapter`), and the request's `model` field picks one (`set_adapter`), or the
plain base when it names the served model itself.

Concurrent requests are batched: one scheduler thread owns the model and runs all running requests of
one model id in shared forward passes, new requests joining between steps (scheduler.py). A request
whose client disconnects stops generating at the next step.

What a request may cost is bounded: the body size (413, decided before the JSON is parsed), the prompt
against the context (checked on its length in characters before tokenising, then exactly), the number
of waiting requests (503). Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param",
"code"}}: invalid JSON or fields -> 400, unknown model -> 404, anything unexpected -> 500 with a generic
message (the details go to the server log); the server keeps running. The API schema (/openapi.json,
/docs, /redoc) is off unless asked for. Binds to 127.0.0.1 unless told otherwise: nothing here
authenticates requests.

    app.py        limits, endpoints, responses        scheduler.py  the batching thread and its jobs
    served.py     the model and its adapters          protocol.py   request models, errors, stop strings
"""

from __future__ import annotations

import logging

from tunelab.serve.app import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, create_app
from tunelab.serve.protocol import APIError
from tunelab.serve.served import Served, ServeError, adapter_methods, load_served, parse_adapter

__all__ = [
    "APIError", "ServeError", "Served", "adapter_methods", "check_limits", "create_app", "load_served", "parse_adapter",
    "serve",
]  # fmt: skip


def serve(spec: str, adapters: list[tuple[str, str]] = (), host: str = "127.0.0.1", port: int = 8000,
          name: str | None = None, device: str = "auto", trust_remote_code: bool = False,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
          max_batch: int = DEFAULT_MAX_BATCH, api_docs: bool = False, dtype: str = "auto") -> None:  # fmt: skip
    import uvicorn

    check_limits(port=port, max_body_bytes=max_body_bytes, max_queue=max_queue, max_batch=max_batch)
    served = load_served(spec, adapters, device=device, name=name, trust_remote_code=trust_remote_code, dtype=dtype)
    app = create_app(served, max_body_bytes=max_body_bytes, max_queue=max_queue, max_batch=max_batch,
                     api_docs=api_docs)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    print(f"serving {', '.join(served.ids())} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


def check_limits(port: int, max_body_bytes: int, max_queue: int, max_batch: int) -> None:
    """Refuse settings the server cannot run with, before the model loads (a bad port would otherwise fail
    at bind, after loading, with a traceback from the event loop)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port}: a TCP port is 0-65535 (0 = any free port)")
    for flag, value in (("--max-body-bytes", max_body_bytes), ("--max-queue", max_queue), ("--max-batch", max_batch)):
        if value < 1:
            raise ServeError(f"{flag} {value}: must be 1 or more")
