"""`tunelab push RUN REPO_ID`: with huggingface_hub's HfApi recorded (the Hub is out of reach here) the repo id,
branch and every file of final/ (or of the merged model) reach create_repo / create_commit, the card names the
repo; a run without final/, a missing token, a refusing and an unreachable Hub are one named line each."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.export.push import PushError, push


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("push")
    data = root / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n" for i in range(16))
    )
    cfg = load_config({"output_dir": str(root / "run"), "model": {"name": tiny_dir},
                       "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
                       "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                       "training": {"max_steps": 3, "batch_size": 4, "lr": 2e-2, "progress": False, "report_to": []}})  # fmt: skip
    tunelab.train(cfg)
    return root / "run"


@pytest.fixture()
def hub(monkeypatch):
    """HfApi's calls recorded, each file's bytes read while the call runs (a merged model's folder is temporary)."""
    from huggingface_hub import HfApi

    calls = []

    def create_commit(self, repo_id, operations, **kw):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
        calls.append(("create_commit", repo_id, {**kw, "files": files}))
        return type("CommitInfo", (), {"commit_url": f"https://hub.invalid/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(
        HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("create_branch", repo_id, kw))
    )
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    return calls


def test_push_uploads_final_with_a_card_naming_the_repo(run, hub, capsys):
    assert main(["push", str(run), "me/tiny-lora", "--private", "--revision", "v1"]) == 0
    report = json.loads(capsys.readouterr().out)
    (c0, repo, kw0), (c1, _, kw1), (c2, _, kw2) = hub
    assert (c0, repo, kw0["private"], kw0["exist_ok"]) == ("create_repo", "me/tiny-lora", True, True)
    assert (c1, kw1["branch"]) == ("create_branch", "v1") and (c2, kw2["revision"]) == ("create_commit", "v1")
    final = run / "final"
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    sent = kw2["files"]
    assert sorted(sent) == sorted(local) == report["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "tunelab.json", "README.md"} <= set(sent)
    assert all(sent[f] == local[f] for f in local if f != "README.md")
    card, local_card = sent["README.md"].decode(), local["README.md"].decode()
    assert f'PeftModel.from_pretrained(base, "{run}/final")' in local_card
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in card and f'"{run}/final"' not in card
    assert report["repo_id"] == "me/tiny-lora" and report["revision"] == "v1"


def test_push_merged_uploads_a_transformers_model_equal_to_the_merged_run(run, hub, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.stages.runs import load_run

    report = push(str(run), "me/tiny-merged", what="merged")
    (_, _, kw), *_ = [c for c in hub if c[0] == "create_commit"]
    assert report["files"] == sorted(kw["files"]) and kw["revision"] is None
    for name, content in kw["files"].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    assert "tunelab.json" not in kw["files"] and "adapter_config.json" not in kw["files"]
    card = kw["files"]["README.md"].decode()
    assert "library_name: transformers" in card and 'from_pretrained("me/tiny-merged")' in card
    uploaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    merged, _ = load_run(str(run), device="cpu", merge=True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(uploaded(ids).logits, merged.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_named_errors_before_any_upload(run, hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    assert main(["push", str(tmp_path), "me/x"]) == 2  # no final/
    assert "no final/ folder" in capsys.readouterr().err

    not_peft = tmp_path / "full"
    shutil.copytree(run, not_peft)
    (not_peft / "final" / "adapter_config.json").unlink()  # what a full fine-tune's final/ lacks
    assert main(["push", str(not_peft), "me/x", "--what", "adapter"]) == 2
    assert "saved no PEFT adapter; push --what final" in capsys.readouterr().err

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(run), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token: set HF_TOKEN" in err and "hf auth login" in err and len(err.splitlines()) == 1
    assert hub == []  # nothing reached the Hub


class Refuse401(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST

    def log_message(self, *args):
        pass


def test_a_refusing_and_an_unreachable_hub_are_named(run, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse401)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(PushError, match=r"the Hub refused create_repo \(the token was not accepted"):
            push(str(run), "me/x", token="hf_bad", endpoint=endpoint)
    finally:
        server.shutdown()
        server.server_close()
    closed = endpoint  # nothing listens there now
    with pytest.raises(PushError, match=r"cannot reach the Hub \(.*\); check the network, HF_ENDPOINT") as e:
        push(str(run), "me/x", token="hf_bad", endpoint=closed)
    assert len(str(e.value).splitlines()) == 1


def test_a_hub_that_accepts_and_never_answers_times_out(run, monkeypatch, capsys):
    """A listening socket nobody reads: the connection opens, the request goes out, no answer ever comes."""
    import socket
    import time

    from huggingface_hub import get_session

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    silent = socket.create_server(("127.0.0.1", 0))  # listens; the kernel completes connections, nothing accept()s
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    before = get_session().timeout
    try:
        start = time.monotonic()
        with pytest.raises(PushError, match=r"the Hub did not answer create_repo within 1 s .*--timeout SECONDS") as e:
            push(str(run), "me/x", token="hf_bad", endpoint=endpoint, timeout=1)
        assert time.monotonic() - start < 30 and len(str(e.value).splitlines()) == 1
        assert get_session().timeout == before  # the shared client is handed back as it was
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
        assert main(["push", str(run), "me/x", "--token", "hf_bad", "--timeout", "0.5"]) == 2
        assert "did not answer create_repo within 0.5 s" in capsys.readouterr().err
    finally:
        silent.close()
