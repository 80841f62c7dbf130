"""The on-disk data store (tunelab/data/store.py) gives exactly the examples of the in-memory path: the same
token ids, labels and position ids, rows, splits and statistics, for sft and pretrain, packed and not; its
cache is hit on a second run; its errors name the file and line; the batched encoder and the bucketed
packing equal the one-row-at-a-time ones they replaced."""

from __future__ import annotations

import json
import logging
import random
from bisect import bisect_left, insort
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.data import DataError, build_datasets, collate, render_example
from tunelab.data.packing import pack_plan
from tunelab.data.store import ArrowExamples
from tunelab.data.templating import render_examples
from tunelab.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def alpaca(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"What is {i} plus {rng.randint(0, 99)}?", "input": "x " * rng.randint(0, 4),
             "output": "It is. " * rng.randint(1, 9)} for i in range(n)]  # fmt: skip


def chats(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "a" * (i % 7)}, {"role": "user", "content": "more"},
                          {"role": "assistant", "content": f"r{i} " * (i % 9)}]} for i in range(n)]  # fmt: skip


def both(cfg: DataConfig, tok, seed: int, stage: str = "sft"):
    memory = build_datasets(cfg.model_copy(update={"cache": "off"}), tok, seed=seed, stage=stage)
    stored = build_datasets(cfg.model_copy(update={"cache": "on", "num_proc": 2}), tok, seed=seed, stage=stage)
    return memory, stored


def assert_same(memory, stored):
    assert isinstance(stored.train, ArrowExamples) and isinstance(memory.train, list)
    assert stored.stats == memory.stats
    assert list(stored.train) == memory.train and list(stored.val) == memory.val
    assert stored.train[1:3] == memory.train[1:3] and stored.train[-1] == memory.train[-1]


@pytest.mark.parametrize("packing", [False, True])
def test_store_equals_memory_sft(tmp_path, tok, packing):
    train = write_jsonl(tmp_path / "a.jsonl", alpaca(60))
    cfg = DataConfig(train=train, val_fraction=0.2, packing=packing, max_length=200 if packing else 60)
    memory, stored = both(cfg, tok, seed=3)
    assert memory.stats["train_rows"] > 30 and len(memory.val) > 5
    assert memory.stats["truncated"] > 0 or packing
    assert_same(memory, stored)
    if packing:
        assert memory.stats["packed_rows"] < memory.stats["train_rows"]
        assert all("position_ids" in r for r in stored.train)


@pytest.mark.parametrize("packing", [False, True])
def test_store_equals_memory_pretrain(tmp_path, tok, packing):
    texts = [{"text": "to be or not " * (1 + i % 13)} for i in range(50)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", texts), format="text", packing=packing, max_length=48)
    memory, stored = both(cfg, tok, seed=0, stage="pretrain")
    assert memory.stats["truncated"] > 0
    assert_same(memory, stored)


def test_store_equals_memory_mixed_sources_limit_and_drops(tmp_path, tok):
    rows = alpaca(30)
    rows[4]["instruction"] = "long " * 80  # the reply starts past max_length: dropped
    csv = tmp_path / "b.csv"
    csv.write_text("instruction,input,output\n" + "".join(f'"say {i}",,"ok {i}\nyes"\n' for i in range(25)))
    train = [{"path": write_jsonl(tmp_path / "a.jsonl", rows), "weight": 2.5},
             {"path": str(csv), "samples": 9}, write_jsonl(tmp_path / "c.jsonl", chats(20))]  # fmt: skip
    for extra in ({}, {"limit": 70}, {"system_prompt": "Hi", "train_on_prompt": True}):
        cfg = DataConfig(train=train, max_length=48, packing=True, val_fraction=0.1, **extra)
        memory, stored = both(cfg, tok, seed=5)
        assert memory.stats["dropped"] >= 2 or "train_on_prompt" in extra  # row 4, copied by the weight
        assert_same(memory, stored)


def test_store_validation_file_and_collate(tmp_path, tok):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", alpaca(9)),
                     validation=write_jsonl(tmp_path / "v.jsonl", chats(4)), max_length=64)  # fmt: skip
    memory, stored = both(cfg, tok, seed=1)
    assert (len(stored.train), len(stored.val), stored.stats["rows_read"]) == (9, 4, 13)
    assert_same(memory, stored)
    a, b = collate(memory.train[:4], tok.pad_token_id), collate(stored.train[:4], tok.pad_token_id)
    assert all((a[k] == b[k]).all() for k in a)


def test_second_run_hits_the_cache_and_tokenises_nothing(tmp_path, tok, monkeypatch, caplog):
    cfg = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", alpaca(20)), cache="on", num_proc=1, max_length=64)
    first = build_datasets(cfg, tok, seed=0)
    assert first.cache["hit"] is False and Path(first.cache["folders"][0]).is_dir()
    import tunelab.data.store as store

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(store, "_encode_batch", no_tokenising)
    with caplog.at_level(logging.INFO, logger="tunelab.data"):
        again = build_datasets(cfg, tok, seed=4)  # another seed: another split of the same cached rows
    assert again.cache["hit"] is True and "data cache hit" in caplog.text
    assert sorted(map(str, [*again.train, *again.val])) == sorted(map(str, [*first.train, *first.val]))
    # the cache follows the content: one changed row is a miss
    Path(cfg.train).write_text(Path(cfg.train).read_text().replace("What is 3", "What was 3"))
    with pytest.raises(AssertionError, match="tokenised again"):
        build_datasets(cfg, tok, seed=0)


def test_store_errors_name_file_and_line(tmp_path, tok):
    rows = [json.dumps(r) for r in alpaca(8)]
    rows[5] = json.dumps({"instruction": "hi"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = DataConfig(train=str(path), cache="on")
    with pytest.raises(DataError, match=r"bad.jsonl line 6: field 'output' is missing"):
        build_datasets(cfg, tok, seed=0)
    path.write_text("\n".join(rows[:3] + ["{not json"] + rows[3:]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 4: not valid JSON"):
        build_datasets(cfg, tok, seed=0)
    assert not list((tmp_path / "home").glob("cache/data/*/.tmp-*"))  # no half-written entry left


def test_render_examples_equals_render_example(tmp_path, tok):
    cfg = DataConfig(format="auto")
    rows = alpaca(5) + chats(5) + [{"prompt": "p", "completion": "c"}]
    resolved = [(r, cfg.model_copy(update={"format": "chat" if "messages" in r else
                                           "prompt_completion" if "prompt" in r else "instruction"}), f"row {i}")
                for i, r in enumerate(rows)]  # fmt: skip
    texts = [({"text": "hello there " * i}, DataConfig(format="text"), "t") for i in range(4)]
    batch = render_examples(resolved + texts, tok)
    assert batch == [render_example(r, c, tok, where=w) for r, c, w in resolved + texts]


def _reference_bfd(lengths, max_length):
    """The packing tunelab used before pack_plan: open rows in one sorted list (room, row)."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect_left(free, (n, -1))
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            insort(free, (room - n, r))
    return rows


@pytest.mark.parametrize("max_length", [8, 64, 300])
def test_pack_plan_is_the_sorted_list_bfd(max_length):
    rng = random.Random(max_length)
    lengths = [rng.randint(1, max_length) for _ in range(3000)] + [max_length // 2] * 50
    plan = pack_plan(lengths, max_length)
    assert plan == _reference_bfd(lengths, max_length)
    assert sorted(i for r in plan for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= max_length for r in plan)


def test_data_prepare_command(tmp_path, capsys):
    from tunelab.testing import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    train = write_jsonl(tmp_path / "a.jsonl", alpaca(30))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {model}\ndata:\n  train: {train}\n  max_length: 40\n  cache: 'on'\n")
    assert main(["data", "prepare", str(cfg), "--set", "data.num_proc=1"]) == 0
    out = capsys.readouterr().out
    assert "rows read       30" in out and "cache           written" in out and "length" in out
    assert main(["data", "prepare", str(cfg), "--set", "data.num_proc=1"]) == 0
    assert "cache           hit" in capsys.readouterr().out
    assert main(["data", "prepare", str(cfg), "--set", "data.cache=off"]) == 0
    assert "in memory" in capsys.readouterr().out
