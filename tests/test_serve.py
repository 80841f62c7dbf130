"""`tunelab serve`: the OpenAI-compatible server, exercised with the official `openai` client on a tiny
base model with two tiny LoRA adapters (uvicorn in a thread on a free port)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    tmp = tmp_path_factory.mktemp("serve")
    base = save_tiny_model_dir(tmp / "base")
    runs = {"a": _lora_run(tmp / "run-a", base, 1), "b": _lora_run(tmp / "run-b", base, 2)}
    served = load_served(base, [("a", runs["a"]), ("b", runs["b"])], device="cpu", name="tiny")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "server did not start"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    yield {"client": client, "url": f"http://127.0.0.1:{port}", "base": base, "runs": runs}
    srv.should_exit = True
    thread.join(timeout=10)


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
