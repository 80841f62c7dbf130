"""docs/data.md's example rows are real: each one, written to a file and read as `data.train`, is detected
as the format it is documented under and converts (messages with a reply to learn, a text, or a preference
pair). The registry example resolves a name to its file and format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.config import DataConfig
from tunelab.data.formats import row_to_messages, row_to_text
from tunelab.data.preference import row_to_pair
from tunelab.data.sources import read_sources

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"
TEXT = DOC.read_text()
# <!-- row: FORMAT STAGE --> then a ```json block holding one row
ROWS = [
    (m[1], m[2], json.loads(m[3])) for m in re.finditer(r"<!-- row: (\w+) (\w+) -->\n```json\n(.*?)\n```", TEXT, re.S)
]


def test_the_page_documents_every_format():
    assert {fmt for fmt, _, _ in ROWS} == {"instruction", "chat", "prompt_completion", "text", "preference"}
    assert len(ROWS) == TEXT.count("<!-- row: ")  # no marker the pattern missed


@pytest.mark.parametrize("fmt,stage,row", ROWS, ids=[f"{i}-{f}" for i, (f, _, _) in enumerate(ROWS)])
def test_documented_row_is_detected_and_converts(fmt, stage, row, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = DataConfig(train=str(path))  # data.format: auto, the default
    ((file, number, read),), configs = read_sources(cfg, 0, stage)
    eff = configs[file]
    assert eff.format == fmt
    if fmt == "text":
        assert row_to_text(read, eff) == row["text"]
    elif fmt == "preference":
        pair = row_to_pair(read, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                                  "messages": "messages", "system": "system"})  # fmt: skip
        assert pair["prompt"] and pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"]
        assert pair["prompt"][-1]["role"] == "user"
    else:
        messages = row_to_messages(read, eff)
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
        assert any(m["role"] == "user" for m in messages)


def test_documented_registry_entry_resolves(tmp_path):
    block = re.search(r"<!-- dataset_info -->\n```json\n(.*?)\n```", TEXT, re.S)[1]
    info = json.loads(block)
    ((name, entry),) = info.items()
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    chat_row = next(row for fmt, _, row in ROWS if fmt == "chat" and "messages" in row)
    (tmp_path / entry["file_name"]).write_text(json.dumps(chat_row) + "\n")
    cfg = DataConfig(train=[name], dataset_info=str(tmp_path))
    ((file, _, row),), configs = read_sources(cfg, 0, "sft")
    assert Path(file) == tmp_path / entry["file_name"] and configs[file].format == "chat"
    assert row_to_messages(row, configs[file])[-1]["content"] == chat_row["messages"][-1]["content"]
