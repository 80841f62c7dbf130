"""tunelab.data: reading, formats, loss masks, splits, truncation, packing and collation (offline, fast)."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tunelab.config import ColumnsConfig, DataConfig
from tunelab.data import (
    DataError,
    build_datasets,
    build_prompt_ids,
    collate,
    encode_messages,
    pack,
    pad,
    read_rows,
    render_example,
    shared_data_dir,
)
from tunelab.testing import tiny_llama, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def replies(ex, tok) -> list[str]:
    """Decoded runs of consecutive label tokens: one string per assistant turn."""
    runs, cur = [], []
    for t in ex["labels"] + [-100]:
        if t != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def write_json(path: Path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(n)]


# ------------------------------------------------------------------------------- loss masks
def test_instruction_mask_is_exactly_the_response(tok):
    row = {"instruction": "Translate", "input": "good morning", "output": "Guten Morgen."}
    ex = render_example(row, DataConfig(), tok)
    assert replies(ex, tok) == ["Guten Morgen." + END]
    assert len(ex["input_ids"]) == len(ex["labels"])
    prompt = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == -100])
    assert prompt == "<|im_start|>user\nTranslate\n\ngood morning" + END + "<|im_start|>assistant\n"
    assert tok.eos_token_id in ex["labels"]


def test_instruction_history_and_system_prompt(tok):
    row = {
        "instruction": "And of Germany?",
        "input": "",
        "output": "Berlin.",
        "history": [["What is the capital of France?", "Paris."]],
    }
    ex = render_example(row, DataConfig(system_prompt="Be brief."), tok)
    assert replies(ex, tok) == ["Paris." + END, "Berlin." + END]
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief." + END)


def test_chat_openai_multiturn_every_reply_gets_loss(tok):
    row = {
        "messages": [
            {"role": "system", "content": "You answer."},
            {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "and Germany?"},
            {"role": "assistant", "content": "Berlin."},
        ]
    }
    ex = render_example(row, DataConfig(format="chat"), tok)
    assert replies(ex, tok) == ["Paris." + END, "Berlin." + END]


def test_chat_sharegpt_is_detected(tok):
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    ex = render_example(row, DataConfig(format="chat"), tok)
    assert replies(ex, tok) == ["hello" + END]
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nsys" + END + "<|im_start|>user\nhi")


def test_train_on_prompt_covers_everything(tok):
    ex = render_example({"instruction": "a", "output": "b"}, DataConfig(train_on_prompt=True), tok)
    assert ex["labels"] == ex["input_ids"]


def test_text_format_all_tokens_and_eos(tok):
    ex = render_example({"text": "The quick brown fox."}, DataConfig(format="text"), tok)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_eos_appended_when_template_turn_has_none():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    ex = encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
    assert tok.decode([t for t in ex["labels"] if t != -100]) == "yo\n<|im_end|>"


def test_template_breaking_prefix_property_is_an_error():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ ' END' }}{% endif %}"
        "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(DataError, match="renders earlier turns differently"):
        encode_messages(msgs, tok)


def test_offsets_and_pieces_paths_agree(tok):
    msgs = [
        {"role": "user", "content": "Give three tips."},
        {"role": "assistant", "content": "Eat, sleep, move."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Drink water."},
    ]
    assert encode_messages(msgs, tok, use_offsets=True) == encode_messages(msgs, tok, use_offsets=False)


def test_prompt_ids_end_with_assistant_header(tok):
    ids = build_prompt_ids([{"role": "user", "content": "hi"}], tok)
    assert tok.decode(ids) == "<|im_start|>user\nhi" + END + "<|im_start|>assistant\n"


def test_column_mapping(tok):
    row = {"instruction": "q", "context": "", "response": "r"}
    cfg = DataConfig(columns=ColumnsConfig(input="context", output="response"))
    assert replies(render_example(row, cfg, tok), tok) == ["r" + END]


# ----------------------------------------------------------------------------------- errors
def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n')
    with pytest.raises(DataError) as e:
        read_rows(str(p))
    msg = str(e.value)
    assert "data.jsonl line 3: not valid JSON" in msg and "Fix or remove that line" in msg


def test_missing_field_names_file_row_field_and_fix(tmp_path, tok):
    rows = alpaca_rows(3)
    del rows[1]["output"]
    cfg = DataConfig(train=write_json(tmp_path / "alpaca.json", rows), val_fraction=0.0)
    with pytest.raises(DataError) as e:
        build_datasets(cfg, tok, seed=0)
    msg = str(e.value)
    assert "alpaca.json row 2: field 'output' is missing" in msg
    assert "format: instruction" in msg and "data.columns.output" in msg


def test_wrong_type_and_bad_role(tok):
    with pytest.raises(DataError, match="field 'output' should be text, got list"):
        render_example({"instruction": "a", "output": ["b"]}, DataConfig(), tok, where="x.json row 1")
    with pytest.raises(DataError, match="message 1 in 'messages' has role 'robot'"):
        render_example({"messages": [{"role": "robot", "content": "x"}]}, DataConfig(format="chat"), tok)
    with pytest.raises(DataError, match="no assistant message"):
        render_example({"messages": [{"role": "user", "content": "x"}]}, DataConfig(format="chat"), tok)


def test_json_must_be_a_list_of_objects(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"data": []}')
    with pytest.raises(DataError, match="must hold a list of objects"):
        read_rows(str(p))
    p.write_text('[{"a": 1}, 5]')
    with pytest.raises(DataError, match="d.json row 2: expected an object"):
        read_rows(str(p))


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        read_rows("someone/some-data")
    assert "not found as a local file" in str(e.value) and "hub" in str(e.value)


# ---------------------------------------------------------------------------------- readers
def test_csv_tsv_row_numbers_are_file_lines(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,input,output\na,,b\n"multi\nline",,c\nd,,e\n')
    rows = read_rows(str(p))
    assert [(n, r["instruction"]) for _, n, r in rows] == [(2, "a"), (3, "multi\nline"), (5, "d")]
    t = tmp_path / "d.tsv"
    t.write_text("instruction\toutput\nx\ty\nbad\n")
    with pytest.raises(DataError, match="d.tsv line 3: 1 fields, but the header has 2"):
        read_rows(str(t))


def test_gz_reading(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "a"}\n{"text": "b"}\n')
    assert [(n, r["text"]) for _, n, r in read_rows(str(p))] == [(1, "a"), (2, "b")]
    q = tmp_path / "d.tsv.gz"
    with gzip.open(q, "wt") as f:
        f.write("text\nhello\n")
    assert read_rows(str(q))[0][1:] == (2, {"text": "hello"})


# ------------------------------------------------------------------------- splits/truncation
def test_val_split_is_deterministic(tmp_path, tok):
    cfg = DataConfig(train=write_json(tmp_path / "a.json", alpaca_rows(20)), val_fraction=0.2)
    a, b = build_datasets(cfg, tok, seed=1), build_datasets(cfg, tok, seed=1)
    assert (len(a.train), len(a.val)) == (16, 4)
    assert a.train == b.train and a.val == b.val
    assert build_datasets(cfg, tok, seed=2).val != a.val
    cfg.limit, cfg.val_fraction = 2, 0.01
    small = build_datasets(cfg, tok, seed=1)
    assert (small.stats["rows_read"], len(small.train), len(small.val)) == (2, 1, 1)


def test_validation_file(tmp_path, tok):
    cfg = DataConfig(
        train=write_json(tmp_path / "t.json", alpaca_rows(5)),
        validation=write_json(tmp_path / "v.json", alpaca_rows(3)),
    )
    bundle = build_datasets(cfg, tok, seed=0)
    assert (len(bundle.train), len(bundle.val), bundle.stats["rows_read"]) == (5, 3, 8)


def test_truncation_and_dropping_are_counted(tmp_path, tok):
    rows = alpaca_rows(4)
    rows[0]["output"] = "word " * 40  # truncated, keeps some response tokens
    rows[1]["instruction"] = "long " * 60  # response starts after max_length: dropped
    cfg = DataConfig(train=write_json(tmp_path / "a.json", rows), val_fraction=0.0, max_length=48)
    bundle = build_datasets(cfg, tok, seed=0)
    assert bundle.stats["truncated"] == 2 and bundle.stats["dropped"] == 1
    assert len(bundle.train) == 3 and all(len(e["input_ids"]) <= 48 for e in bundle.train)
    assert bundle.stats["label_tokens"] == sum(sum(t != -100 for t in e["labels"]) for e in bundle.train)


def test_pretrain_needs_text(tmp_path, tok):
    with pytest.raises(DataError, match="data.format: text"):
        build_datasets(DataConfig(train="x.json", format="instruction"), tok, seed=0, stage="pretrain")


# -------------------------------------------------------------------------- collate/packing
def test_collate_pads_labels_and_mask():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def _hand_padded(seqs, value, side, width):
    """The padding loop every collate used to write by hand."""
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("width", [None, 12])
def test_pad_matches_the_hand_built_batch(side, width):
    rng = random.Random(3)
    seqs = [[rng.randrange(1, 300) for _ in range(n)] for n in (5, 1, 9, 0, 3)]
    ids, mask = pad(seqs, 7, side=side, width=width)
    want_ids, want_mask = _hand_padded(seqs, 7, side, width or 9)
    assert ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert mask.sum(1).tolist() == [len(s) for s in seqs]


def test_pad_layout_and_limits():
    ids, mask = pad([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], -100, width=4)
    assert ids.tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    flags, _ = pad([[True, False], [True]], False, dtype=torch.bool)
    assert flags.dtype == torch.bool and flags.tolist() == [[True, False], [True, False]]
    assert pad([torch.tensor([4, 5]), [6]], 0)[0].tolist() == [[4, 5], [6, 0]]  # tensors and lists alike
    assert pad([], 0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="width"):
        pad([[1, 2, 3]], 0, width=2)
    with pytest.raises(ValueError, match="side"):
        pad([[1]], 0, side="middle")


def test_packed_collate_pads_positions_from_zero():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0]},
            {"input_ids": [4], "labels": [4], "position_ids": [0]}]  # fmt: skip
    batch = collate(rows, pad_id=9, width=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100, -100], [4, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1], [0, 0, 1, 2, 3]]


def test_pack_layout():
    exs = [{"input_ids": [1] * n, "labels": [9] * n} for n in (3, 4, 5)]
    rows = pack(exs, max_length=8)
    # best fit decreasing: 5 opens a row, 4 does not fit beside it, 3 fills the first row exactly
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3]]
    assert rows[0]["labels"] == [-100, 9, 9, 9, 9, -100, 9, 9]
    batch = collate(rows, pad_id=0)
    assert "attention_mask" not in batch  # a 2D mask would switch off transformers' packed-sequence detection
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_pack_fills_rows_best_fit():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack([{"input_ids": [1] * n, "labels": [9] * n} for n in lengths], max_length=128)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)  # every token placed once
    assert len(rows) <= math.ceil(sum(lengths) / 128) + 2  # nearly every slot used


def _example_losses(model, batch, **kwargs) -> list[float]:
    """Summed token cross-entropy of each example in each row (examples start where position_ids == 0)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **kwargs).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    )
    out = []
    for r in range(len(ce)):
        pos = batch.get("position_ids", torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]))[r]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if (batch["labels"][r, a:b] != -100).any():
                out.append(ce[r, a : b - 1].sum().item())
    return out


def test_packed_losses_equal_separate_losses(tmp_path, tok):
    rows = alpaca_rows(6)
    rows[2]["output"] = "The capital of France is Paris. " * 2
    cfg = DataConfig(train=write_json(tmp_path / "a.json", rows), val_fraction=0.0, max_length=96)
    examples = build_datasets(cfg, tok, seed=0).train
    packed = pack(examples, max_length=96)
    assert len(packed) < len(examples) and len(packed) >= 2
    model = tiny_llama(len(tok))

    separate = [_example_losses(model, collate([e], tok.pad_token_id))[0] for e in examples]
    batch = collate(packed, tok.pad_token_id)  # two rows of different length: padding too
    together = _example_losses(model, batch, position_ids=batch["position_ids"], use_cache=False)
    separate = sorted(separate)  # packing reorders examples (longest first)
    assert sorted(together) == pytest.approx(separate, abs=1e-5)
    # padded to a fixed width (the loop pads every packed pass to max_length): the same losses
    wide = collate(packed, tok.pad_token_id, width=128)
    assert wide["input_ids"].shape[1] == 128 and (wide["labels"][:, batch["labels"].shape[1] :] == -100).all()
    padded = _example_losses(model, wide, position_ids=wide["position_ids"], use_cache=False)
    assert padded == pytest.approx(together, abs=1e-5)
    assert collate(examples[:2], tok.pad_token_id, width=128)["input_ids"].shape[1] < 128  # unpacked: not widened

    # Controls: with a cache (use_cache defaults to True) or a 2D mask, examples see each other.
    with_cache = _example_losses(model, batch, position_ids=batch["position_ids"])
    with_mask = _example_losses(
        model,
        batch,
        position_ids=batch["position_ids"],
        attention_mask=torch.ones_like(batch["input_ids"]),
        use_cache=False,
    )
    assert sorted(with_cache) != pytest.approx(separate, abs=1e-5)
    assert sorted(with_mask) != pytest.approx(separate, abs=1e-5)


def test_build_with_packing(tmp_path, tok):
    train = write_json(tmp_path / "a.json", alpaca_rows(10))
    cfg = DataConfig(train=train, val_fraction=0.2, packing=True, max_length=128)
    bundle = build_datasets(cfg, tok, seed=0)
    assert bundle.stats["packed_rows"] == len(bundle.train) < bundle.stats["train_rows"]
    assert all(len(r["input_ids"]) <= 128 and "position_ids" in r for r in bundle.train)
    assert all("position_ids" not in e for e in bundle.val)


# ------------------------------------------------------------------------------- real data
def test_shared_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNELAB_SHARED_DATA", raising=False)
    assert shared_data_dir() == SHARED
    monkeypatch.setenv("TUNELAB_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path


def test_real_alpaca_smoke(tok):
    path = SHARED / "llamafactory-demo" / "alpaca_en_demo.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    bundle = build_datasets(DataConfig(train=str(path), limit=20, max_length=256), tok, seed=0)
    assert bundle.stats["rows_read"] == 20 and len(bundle.train) + len(bundle.val) + bundle.stats["dropped"] == 20
    assert all(tok.eos_token_id in e["labels"] or len(e["input_ids"]) == 256 for e in bundle.train)
    batch = collate(bundle.train[:4], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape


def test_broken_files_are_named_errors_not_tracebacks(tmp_path):
    import gzip

    from tunelab.data import DataError, read_rows

    whole = gzip.compress(b"".join(b'{"instruction": "a", "output": "b"}\n' for _ in range(200)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: cannot read the file"):
        read_rows(str(tmp_path / "cut.jsonl.gz"))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"deep.jsonl line 1: nested too deeply"):
        read_rows(str(tmp_path / "deep.jsonl"))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep.json: nested too deeply"):
        read_rows(str(tmp_path / "deep.json"))


def test_a_bad_label_names_its_line_not_its_value(tmp_path):
    from tunelab.data import DataError
    from tunelab.data.tasks import load_task_file

    (tmp_path / "own.csv").write_text("text,label\ngood film,1\nbad film,5.0\n")
    with pytest.raises(DataError, match=r"own.csv line 3: field 'label' is '5.0'"):
        load_task_file("sst2", tmp_path / "own.csv")
