"""`tunelab push RUN REPO_ID`: a finished run's result uploaded to a Hugging Face Hub model repo, through
huggingface_hub (`HfApi.create_repo`, then one `create_commit` of the files).

What goes up (`what`): `final` — the run's final/ folder as it is (the method's format: a PEFT adapter or a
model folder, the tokenizer, tunelab.json and the model card README.md); `adapter` — the same, refused unless
final/ holds a PEFT adapter; `merged` — the method merged into the base weights (`tunelab export --format hf`),
a plain transformers folder with its own card. The card's loading code names the repo instead of the local
folder. The token: `token`, else huggingface_hub's own (HF_TOKEN, or what `hf auth login` stored).
`timeout`: seconds the Hub may stay silent on one connect, read or write before the push stops with a PushError
(huggingface_hub's shared HTTP client waits forever by default).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from tunelab.config import load_config
from tunelab.export.hf import load_merged, write_hf
from tunelab.stages.runs import result_dir
from tunelab.training.card import CARD_FILE, card_for_repo, model_card, saved_format

WHAT = ("final", "adapter", "merged")
DEFAULT_TIMEOUT = 60.0  # seconds without a byte; a large file still uploads as long as it moves


class PushError(Exception):
    """A run that cannot be pushed, or a Hub that cannot be reached or refused: the message says which and why."""


def push(run: str, repo_id: str, what: str = "final", private: bool = False, revision: str | None = None,
         token: str | None = None, endpoint: str | None = None, device: str = "cpu",
         trust_remote_code: bool = False, timeout: float = DEFAULT_TIMEOUT) -> dict:  # fmt: skip
    """Upload the run's result to `repo_id` (created if missing; `private` applies to a new repo), on branch
    `revision` (created from main if missing). Returns {repo_id, what, revision, files, commit_url}."""
    from huggingface_hub import HfApi, get_session, get_token

    if what not in WHAT:
        raise PushError(f"--what {what!r}: choose {', '.join(WHAT)}")
    if not timeout > 0:
        raise PushError(f"--timeout {timeout}: give the seconds the Hub may stay silent, more than 0")
    final = result_dir(run)
    if final is None or final.name != "final":
        raise PushError(
            f"{run}: no final/ folder with a result (tunelab.json): push a finished run; an interrupted one "
            "finishes with `tunelab train CONFIG --resume`"
        )
    if what == "adapter" and saved_format(final) != "peft":
        method = json.loads((final / "tunelab.json").read_text()).get("method")
        raise PushError(f"{run}: --what adapter, but method {method!r} saved no PEFT adapter; push --what final "
                        "(its own format) or --what merged (a plain transformers model)")  # fmt: skip
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN, log in once with `hf auth login`, or pass --token "
            "(a token with write access: https://huggingface.co/settings/tokens)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    where = f" to {repo_id} on {api.endpoint}"
    # HfApi's calls go through huggingface_hub's one shared client, made with timeout=None: give it ours for
    # this push, then hand it back as it was (the Python API shares the process with the caller's own calls)
    session = get_session()
    before, session.timeout = session.timeout, timeout
    try:
        return _upload(api, where, run, final, repo_id, what, private, revision, device, trust_remote_code, timeout)
    finally:
        session.timeout = before


def _upload(api, where, run, final, repo_id, what, private, revision, device, trust_remote_code, timeout) -> dict:
    from huggingface_hub import CommitOperationAdd

    hub_call(where, api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model", timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="tunelab-push-") as tmp:
        folder, card = (merged_folder(run, final, repo_id, Path(tmp), device, trust_remote_code) if what == "merged"
                        else (final, final_card(final, repo_id)))  # fmt: skip
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        files = [f for f in files if f != CARD_FILE]
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
        if card is not None:
            operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
            files.append(CARD_FILE)
        if revision:
            hub_call(where, api.create_branch, repo_id, branch=revision, exist_ok=True, repo_type="model",
                     timeout=timeout)  # fmt: skip
        commit = hub_call(where, api.create_commit, repo_id, operations, repo_type="model", revision=revision,
                          commit_message=f"Upload {Path(run).resolve().name} ({what}) with tunelab push",
                          timeout=timeout)  # fmt: skip
    return {"repo_id": repo_id, "what": what, "revision": revision or "main", "files": sorted(files),
            "commit_url": getattr(commit, "commit_url", None)}  # fmt: skip


def final_card(final: Path, repo_id: str) -> str | None:
    """final/README.md with its loading code naming the repo (None: the result has no card)."""
    card = final / CARD_FILE
    if not card.is_file():
        return None
    config = final.parent / "config.yaml"
    output_dir = (yaml.safe_load(config.read_text()) or {}).get("output_dir") if config.is_file() else None
    return card_for_repo(card.read_text(), output_dir, repo_id) if output_dir else card.read_text()


def merged_folder(run: str, final: Path, repo_id: str, tmp: Path, device: str, trust_remote_code: bool):
    """(folder, card) of the merged model: `tunelab export --format hf` into `tmp`, and a card for it."""
    model, tokenizer, manifest = load_merged(
        str(final.parent), device=device, trust_remote_code=trust_remote_code, upcast=True
    )  # as `tunelab export --format hf`: f32 files, the update merged in fp32
    folder = write_hf(model, tokenizer, tmp / "merged")
    config = final.parent / "config.yaml"
    if not config.is_file():
        return folder, None
    # the run's own config, for the card only: a tracker of report_to need not be installed where it is pushed
    cfg = load_config(config, overrides=["training.report_to=[]"])
    results = final.parent / "results.json"
    metrics = json.loads(results.read_text()) if results.is_file() else {}
    return folder, model_card(cfg, folder, model, metrics, manifest, where=repo_id)


def hub_call(where: str, fn, *args, timeout: float = DEFAULT_TIMEOUT, **kwargs):
    """`fn` of HfApi; its failures as one PushError line: refused (the HTTP status and the Hub's message),
    silent for `timeout` seconds, or unreachable (the connection error)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {401: " (the token was not accepted: check HF_TOKEN / `hf auth login`)",
                403: " (the token may lack write access to this namespace)"}.get(status, "")  # fmt: skip
        raise PushError(f"push{where}: the Hub refused {fn.__name__}{hint}: {first_line(e)}") from None
    except Exception as e:
        if not connection_error(e):
            raise
        if timed_out(e):
            raise PushError(
                f"push{where}: the Hub did not answer {fn.__name__} within {timeout:g} s ({type(e).__name__}); "
                "try again later, or allow longer with --timeout SECONDS"
            ) from None
        raise PushError(
            f"push{where}: cannot reach the Hub ({type(e).__name__}: {first_line(e)}); check the network, "
            "HF_ENDPOINT, and that HF_HUB_OFFLINE is not set"
        ) from None


def connection_error(e: BaseException) -> bool:
    """A network failure: Python's own, or one of the HTTP client huggingface_hub runs on (httpx and its kin)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for c in type(e).__mro__)  # fmt: skip


def timed_out(e: BaseException) -> bool:
    """A connect / read / write / pool timeout of the HTTP client, or Python's own."""
    return isinstance(e, TimeoutError) or any(c.__name__.endswith("Timeout") or c.__name__ == "TimeoutException"
                                              for c in type(e).__mro__)  # fmt: skip


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
