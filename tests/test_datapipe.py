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
from test_formats_auto import TOOL_ROW  # tests/ is on sys.path (conftest.py)

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


pytestmark = pytest.mark.usefixtures("empty_home")  # the tokenizer and data caches


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

    monkeypatch.setattr(store, "encode_share", no_tokenising)
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


def test_data_prepare_command(tmp_path, capsys, monkeypatch):
    from tunelab.testing import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    train = write_jsonl(tmp_path / "a.jsonl", alpaca(30))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name: {model}\ndata:\n  train: {train}\n  max_length: 40\n  cache: 'on'\n")
    assert main(["data", "prepare", str(cfg), "--set", "data.num_proc=1"]) == 0
    out = capsys.readouterr().out
    assert "rows read       30" in out and "cache           written" in out and "length" in out
    import tunelab.models as models

    real_load = models.load_tokenizer

    def no_tokenizer(*a, **k):
        raise AssertionError("a tokenizer was loaded")

    monkeypatch.setattr(models, "load_tokenizer", no_tokenizer)  # a hit is found from the tokenizer files' digest
    assert main(["data", "prepare", str(cfg), "--set", "data.num_proc=1"]) == 0
    assert "cache           hit" in capsys.readouterr().out
    from tunelab.config import load_config
    from tunelab.stages.lm import build

    run = load_config(str(cfg))  # `tunelab train` keys the cache alike: a run after `data prepare` hits it
    assert build(run, real_load(run.model)).cache["hit"] is True
    monkeypatch.setattr(models, "load_tokenizer", real_load)
    assert main(["data", "prepare", str(cfg), "--set", "data.cache=off"]) == 0
    assert "in memory" in capsys.readouterr().out


# ---------------------------------------------------------------- the store's encoder: one render per conversation
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIM_TEMPLATE = (  # trims every message: replies with outer spaces are not found verbatim in the rendering
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LAST_TURN_TEMPLATE = (  # the last reply gets an empty think block the generation prompt lacks: unsafe to render once
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last and m.role == 'assistant' %}<think></think>"
    "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAP_TEMPLATE = (  # renders like ChatML, except the generation prompt after a message "TRAP": not seen by the probes
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}{% if messages[-1].content == 'TRAP' %}<|im_start|>{% else %}"
    "<|im_start|>assistant\n{% endif %}{% endif %}"
)


def encoder_rows():
    chat_cfg = DataConfig(format="chat")
    rows = [(r, DataConfig(format="instruction", system_prompt=s), f"a {i}")
            for i, r in enumerate(alpaca(12)) for s in (None, "Be kind.")]  # fmt: skip
    rows += [(r, chat_cfg, f"c {i}") for i, r in enumerate(chats(12))]  # multi-turn, system prompt
    ends_on_user = {"messages": chats(1)[0]["messages"] + [{"role": "user", "content": "thanks"}]}
    spaced = {"messages": [{"role": "user", "content": " hi "}, {"role": "assistant", "content": " spaced reply "}]}
    rows += [(ends_on_user, chat_cfg, "u"), (spaced, chat_cfg, "s")]
    rows += [(r, DataConfig(format="instruction", train_on_prompt=True), f"p {i}") for i, r in enumerate(alpaca(4))]
    rows += [({"text": "to be or not " * i}, DataConfig(format="text"), f"t {i}") for i in range(3)]
    return rows


@pytest.mark.parametrize("template, one_render", [(None, True), (TOOLS_TEMPLATE, True), (TRIM_TEMPLATE, True),
                                                  (LAST_TURN_TEMPLATE, False)])  # fmt: skip
def test_one_render_encoder_equals_render_examples(tok, template, one_render, monkeypatch):
    from tokenizers import Tokenizer

    import tunelab.data.encoder as encoder

    tok = tiny_tokenizer()
    if template:
        tok.chat_template = template
    rows = encoder_rows() + ([(TOOL_ROW, DataConfig(format="sharegpt"), "tool")] if template == TOOLS_TEMPLATE else [])
    if not one_render:  # its multi-turn rows are refused on both paths (turns rendered differently)
        rows = [r for r in rows if not r[2].startswith(("c ", "u"))]
    enc = encoder.encoder_for(tok)
    assert (enc.shape is not None) is one_render
    renders = []
    real = encoder.render
    monkeypatch.setattr(encoder, "render", lambda *a, **k: renders.append(1) or real(*a, **k))
    got = encoder.encode_rows(rows, enc, Tokenizer.from_str(enc.backend))
    want = render_examples(rows, tok)
    assert [(a.tolist(), b.tolist()) for a, b in got] == [(e["input_ids"], e["labels"]) for e in want]
    assert any(-100 in e["labels"] for e in want) and any(-100 not in e["labels"] for e in want)
    chat_rows = sum(1 for _, c, _ in rows if c.format != "text")
    if template is None:  # ChatML: one render a conversation, plus the first one checked turn by turn (2 renders)
        assert len(renders) == chat_rows + 2
    elif not one_render:  # every reply located by rendering up to it
        assert len(renders) > 2 * chat_rows


def test_store_retokenises_when_a_row_breaks_the_one_render_shape(tmp_path, tok, caplog):
    trap = tiny_tokenizer()
    trap.chat_template = TRAP_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "TRAP"}, {"role": "assistant", "content": "caught"}]}]
    cfg = DataConfig(train=write_jsonl(tmp_path / "c.jsonl", rows + chats(10)), val_fraction=0.0, max_length=64)
    with caplog.at_level(logging.WARNING, logger="tunelab.data"):
        memory, stored = both(cfg, trap, seed=0)
    assert "tokenising again with one render per turn" in caplog.text
    assert_same(memory, stored)


def test_store_in_spawned_processes_equals_memory(tmp_path, tok, monkeypatch):
    import tunelab.data.store as store

    monkeypatch.setattr(store, "_MIN_SHARE", 16)  # this process and a spawned one, 30 rows each
    cfg = DataConfig(train=write_jsonl(tmp_path / "c.jsonl", chats(60)), val_fraction=0.1, max_length=48, packing=True)
    memory, stored = both(cfg, tok, seed=2)
    assert len(list(Path(stored.cache["folders"][0]).glob("tokens-*.arrow"))) == 2
    assert_same(memory, stored)


def test_file_digest_is_recorded_by_stat_and_racy_records_are_not_trusted(tmp_path, monkeypatch):
    import os

    import tunelab.data.store as store

    path = tmp_path / "a.jsonl"
    path.write_text("one\n")
    reads = []
    monkeypatch.setattr(store, "open", lambda *a, **k: reads.append(a[0]) or open(*a, **k), raising=False)

    def digest():
        store._DIGESTS.clear()  # a new process: only the record on disk is left
        return store.file_digest(path)

    first = digest()
    assert digest() == first and len(reads) == 2  # hashed within 2 s of its last write: read again
    os.utime(path, ns=(time_ns := path.stat().st_mtime_ns - 10**10, time_ns))  # last written 10 s ago
    digest()
    assert digest() == first and len(reads) == 3  # the record is trusted now: not read
    path.write_text("two\n")  # same size, new mtime
    assert digest() != first and len(reads) == 4


def test_a_row_the_template_refuses_names_its_line(tmp_path):
    tok = tiny_tokenizer()  # a template that refuses one content: an error found only when tokenising
    tok.chat_template = (
        "{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no BOOM') }}{% endif %}"
        + (TRIM_TEMPLATE.split("{% for m in messages %}", 1)[1])
    )
    rows = chats(40)
    rows[35]["messages"][1]["content"] = "BOOM"
    cfg = DataConfig(train=write_jsonl(tmp_path / "c.jsonl", rows), cache="on", num_proc=1)
    with pytest.raises(DataError, match=r"c.jsonl line 36: the tokenizer's chat template failed .*no BOOM"):
        build_datasets(cfg, tok, seed=0)


def test_length_histogram_counts_each_length_in_the_bar_its_label_names():
    from tunelab.data.build import length_histogram

    lines = length_histogram([1, 4, 5, 8, 8, 16], 16, "rows")
    bars = {ln.split()[0]: int(ln.split()[-1]) for ln in lines[1:]}
    assert bars == {"1-2": 1, "3-4": 1, "5-6": 1, "7-8": 2, "9-10": 0, "11-12": 0, "13-14": 0, "15-16": 1}
