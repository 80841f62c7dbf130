"""Per-row predictions (evaluation/predictions.py): each path's rows give its metrics exactly, through JSONL too."""

import pytest
import torch

from tunelab.data.tasks import Task
from tunelab.evaluation import prediction_rows as R
from tunelab.evaluation import predictions as P
from tunelab.evaluation import runner
from tunelab.testing import tiny_bert, tiny_llama, tiny_tokenizer

CPU = torch.device("cpu")
TASK = Task(name="custom", type="classification", labels=("no", "yes"))
REGRESSION = Task(name="custom", type="regression", main_metric="pearson")
INSTRUCTION = Task(name="custom", type="instruction", main_metric="perplexity")
TEXTS = ["a b", "cat", "the dog", "x", "quick fox", "the lazy dog jumps", "capital of France"]
ROWS = [{"text": t, "text_pair": None, "label": i % 2} for i, t in enumerate(TEXTS)]
INSTRUCTIONS = [
    {"instruction": "Give three tips.", "input": "", "output": "Eat well, sleep enough and exercise."},
    {"instruction": "Capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Translate to German", "input": "good morning", "output": "Guten Morgen, the quick brown fox."},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_verbalizer_predictions_give_the_old_metrics_and_survive_jsonl(tok, tmp_path):
    from tunelab import metrics as M
    from tunelab.data import build_prompt_ids
    from tunelab.data.prompts import instruction, label_words
    from tunelab.methods.verbalizer import Verbalizer

    model = tiny_llama(len(tok))
    preds = P.verbalizer_predictions(model, tok, TASK, ROWS, CPU, batch_size=3, progress=False)
    assert [p["index"] for p in preds] == list(range(len(ROWS)))
    assert all(p["prediction"] == max(range(2), key=p["scores"].__getitem__) for p in preds)

    # the pre-change computation: argmax of Verbalizer.scores, one unpadded row at a time
    v = Verbalizer({w: [w, w.capitalize()] for w in label_words(TASK)}, tok, leading_space=False)
    old = []
    with torch.no_grad():
        for r in ROWS:
            ids = torch.tensor([build_prompt_ids([{"role": "user", "content": instruction(TASK, r)}], tok)])
            old.append(int(v.scores(model(input_ids=ids).logits[:, -1]).argmax(-1)))
    assert [p["prediction"] for p in preds] == old
    metrics = R.prediction_metrics(TASK, preds)
    assert metrics == M.classification_metrics(old, [r["label"] for r in ROWS], num_labels=2)
    assert runner.verbalizer_scores(model, tok, TASK, ROWS, CPU, batch_size=3, progress=False) == metrics

    path = tmp_path / "run" / "predictions.jsonl"
    R.write_predictions(path, preds)
    back = R.read_predictions(path)
    assert back == preds and R.prediction_metrics(TASK, back) == metrics
    assert [f.name for f in path.parent.iterdir()] == ["predictions.jsonl"]  # no temporary file left


def test_perplexity_rows_sum_to_the_batch_loss_and_ignore_padding(tok):
    from tunelab.config import DataConfig
    from tunelab.data import collate, render_example
    from tunelab.models.loss import token_loss_sum

    model = tiny_llama(len(tok))
    preds = P.perplexity_predictions(model, tok, INSTRUCTIONS, CPU, batch_size=3, progress=False)
    examples = [render_example(r, DataConfig(max_length=1024), tok) for r in INSTRUCTIONS]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # the batch is padded
    with torch.no_grad():
        total, count = token_loss_sum(model, collate(examples, tok.pad_token_id))
        for p, e in zip(preds, examples):  # each row alone, unpadded
            alone, n = token_loss_sum(model, collate([e], tok.pad_token_id))
            assert p["tokens"] == n > 0
            assert p["loss_sum"] == pytest.approx(float(alone), rel=1e-5)
    assert sum(p["tokens"] for p in preds) == count
    assert sum(p["loss_sum"] for p in preds) == pytest.approx(float(total), rel=1e-5)
    # the shortest row padded beside the longest one (batch of 2) against the same row alone (batch of 1)
    short = min(range(3), key=lambda i: len(examples[i]["input_ids"]))
    longest = max(range(3), key=lambda i: len(examples[i]["input_ids"]))
    pair = P.perplexity_predictions(model, tok, [INSTRUCTIONS[short], INSTRUCTIONS[longest]], CPU, 2, False)
    single = P.perplexity_predictions(model, tok, [INSTRUCTIONS[short]], CPU, 1, False)
    assert pair[0]["loss_sum"] == pytest.approx(single[0]["loss_sum"], rel=1e-5)

    metrics = R.prediction_metrics(INSTRUCTION, preds)
    assert metrics == R.perplexity_metrics(preds)
    assert metrics["tokens"] == count and metrics["loss"] == pytest.approx(float(total) / count, rel=1e-5)
    assert runner.response_perplexity(model, tok, INSTRUCTIONS, CPU, 3, False) == metrics


@pytest.mark.parametrize("task", [TASK, REGRESSION], ids=["classification", "regression"])
def test_classifier_predictions_equal_predict(tok, task):
    from tunelab.stages.classification import encode_pairs, predict, task_metrics

    regression = task.type == "regression"
    rows = [{**r, "label": 0.5 * i} for i, r in enumerate(ROWS)] if regression else ROWS
    model = tiny_bert(len(tok), num_labels=1 if regression else 2)
    preds = P.classifier_predictions(model, tok, task, rows, CPU, max_length=32, batch_size=3)
    examples = encode_pairs(rows, tok, 32, regression)
    want = predict(model, examples, tok.pad_token_id, CPU, batch_size=3)
    assert [p["prediction"] for p in preds] == want
    assert [p["label"] for p in preds] == [e["label"] for e in examples]
    assert R.prediction_metrics(task, preds) == task_metrics(task, want, [e["label"] for e in examples])
    if not regression:  # scores are log-probabilities whose argmax is the prediction
        for p in preds:
            assert sum(torch.tensor(p["scores"]).exp()) == pytest.approx(1.0)
            assert p["prediction"] == max(range(2), key=p["scores"].__getitem__)


@pytest.mark.parametrize("path", ["verbalizer", "perplexity", "classification head"])
def test_evaluate_returns_predictions_whose_metrics_are_the_result(tok, tmp_path, monkeypatch, path):
    from tunelab.data import tasks as T
    from tunelab.testing import save_tiny_model_dir

    task, rows = {"verbalizer": (TASK, ROWS), "perplexity": (INSTRUCTION, INSTRUCTIONS)}.get(path, (TASK, ROWS))
    monkeypatch.setattr(T, "get_task", lambda name: task)
    monkeypatch.setattr(T, "load_split", lambda task, split, limit=None, seed=0: rows)
    if path == "classification head":  # a classifier as load_run gives a classification run's model
        monkeypatch.setattr(runner, "_load", lambda *a: (tiny_bert(len(tok)), tok))
        model = str(tmp_path / "none")
    else:
        model = save_tiny_model_dir(tmp_path / "m")
    result = runner.evaluate(model, "custom", device="cpu", batch_size=2, progress=False, return_predictions=True)
    assert result["method"] == path
    assert len(result["predictions"]) == len(rows)
    assert R.prediction_metrics(task, result["predictions"]) == result["metrics"]
    plain = runner.evaluate(model, "custom", device="cpu", batch_size=2, progress=False)
    assert "predictions" not in plain and plain["metrics"] == result["metrics"]


# ------------------------------------------------------------------ shared prefix (verbalizer scoring)
# the instruction puts the same ~40 tokens (question, "Text:") before every row's text
LONG_ROWS = ROWS + [
    {"text": t, "text_pair": None, "label": i % 2}
    for i, t in enumerate(["Paris is the capital of France, the quick brown fox", "Guten Morgen", "sleep enough"])
]


def _tiny_mistral(vocab_size, sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=sliding_window,
        initializer_range=0.1,
        pad_token_id=0,
    )
    return MistralForCausalLM(cfg).eval()


def _lora(model):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: a random B, so the adapter changes the outputs (the default starts at zero)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def _prompt_learning(name):
    from tunelab.methods import get

    def wrap(model):
        mod = get(name)
        return mod.apply(model, mod.Config(num_virtual_tokens=5)).eval()

    return wrap


def _both_paths(monkeypatch, model, tok, rows, batch_size=3):
    """(predictions with the shared prefix, the prefixes SharedPrefix.of built, predictions without)."""
    from tunelab.methods.verbalizer import SharedPrefix

    built = []
    of = SharedPrefix.of.__func__

    def spy(cls, *a):
        built.append(of(cls, *a))
        return built[-1]

    monkeypatch.setattr(SharedPrefix, "of", classmethod(spy))
    shared = P.verbalizer_predictions(model, tok, TASK, rows, CPU, batch_size=batch_size, progress=False)
    monkeypatch.setattr(P, "SHARE_PREFIX", False)
    whole = P.verbalizer_predictions(model, tok, TASK, rows, CPU, batch_size=batch_size, progress=False)
    monkeypatch.setattr(P, "SHARE_PREFIX", True)
    return shared, built, whole


def _assert_same(shared, whole):
    assert [p["index"] for p in shared] == [p["index"] for p in whole]
    assert [p["prediction"] for p in shared] == [p["prediction"] for p in whole]
    for a, b in zip(shared, whole):
        assert a["label"] == b["label"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.parametrize(
    "make",
    [
        lambda tok: tiny_llama(len(tok)),
        lambda tok: _lora(tiny_llama(len(tok))),
        # a sliding window (16) shorter than the prefix: the cache keeps only the window's last keys
        lambda tok: _tiny_mistral(len(tok), sliding_window=16),
    ],
    ids=["llama", "lora", "mistral-sliding-window"],
)
def test_shared_prefix_scores_equal_whole_prompts(tok, monkeypatch, make):
    shared, built, whole = _both_paths(monkeypatch, make(tok), tok, LONG_ROWS)
    assert len(built) == 1 and built[0] is not None and built[0].length >= P.MIN_SHARED_PREFIX  # it was shared
    _assert_same(shared, whole)


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_prompt_learning_models_score_whole_prompts(tok, monkeypatch, name):
    """Their forward puts virtual tokens (or a prefix cache) before every row: the backbone alone would
    drop them, so these take the plain path, and the virtual tokens still count."""
    model = _prompt_learning(name)(tiny_llama(len(tok)))
    shared, built, whole = _both_paths(monkeypatch, model, tok, LONG_ROWS)
    assert built == [None]
    assert shared == whole
    bare = P.verbalizer_predictions(tiny_llama(len(tok)), tok, TASK, LONG_ROWS, CPU, batch_size=3, progress=False)
    assert [p["scores"] for p in shared] != [p["scores"] for p in bare]


def test_shared_prefix_is_not_built_for_encoder_decoders_or_tiny_inputs(tok, monkeypatch):
    from tunelab.methods.verbalizer import SharedPrefix
    from tunelab.testing import tiny_t5

    assert SharedPrefix.of(tiny_t5(len(tok)), torch.arange(3, 20)) is None
    # every row fits in one batch: the plain path
    _, built, _ = _both_paths(monkeypatch, tiny_llama(len(tok)), tok, LONG_ROWS, batch_size=len(LONG_ROWS))
    assert built == []


def test_common_prefix_leaves_every_prompt_a_token():
    assert P.common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert P.common_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # not the whole of the shorter prompt
    assert P.common_prefix_length([[1, 2], [2, 2]]) == 0
    assert P.common_prefix_length([[7, 8, 9]]) == 2
    assert P.common_prefix_length([]) == 0


@pytest.mark.parametrize("wrap", [None, _lora], ids=["llama", "lora"])
def test_padded_continuations_of_a_shared_prefix_equal_each_row_alone(wrap):
    from tunelab.methods.verbalizer import SharedPrefix, next_token_logits

    torch.manual_seed(0)
    model = tiny_llama()
    model = wrap(model) if wrap else model
    prefix_ids = torch.randint(3, 300, (12,))
    lengths = [5, 9, 1, 3]
    rest = torch.randint(3, 300, (4, 9))
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()  # right padding
    with torch.no_grad():
        prefix = SharedPrefix.of(model, prefix_ids)
        got = next_token_logits(model, rest, mask, prefix=prefix)
        again = next_token_logits(model, rest, mask, prefix=prefix)  # each batch runs on its own cache copy
        for i, n in enumerate(lengths):  # each row alone, whole and unpadded: the full logits at its last token
            alone = model(input_ids=torch.cat([prefix_ids, rest[i, :n]])[None]).logits[0, -1]
            torch.testing.assert_close(got[i], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got)
    assert prefix.cache.get_seq_length() == len(prefix_ids)


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "whole-prompts"])
def test_a_bf16_model_scores_with_fp32_logits_so_class_words_do_not_tie(monkeypatch, share_prefix):
    """bf16 logits have 8 significant bits: two class words' logits near 16 round to the same value, and the row's
    prediction is then decided by class order. The verbalizer's head runs in fp32 on a 16-bit model (in chunks of
    the vocabulary): the logits are the fp32 product of the same bf16 weights and hidden states."""
    from tunelab.methods import verbalizer as V
    from tunelab.models import precision

    monkeypatch.setattr(precision, "HEAD_CHUNK", 7)  # several chunks, the last one short (vocabulary 320)
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of tens, where bf16's steps are 0.125 and wider
        ids = torch.randint(3, 300, (4, 9))
        prefix = V.SharedPrefix.of(model, torch.randint(3, 300, (12,))) if share_prefix else None
        got = V.next_token_logits(model, ids, prefix=prefix)
        backbone, head = V.backbone_and_head(model)
        inputs = prefix.inputs(torch.ones_like(ids)) if prefix else {"attention_mask": torch.ones_like(ids)}
        hidden = backbone(input_ids=ids, **inputs).last_hidden_state[:, -1]
        rounded = head(hidden)  # what a plain bf16 head gives
    assert got.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(got, hidden.float() @ head.weight.float().T, rtol=1e-6, atol=1e-4)
    # bf16's rounding leaves fewer distinct values than the fp32 logits have (the ties this avoids)
    assert all(len(set(r.tolist())) < len(set(g.tolist())) for r, g in zip(rounded, got))


def test_a_bf16_models_perplexity_reads_each_tokens_cross_entropy_off_fp32_logits(tok):
    """Perplexity scoring of a 16-bit model: each token's cross-entropy from the fp32 product of the bf16 hidden
    states and head (not from logits rounded to bf16 first, off by up to bf16's step at each token)."""
    from tunelab.config import DataConfig
    from tunelab.data import collate, render_example
    from tunelab.models.loss import at_labels

    torch.manual_seed(0)
    model = tiny_llama(len(tok)).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits of tens, where bf16's steps are 0.125 and wider
    preds = P.perplexity_predictions(model, tok, INSTRUCTIONS, CPU, batch_size=1, progress=False)
    for p, row in zip(preds, INSTRUCTIONS):
        batch = collate([render_example(row, DataConfig(max_length=1024), tok)], tok.pad_token_id)
        with torch.no_grad():
            head, hidden, target, _ = at_labels(model, batch)
            exact = torch.nn.functional.cross_entropy(hidden.float() @ head.weight.float().T, target, reduction="sum")
            rounded = torch.nn.functional.cross_entropy(head(hidden).float(), target, reduction="sum")
        assert p["loss_sum"] == pytest.approx(float(exact), rel=1e-5)
        assert abs(p["loss_sum"] - float(rounded)) > 1e-3  # what the bf16 logits would have read


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "whole-prompts"])
def test_threaded_batches_score_bit_for_bit_as_one_at_a_time(tok, monkeypatch, share_prefix):
    """The verbalizer's batches run a thread each on a CPU (THREAD_BATCHES): the same batches as one at a
    time, so the very same floats; and torch's thread count is what it was."""
    import torch

    monkeypatch.setattr(P, "SHARE_PREFIX", share_prefix)
    model = _lora(tiny_llama(len(tok)))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(3)  # three batches at once, whatever the machine
    try:
        monkeypatch.setattr(P, "THREAD_BATCHES", True)
        threaded = P.verbalizer_predictions(model, tok, TASK, LONG_ROWS, CPU, batch_size=2, progress=False)
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(P, "THREAD_BATCHES", False)
        plain = P.verbalizer_predictions(model, tok, TASK, LONG_ROWS, CPU, batch_size=2, progress=False)
    finally:
        torch.set_num_threads(threads_before)
    assert len(LONG_ROWS) > 6 and threaded == plain  # more batches than threads, every row scored once
    assert [p["index"] for p in threaded] == list(range(len(LONG_ROWS)))
