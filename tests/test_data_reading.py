"""A reading of the data kept between two steps of one run (check before the model loads, build after) is
reused only while nothing behind it changed: a file edited between two calls in one process is seen, and
each file's format and columns travel with its rows rather than through module state."""

from __future__ import annotations

import json
import os

import pytest

import tunelab.data.sources as sources
from tunelab.config import DataConfig, DataSource, load_config
from tunelab.data import DataError
from tunelab.data.build import build_datasets, check_rows
from tunelab.data.sources import read_sources
from tunelab.stages.preference import check_pairs, pairs_data
from tunelab.testing import tiny_tokenizer


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def reads(monkeypatch):
    """How many times a source file was read."""
    calls = []
    real = sources.read_source

    def counted(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(sources, "read_source", counted)
    return calls


def _texts(bundle, tok):
    return [tok.decode(e["input_ids"]) for e in bundle.train]


def test_checked_rows_are_reused_until_the_file_changes(tmp_path, reads):
    tok = tiny_tokenizer()
    path = _write(tmp_path / "d.jsonl", [{"instruction": "Say one.", "output": "one"}] * 2)
    cfg = DataConfig(train=path, val_fraction=0.0)
    check_rows(cfg, 0)
    first = build_datasets(cfg, tok, 0)
    assert len(reads) == 1 and all("one" in t for t in _texts(first, tok))  # the checked reading, reused

    check_rows(cfg, 0)
    # edited after the check (another shape even: chat), in the same process, before the build
    _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Say two."},
                                                {"role": "assistant", "content": "two"}]}] * 3)  # fmt: skip
    second = build_datasets(cfg, tok, 0)
    assert len(reads) == 3 and len(second.train) == 3
    assert all("Say two." in t and "one" not in t for t in _texts(second, tok))


def test_same_size_edit_is_seen_by_its_mtime(tmp_path, reads):
    tok = tiny_tokenizer()
    path = _write(tmp_path / "d.jsonl", [{"instruction": "Say aaa.", "output": "aaa"}])
    cfg = DataConfig(train=path, val_fraction=0.0)
    check_rows(cfg, 0)
    st = os.stat(path)
    _write(tmp_path / "d.jsonl", [{"instruction": "Say bbb.", "output": "bbb"}])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock could give the same mtime
    assert os.stat(path).st_size == st.st_size
    assert "bbb" in _texts(build_datasets(cfg, tok, 0), tok)[0]


def test_a_changed_registry_is_seen(tmp_path):
    _write(tmp_path / "a.jsonl", [{"q": "Hi", "a": "Hello!"}])
    info = {"mine": {"file_name": "a.jsonl", "columns": {"prompt": "q", "response": "a"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    cfg = DataConfig(train=["mine"], dataset_info=str(tmp_path), val_fraction=0.0)
    check_rows(cfg, 0)
    info["mine"]["columns"] = {"prompt": "q", "response": "missing"}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="field 'missing' is missing"):  # read again with the new columns
        build_datasets(cfg, tiny_tokenizer(), 0)


def test_each_file_keeps_its_own_format_and_columns(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"instruction": "Say one.", "output": "one"}])
    b = _write(tmp_path / "b.jsonl", [{"dialogue": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"}]}])  # fmt: skip
    cfg = DataConfig(train=[a, DataSource(path=b, format="chat", columns={"messages": "dialogue"})])
    _, configs = read_sources(cfg, 0)
    assert configs[a].format == "instruction" and configs[b].format == "chat"
    assert configs[b].columns.messages == "dialogue" and configs[a].columns.messages == "messages"
    _write(tmp_path / "a.jsonl", [{"prompt": "Say one.", "completion": "one"}])  # another shape, same name
    assert read_sources(cfg, 0)[1][a].format == "prompt_completion"
    twice = DataConfig(train=[a, DataSource(path=a, columns={"prompt": "other"})])
    with pytest.raises(DataError, match="lists .*a.jsonl twice with different formats or columns"):
        read_sources(twice, 0)


def test_preference_pairs_checked_then_changed_are_read_again(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}] * 2)
    cfg = load_config({"stage": "dpo", "data": {"train": path, "val_fraction": 0.0}})
    tok = tiny_tokenizer()
    check_pairs(cfg)
    _write(tmp_path / "p.jsonl", [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "No."}] * 3)
    bundle = pairs_data(cfg, tok)
    assert len(bundle.train) == 3 and "Apple." in tok.decode(bundle.train[0]["chosen_input_ids"])
