"""stage: extractive_qa — SQuAD-style windows and labels, span postprocessing, a tiny BERT that learns."""

import json

import numpy as np
import pytest
import torch

import tunelab
from tunelab import metrics as M
from tunelab.config import ConfigError, load_config
from tunelab.stages.extractive_qa import evaluate_qa, postprocess, qa_features
from tunelab.testing import save_tiny_model_dir, tiny_tokenizer

ANIMALS = [("fox", "red"), ("dog", "blue"), ("cat", "green"), ("cow", "white"), ("owl", "grey"), ("bee", "black")]


def qa_row(i, context, animal, colour=None):
    answers = [colour] if colour else []
    starts = [context.index(f"{animal} is {colour}") + len(animal) + 4] if colour else []
    return {"id": str(i), "question": f"What colour is the {animal}?", "context": context, "answers": answers,
            "answer_starts": starts}  # fmt: skip


def toy_rows():
    """Two contexts, five answerable and one unanswerable question each."""
    rows = []
    for k, pairs in enumerate((ANIMALS[:3], ANIMALS[3:])):
        context = " ".join(f"The {a} is {c}." for a, c in pairs)
        for a, c in pairs:
            rows.append(qa_row(len(rows), context, a, c))
        missing = ANIMALS[3 - 3 * k][0]  # an animal of the other context: no answer here
        rows.append(qa_row(len(rows), context, missing))
    return rows


def labelled_text(row, feat):
    o = feat["offsets"]
    return row["context"][o[feat["start"]][0] : o[feat["end"]][1]].strip()


# ------------------------------------------------------------------------------------ preprocessing
def test_labels_map_back_to_the_answer_in_every_window():
    tok = tiny_tokenizer()
    context = " ".join(f"The {a} is {c}." for a, c in ANIMALS * 3) + " The pig is pink."
    rows = [qa_row(0, context, "pig", "pink"), qa_row(1, context, "bird")]
    feats = qa_features(rows, tok, max_length=48, doc_stride=16)
    windows = [f for f in feats if f["example"] == 0]
    assert len(windows) > 3  # the long context was split
    answered = [f for f in windows if f["start"] != f["cls_index"]]
    assert answered, "the answer lies whole in at least one window"
    for f in answered:
        assert labelled_text(rows[0], f) == "pink"
        assert f["start"] <= f["end"] and f["offsets"][f["start"]] is not None
    for f in windows:  # a window without the whole answer points at CLS (index 0: no CLS in this tokenizer)
        if f not in answered:
            o = [x for x in f["offsets"] if x is not None]
            assert not (o[0][0] <= rows[0]["answer_starts"][0] and o[-1][1] >= rows[0]["answer_starts"][0] + 4)
            assert f["start"] == f["end"] == f["cls_index"] == 0
    # consecutive windows overlap by doc_stride context tokens
    ctx0 = [o for o in windows[0]["offsets"] if o is not None]
    ctx1 = [o for o in windows[1]["offsets"] if o is not None]
    assert ctx0[-16:] == ctx1[:16]
    assert all(f["start"] == f["end"] == 0 for f in feats if f["example"] == 1)  # unanswerable -> CLS


def test_labels_with_a_wordpiece_tokenizer_and_cls(tmp_path):
    """A BERT tokenizer: [CLS] q [SEP] c [SEP], token_type_ids, CLS at 0; answers in mid-word offsets."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is", "the", "?", "."]
    words += [w for pair in ANIMALS for w in pair] + ["##s"]
    tk = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  unk_token="[UNK]", mask_token="[MASK]",
                                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # fmt: skip
    rows = toy_rows()
    feats = qa_features(rows, tok, max_length=64, doc_stride=8)
    assert len(feats) == len(rows)
    for row, f in zip(rows, feats):
        assert f["cls_index"] == 0 and f["input_ids"][0] == 2 and "token_type_ids" in f
        if row["answers"]:
            assert labelled_text(row, f) == row["answers"][0]
            assert f["token_type_ids"][f["start"]] == 1
        else:
            assert f["start"] == f["end"] == 0


# ----------------------------------------------------------------------------------- postprocessing
def _hand_feature(context, n_question=3):
    """One window: n_question non-context tokens, then one token per word of the context."""
    offsets, pos = [None] * n_question, 0
    for w in context.split(" "):
        offsets.append((pos, pos + len(w)))
        pos += len(w) + 1
    return {"example": 0, "cls_index": 0, "offsets": offsets, "input_ids": [0] * len(offsets)}


def test_postprocess_picks_the_best_valid_span():
    context = "alpha beta gamma delta epsilon"
    row = {"context": context, "answers": ["gamma delta"]}
    f = _hand_feature(context)
    n = len(f["offsets"])
    start, end = np.zeros(n), np.zeros(n)
    start[1], end[1] = 9.0, 9.0  # a question token: not a valid span even though it scores highest
    start[5], end[6] = 3.0, 3.0  # gamma .. delta
    start[7], end[4] = 5.0, 5.0  # end before start: invalid
    assert postprocess([row], [f], [start], [end]) == ["gamma delta"]
    # the null score (CLS start + end = 7) beats the span (6) -> no answer; a threshold of 1.5 lets it through
    start[0], end[0] = 3.5, 3.5
    assert postprocess([row], [f], [start], [end]) == [""]
    assert postprocess([row], [f], [start], [end], null_threshold=1.5) == ["gamma delta"]
    assert postprocess([row], [f], [start], [end], null_threshold=None) == ["gamma delta"]


def test_postprocess_respects_max_answer_tokens_and_spans_windows():
    context = "alpha beta gamma delta epsilon"
    row = {"context": context}
    f = _hand_feature(context)
    n = len(f["offsets"])
    start, end = np.zeros(n), np.zeros(n)
    start[3], end[7] = 4.0, 4.0  # alpha .. epsilon: 5 tokens
    end[4] = 3.0  # alpha beta: 2 tokens
    assert postprocess([row], [f], [start], [end], max_answer_tokens=5) == ["alpha beta gamma delta epsilon"]
    assert postprocess([row], [f], [start], [end], max_answer_tokens=4) == ["alpha beta"]
    # a second window of the same question with a better span wins; its null score does not (min over windows)
    f2 = dict(f)
    s2, e2 = np.zeros(n), np.zeros(n)
    s2[6], e2[6], s2[0], e2[0] = 6.0, 6.0, 9.0, 9.0
    assert postprocess([row], [f, f2], [start, s2], [end, e2], max_answer_tokens=4) == ["delta"]


# --------------------------------------------------------------------------------------- training
def qa_config(model_dir, data_dir, out, **task):
    return load_config({
        "stage": "extractive_qa",
        "output_dir": str(out),
        "model": {"name": model_dir},
        "task": {"train_file": str(data_dir / "train.json"), "dev_file": str(data_dir / "train.json"),
                 "max_length": 64, "doc_stride": 16, **task},
        "method": {"name": "full"},
        "training": {"max_steps": 60, "batch_size": 8, "lr": 5e-3, "progress": False, "tensorboard": False,
                     "warmup_steps": 2, "scheduler": "constant", "seed": 0},
    })  # fmt: skip


def squad_file(rows, path):
    paragraphs = {}
    for r in rows:
        p = paragraphs.setdefault(r["context"], {"context": r["context"], "qas": []})
        p["qas"].append({"id": r["id"], "question": r["question"], "is_impossible": not r["answers"],
                         "answers": [{"text": a, "answer_start": s} for a, s in zip(r["answers"], r["answer_starts"])]})  # fmt: skip
    path.write_text(
        json.dumps({"version": "v2.0", "data": [{"title": "toy", "paragraphs": list(paragraphs.values())}]})
    )


def test_tiny_bert_memorises_squad_and_reloads(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    rows = toy_rows()
    squad_file(rows, tmp_path / "train.json")
    model_dir = save_tiny_model_dir(
        tmp_path / "m", arch="bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    result = tunelab.train(qa_config(model_dir, tmp_path, tmp_path / "run"))
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"] / 2
    assert m["dev_f1"] >= 90.0 and m["dev_exact"] >= 80.0, m
    assert m["dev_NoAns_total"] == 2 and m["dev_HasAns_total"] == 6
    manifest = json.loads((result.final_dir / "tunelab.json").read_text())
    assert manifest["stage"] == "extractive_qa"
    assert manifest["task"] == {"name": "custom", "type": "extractive_qa", "max_length": 64, "doc_stride": 16,
                                "max_answer_tokens": 30, "null_threshold": 0.0}  # fmt: skip

    from tunelab.stages.runs import load_run

    model, tok = load_run(str(result.run_dir), device="cpu")
    assert type(model).__name__ == "BertForQuestionAnswering"
    scores, preds = evaluate_qa(model, tok, rows, torch.device("cpu"), max_length=64, doc_stride=16)
    assert scores == M.squad_scores(preds, [r["answers"] for r in rows])
    for k in ("exact", "f1"):
        assert abs(scores[k] - m[f"dev_{k}"]) < 1e-9

    # `tunelab eval RUN --task squad` on the same rows gives the same scores, with the run's settings
    from tunelab.data import tasks as T
    from tunelab.evaluation import runner

    monkeypatch.setattr(T, "load_split", lambda task, split, limit=None, seed=0: rows)
    out = runner.evaluate(str(result.run_dir), "squad", device="cpu", progress=False)
    assert out["method"] == "span extraction"
    assert abs(out["metrics"]["f1"] - m["dev_f1"]) < 1e-9


def test_qa_config_checks():
    with pytest.raises(ConfigError, match="task.name"):
        load_config({"stage": "extractive_qa"})
    with pytest.raises(ConfigError, match="doc_stride"):
        load_config({"stage": "extractive_qa", "task": {"name": "squad", "max_length": 64, "doc_stride": 32}})
    from tunelab.stages.base import task_of

    cfg = load_config({"stage": "extractive_qa", "task": {"name": "sst2"}})
    with pytest.raises(ConfigError, match="extractive_qa task"):
        task_of(cfg.task, "extractive_qa")
