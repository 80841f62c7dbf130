"""`tunelab serve`: the OpenAI-compatible server, exercised with the official `openai` client on a tiny
base model with two tiny LoRA adapters (uvicorn in a thread on a free port)."""

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from tunelab.serve import create_app, load_served, parse_adapter
from tunelab.testing import save_tiny_model_dir, tiny_tokenizer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _lora_run(path, base_dir: str, seed: int) -> str:
    """A finished LoRA run folder (final/ with adapter, tokenizer, manifest), random non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, cfg)
    final = path / "final"
    model.save_pretrained(final)
    tiny_tokenizer().save_pretrained(final)
    manifest = {"method": "lora", "base_model": {"name": base_dir}, "stage": "sft"}
    (final / "tunelab.json").write_text(json.dumps(manifest))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(served, **limits):
    """uvicorn with create_app(served, **limits) in a thread on a free port: yields (url, app)."""
    import uvicorn

    app = create_app(served, **limits)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny_model_dir(tmp / "base")
    runs = {"a": _lora_run(tmp / "run-a", base, 1), "b": _lora_run(tmp / "run-b", base, 2)}
    served = load_served(base, [("a", runs["a"]), ("b", runs["b"])], device="cpu", name="tiny")
    with _serving(served) as (url, app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield {"client": client, "url": url, "base": base, "runs": runs, "served": served, "app": app}


@pytest.fixture(scope="module")
def plain(server):
    """The tiny base alone (no adapters), for servers started with other limits in a test."""
    return load_served(server["base"], device="cpu", name="tiny")


def _http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _local_reply(base: str, run: str | None, messages, max_new_tokens: int) -> str:
    """The same greedy generation without the server: base model, or a fresh PeftModel with one adapter."""
    from peft import PeftModel

    from tunelab.inference import generate
    from tunelab.stages.runs import load_run

    model, tok = load_run(base, device="cpu")
    if run is not None:
        model = PeftModel.from_pretrained(model, f"{run}/final").eval()
    return generate(model, tok, messages, max_new_tokens=max_new_tokens)


def test_models_lists_the_base_and_each_adapter(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == ["tiny", "a", "b"]
    assert server["client"].models.retrieve("a").id == "a"


def test_chat_selects_the_adapter_by_model_name(server):
    client = server["client"]
    replies = {}
    for model in ("tiny", "a", "b"):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.model == model
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        replies[model] = r.choices[0].message.content
    assert len(set(replies.values())) == 3, replies  # base, adapter a and adapter b answer differently
    # and each is exactly what that adapter generates on its own (greedy, fp32)
    assert replies["a"].strip() == _local_reply(server["base"], server["runs"]["a"], MESSAGES, 12)
    assert replies["tiny"].strip() == _local_reply(server["base"], None, MESSAGES, 12)


def test_chat_streaming_matches_the_plain_response(server):
    client = server["client"]
    full = client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="b", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_plain_streaming_and_stop(server):
    client = server["client"]
    r = client.completions.create(model="a", prompt="The quick brown fox", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.usage.completion_tokens <= 8 and text
    streamed = client.completions.create(model="a", prompt="The quick brown fox", max_tokens=8, temperature=0,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == text
    stop = text.strip()[1:3]  # a string that occurs in the greedy output: generation must end before it
    cut = client.completions.create(model="a", prompt="The quick brown fox", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_4xx_json_errors_and_the_server_lives_on(server):
    client, url = server["client"], server["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.status_code == 404 and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=[])
    assert e.value.status_code == 400 and "messages" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError) as e:  # more tokens than the context holds
        client.completions.create(model="a", prompt="hi", max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    for body in (b"{not json", b'{"model": "a", "messages": [{"role": "wizard", "content": "x"}]}'):
        status, reply = _http(f"{url}/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    status, reply = _http(f"{url}/v1/nothing-here")
    assert status == 404 and "error" in reply
    ok = client.chat.completions.create(model="a", messages=MESSAGES, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_adapter_argument_and_loading_errors(server, tmp_path):
    assert parse_adapter("x=runs/a") == ("x", "runs/a")
    with pytest.raises(ValueError, match="NAME=RUN"):
        parse_adapter("runs/a")
    with pytest.raises(ValueError, match="unique"):
        load_served(server["base"], [("a", server["runs"]["a"]), ("a", server["runs"]["b"])], device="cpu")
    other = save_tiny_model_dir(tmp_path / "other", seed=5)
    with pytest.raises(ValueError, match="trained on"):
        load_served(other, [("a", server["runs"]["a"])], device="cpu")
    # a run that added tokens (model.new_special_tokens) needs its own grown token table, not the shared base's
    grown = _lora_run(tmp_path / "grown", server["base"], 3)
    manifest = Path(grown) / "final" / "tunelab.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "base_model": {"name": server["base"], "new_special_tokens": ["<tool>"]}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"added tokens to the vocabulary \(<tool>\).*serve that run itself"):
        load_served(server["base"], [("g", grown)], device="cpu")


# -------------------------------------------------------------------- limits, cancellation, batching
def _raw(url: str, head: str, body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send a raw HTTP request (head without the blank line) and read the reply: (status, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and len(reply.split(b"\r\n\r\n", 1)[1]) >= _length(reply):
                break
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def _recv_until(s: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {got!r}"
        got += chunk
    return got


def _post_head(path: str, extra: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}"


@contextlib.contextmanager
def _slow(model, seconds: float):
    """Every forward pass of `model` takes at least `seconds`: requests overlap, cancellations show."""
    handle = model.register_forward_pre_hook(lambda *args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def _wait_idle(app, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while not app.state.scheduler.idle() and time.time() < deadline:
        time.sleep(0.02)
    assert app.state.scheduler.idle()


def test_an_oversized_body_gets_413_before_it_is_read(plain):
    with _serving(plain, max_body_bytes=4096) as (url, _):
        t = time.time()  # Content-Length says 50 MB; only 1 kB is ever sent: the answer cannot wait for the rest
        status, body = _raw(url, _post_head("/v1/chat/completions", "Content-Length: 50000000"), b"{" * 1000)
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        assert time.time() - t < 5
        chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"  # chunked, no length: refused once past the limit
        status, body = _raw(url, _post_head("/v1/completions", "Transfer-Encoding: chunked"), chunk * 3)
        assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
        ok = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
        assert _http(f"{url}/v1/completions", ok)[0] == 200


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenising(server, monkeypatch):
    tok = server["served"].tokenizer
    seen = []

    def guard(real):
        def call(self, text, *args, **kwargs):
            seen.append(len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text))
            assert seen[-1] < 10_000, "a huge text reached the tokenizer"
            return real(self, text, *args, **kwargs)

        return call

    for name in ("__call__", "encode", "apply_chat_template"):
        monkeypatch.setattr(type(tok), name, guard(getattr(type(tok), name)))
    huge = "word " * 100_000  # 500 kB: within the body limit, far beyond the tiny model's 256 tokens
    for model in ("tiny", "a"):
        with pytest.raises(openai.BadRequestError) as e:
            server["client"].chat.completions.create(model=model, messages=[{"role": "user", "content": huge}])
        assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model="tiny", prompt=huge)
    assert e.value.code == "context_length_exceeded" and seen == []
    r = server["client"].completions.create(model="tiny", prompt="hi " * 10, max_tokens=2)  # short ones still go
    assert r.usage.completion_tokens == 2 and seen


def test_a_client_that_goes_away_stops_its_generation(plain):
    with _serving(plain) as (url, app), _slow(plain.model, 0.01):
        scheduler = app.state.scheduler
        for stream in (True, False):  # max_tokens 200 at >= 10 ms a step: 2 s if nobody stopped it
            body = json.dumps({"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0,
                               "stream": stream}).encode()  # fmt: skip
            steps, cancelled = scheduler.steps, scheduler.finished["cancelled"]
            with socket.create_connection(url.removeprefix("http://").split(":"), timeout=10) as s:
                s.sendall(_post_head("/v1/completions", f"Content-Length: {len(body)}").encode() + b"\r\n\r\n" + body)
                if stream:
                    _recv_until(s, b"data:")  # it is generating
                else:
                    time.sleep(0.2)
            _wait_idle(app)
            assert scheduler.finished["cancelled"] == cancelled + 1
            assert scheduler.steps - steps < 100, "generation went on after the client left"


def test_unexpected_errors_get_a_generic_500_and_details_stay_in_the_log(plain, monkeypatch, caplog):
    from tunelab.models.generation import DecodeBatch

    with _serving(plain) as (url, _):
        monkeypatch.setattr(plain, "check", lambda model: (_ for _ in ()).throw(RuntimeError("secret /etc/x")))
        status, reply = _http(f"{url}/v1/models/tiny")
        assert status == 500 and reply["error"] == {"message": "internal server error", "type": "server_error",
                                                    "param": None, "code": None}  # fmt: skip
        monkeypatch.undo()
        monkeypatch.setattr(DecodeBatch, "add", lambda *a: (_ for _ in ()).throw(RuntimeError("secret shape")))
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
        status, reply = _http(f"{url}/v1/completions", json.dumps(body).encode())
        assert status == 500 and reply["error"]["message"] == "internal server error"
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/completions", headers={"content-type": "application/json"},
                                    data=json.dumps({**body, "stream": True}).encode()), timeout=30) as r:  # fmt: skip
            events = r.read().decode()
        assert "internal server error" in events and "secret" not in events and events.endswith("data: [DONE]\n\n")
        assert "secret" in caplog.text  # the details are in the server's log


def test_the_api_schema_is_off_unless_asked_for(plain):
    for docs in (False, True):
        with _serving(plain, api_docs=docs) as (url, _):
            for path in ("/openapi.json", "/docs", "/redoc"):
                try:
                    status = urllib.request.urlopen(url + path, timeout=10).status
                except urllib.error.HTTPError as e:
                    status = e.code
                assert status == (200 if docs else 404), (path, docs)


def test_concurrent_requests_are_batched_with_the_outputs_of_each_alone(server):
    """Greedy requests of different models, lengths, max_tokens and stop strings: run one at a time, then
    all at once (joining a running batch at different steps); the answers are identical."""
    import concurrent.futures

    url, app = server["url"], server["app"]
    first = _http(f"{url}/v1/completions", json.dumps({"model": "a", "prompt": "The quick brown fox",
                                                       "max_tokens": 12, "temperature": 0}).encode())[1]  # fmt: skip
    stop = first["choices"][0]["text"].strip()[2:4]
    requests = [
        ("/v1/completions", {"model": "a", "prompt": "The quick brown fox", "max_tokens": 12, "stop": [stop]}),
        ("/v1/completions", {"model": "a", "prompt": "Once upon a time there was", "max_tokens": 20}),
        ("/v1/completions", {"model": "a", "prompt": "abc", "max_tokens": 5}),
        ("/v1/chat/completions", {"model": "a", "messages": MESSAGES, "max_tokens": 16}),
        (
            "/v1/chat/completions",
            {
                "model": "a",
                "messages": [{"role": "user", "content": "Give three tips " * 4}],
                "max_tokens": 9,
                "stop": "ab",
            },
        ),  # fmt: skip
        ("/v1/chat/completions", {"model": "b", "messages": MESSAGES, "max_tokens": 7}),
        ("/v1/completions", {"model": "tiny", "prompt": "Translate to German: good morning", "max_tokens": 10}),
        ("/v1/completions", {"model": "a", "prompt": "system user assistant", "max_tokens": 15}),
    ]

    def ask(i: int) -> dict:
        time.sleep(0.01 * i)  # arrive while the earlier ones are running
        path, body = requests[i]
        status, reply = _http(url + path, json.dumps({**body, "temperature": 0}).encode())
        assert status == 200, reply
        choice = reply["choices"][0]
        return {"text": choice.get("text", (choice.get("message") or {}).get("content")),
                "finish": choice["finish_reason"], "tokens": reply["usage"]["completion_tokens"]}  # fmt: skip

    alone = [ask(i) for i in range(len(requests))]
    assert alone[0]["finish"] == "stop" and alone[1]["finish"] == "length"
    app.state.scheduler.peak = 0
    with _slow(server["served"].model, 0.005), concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, range(len(requests))))
    assert together == alone
    assert app.state.scheduler.peak >= 3  # they did share forward passes


def test_a_full_queue_gets_503(plain):
    def open_stream(url: str) -> socket.socket:
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 100, "stream": True}).encode()
        s = socket.create_connection(url.removeprefix("http://").split(":"), timeout=10)
        s.sendall(_post_head("/v1/completions", f"Content-Length: {len(body)}").encode() + b"\r\n\r\n" + body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")  # admitted or waiting: the stream has started
        return s

    with _serving(plain, max_batch=1, max_queue=1) as (url, app), _slow(plain.model, 0.02):
        running, waiting = open_stream(url), open_stream(url)  # one in the batch, one in the queue
        status, reply = _http(f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": "hi"}).encode())
        assert status == 503 and reply["error"]["code"] == "server_busy"
        running.close(), waiting.close()
        _wait_idle(app)
        assert _http(f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": "hi"}).encode())[0] == 200


def test_dtype_serves_the_weights_in_the_type_asked(server):
    """A bf16 full fine-tuning run loads as its fp32 master weights: --dtype bfloat16 serves it at half the memory
    (and answers). A type it does not know is refused before the model loads."""
    import torch

    from tunelab.serve import ServeError

    half = load_served(server["base"], device="cpu", name="tiny", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_served(server["base"], device="cpu").model.parameters()} == {torch.float32}
    with _serving(half) as (url, _):
        status, reply = _http(
            f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode()
        )
    assert status == 200 and reply["choices"][0]["text"] is not None
    with pytest.raises(ServeError, match="--dtype 'int8'"):
        load_served(server["base"], device="cpu", dtype="int8")
