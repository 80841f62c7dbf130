"""data.val_max_rows: every evaluation (the one before step 1 included) reads all validation rows, so a large
data set's `val_fraction` is capped; the split stays seeded and disjoint from the training rows, and the Arrow
store takes the same rows as the in-memory path."""

import logging

import pytest
from test_datapipe import alpaca, assert_same, both, chats, write_jsonl

from tunelab.config import DataConfig
from tunelab.data import split_rows

pytestmark = pytest.mark.usefixtures("empty_home")  # the tokenizer and data caches


@pytest.fixture(scope="module")
def tok():
    from tunelab.testing import tiny_tokenizer

    return tiny_tokenizer()


def test_split_caps_validation_seeded_and_disjoint(caplog):
    rows = list(range(20_000))
    with caplog.at_level(logging.INFO, logger="tunelab.data"):
        train, val = split_rows(rows, 0.1, seed=7, max_val=1000)
    assert (len(train), len(val)) == (19_000, 1000)
    assert sorted(train + val) == rows  # disjoint, nothing lost: the rest of the fraction trains
    assert (train, val) == split_rows(rows, 0.1, seed=7, max_val=1000)
    assert val == split_rows(rows, 0.1, seed=7)[1][:1000]  # the first rows of the same seeded shuffle
    assert split_rows(rows, 0.1, seed=8, max_val=1000)[1] != val
    assert "val_max_rows = 1000" in caplog.text and "2000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tunelab.data"):
        assert split_rows(rows[:500], 0.1, seed=7, max_val=1000) == split_rows(rows[:500], 0.1, seed=7)
    assert "val_max_rows" not in caplog.text  # under the cap: nothing said, nothing changed


def test_the_cap_is_on_by_default_and_can_be_lifted():
    assert DataConfig().val_max_rows == 1000
    assert DataConfig(val_max_rows=None).val_max_rows is None
    with pytest.raises(ValueError, match="val_max_rows"):
        DataConfig(val_max_rows=0)


def test_capped_split_store_equals_memory(tmp_path, tok):
    cfg = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", alpaca(400)), val_fraction=0.5, val_max_rows=30,
                     max_length=64)  # fmt: skip
    memory, stored = both(cfg, tok, seed=2)
    assert (memory.stats["train_rows"], len(memory.val)) == (370, 30)
    assert_same(memory, stored)
    uncapped = both(cfg.model_copy(update={"val_max_rows": None}), tok, seed=2)[0]
    assert len(uncapped.val) == 200 and memory.val == uncapped.val[:30]


def test_validation_file_is_sampled_in_file_order(tmp_path, tok):
    cfg = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", alpaca(20)),
                     validation=write_jsonl(tmp_path / "v.jsonl", chats(120)), val_max_rows=25, max_length=64)  # fmt: skip
    memory, stored = both(cfg, tok, seed=1)
    assert (len(memory.train), len(memory.val)) == (20, 25)
    assert_same(memory, stored)
    full = both(cfg.model_copy(update={"val_max_rows": None}), tok, seed=1)[0].val
    assert len(full) == 120
    picked = [full.index(v) for v in memory.val]
    assert picked == sorted(picked) and len(set(picked)) == 25 and picked != list(range(25))
