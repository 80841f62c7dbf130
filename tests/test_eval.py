"""tunelab eval: verbalizer scoring of a causal LM and head scoring of a classifier, against hand counts."""

import json

import pytest
import torch

from tunelab.data.prompts import instruction_rows, label_words
from tunelab.data.tasks import Task
from tunelab.evaluation import runner
from tunelab.testing import tiny_llama, tiny_tokenizer

TASK = Task(name="custom", type="classification", labels=("no", "yes"))


def test_verbalizer_scores_match_a_hand_loop():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    rows = [
        {"text": t, "text_pair": None, "label": i % 2}
        for i, t in enumerate(["a b", "cat", "the dog", "x", "quick fox"])
    ]
    got = runner.verbalizer_scores(model, tok, TASK, rows, torch.device("cpu"), batch_size=2, progress=False)

    from tunelab.data import build_prompt_ids
    from tunelab.data.prompts import instruction
    from tunelab.methods.verbalizer import Verbalizer

    v = Verbalizer({w: [w, w.capitalize()] for w in label_words(TASK)}, tok, leading_space=False)
    preds = []
    for r in rows:  # one row at a time, no padding: batching must not change anything
        ids = torch.tensor([build_prompt_ids([{"role": "user", "content": instruction(TASK, r)}], tok)])
        preds.append(int(v.predict(model(input_ids=ids).logits[:, -1]).item()))
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert abs(got["accuracy"] - acc) < 1e-12


@pytest.mark.parametrize("method", [None, "lora", "prompt"])
def test_next_token_logits_head_on_last_positions_equals_full_logits(method):
    from tunelab.methods import get
    from tunelab.methods.verbalizer import next_token_logits

    torch.manual_seed(0)
    model = tiny_llama()
    if method:
        model = get(method).apply(model, get(method).Config())
    model.eval()
    lengths = [5, 9, 3]
    ids = torch.randint(3, 300, (3, 9))
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()  # right padding
    with torch.no_grad():
        got = next_token_logits(model, ids, mask)
        for i, n in enumerate(lengths):  # each row alone, unpadded: the full logits at its last token
            alone = model(input_ids=ids[i : i + 1, :n]).logits[0, -1]
            torch.testing.assert_close(got[i], alone, rtol=1e-5, atol=1e-5)


def test_instruction_rows_answer_with_the_label_word():
    rows = instruction_rows(TASK, [{"text": "hi", "text_pair": "there", "label": 1}])
    assert rows[0]["output"] == "yes" and "First: hi\nSecond: there" in rows[0]["instruction"]


def test_task_rows_feed_sft_data(tmp_path):
    from tunelab.data import read_source
    from tunelab.data.errors import DataError

    try:
        rows = read_source("task:sst2:dev")
    except DataError:
        pytest.skip("shared data not available")
    assert len(rows) == 872 and rows[0][2]["output"] in ("positive", "negative")
    with pytest.raises(DataError, match="task:NAME"):
        read_source("task:sst2:test")


def test_eval_cli_on_a_classifier_run(tmp_path, capsys, monkeypatch):
    """A classifier run scored by `tunelab eval` equals its own end-of-training dev metrics."""
    from test_classification import cfg_for, toy_rows

    import tunelab
    from tunelab.cli import main
    from tunelab.data import tasks as T
    from tunelab.testing import save_tiny_model_dir

    for split, n, seed in (("train", 64, 0), ("dev", 32, 1)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    model_dir = save_tiny_model_dir(tmp_path / "m", arch="bert")
    result = tunelab.train(cfg_for(model_dir, tmp_path, tmp_path / "run", {"name": "full"}))

    toy = Task(name="toy", type="classification", labels=("negative", "positive"))
    monkeypatch.setattr(T, "get_task", lambda name: toy)
    monkeypatch.setattr(
        T, "load_split", lambda task, split, limit=None, seed=0: T.load_task_file(toy, tmp_path / "dev.jsonl")
    )
    capsys.readouterr()
    assert main(["eval", str(result.run_dir), "--task", "toy", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "classification head"
    assert abs(out["metrics"]["accuracy"] - result.metrics["dev_accuracy"]) < 1e-12
