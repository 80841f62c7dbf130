"""Tokenizer training (tunelab/models/tokenizer_train.py, `tunelab tokenizer train`) and the character
n-gram baselines (tunelab/metrics/char_ngram.py)."""

import json
import math

import pytest
from transformers import AutoTokenizer

from tunelab.cli import main
from tunelab.metrics.char_ngram import bigram_nll, char_ngram_baselines, unigram_nll
from tunelab.models import ModelError
from tunelab.models.tokenizer_train import TokenizerSpec, cached_tokenizer, chars_per_token, train_tokenizer

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 30
HELDOUT = "All:\nResolved, speak further, we die.\n\nFirst Citizen:\nSpeak.\n"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_each_type_trains_loads_with_autotokenizer_and_round_trips(kind, tmp_path):
    spec = TokenizerSpec(type=kind, vocab_size=400, min_frequency=1)
    train_tokenizer([CORPUS], spec, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)  # the folder is a plain Hugging Face tokenizer
    assert 40 < len(tok) <= 400
    ids = tok(HELDOUT, add_special_tokens=False)["input_ids"]
    text = tok.decode(ids, clean_up_tokenization_spaces=False)
    if kind == "wordpiece":  # BERT's pre-tokenizer drops whitespace: the words come back, single-spaced
        assert "".join(text.split()) == "".join(HELDOUT.split())
        assert tok(HELDOUT)["input_ids"][0] == tok.cls_token_id and tok(HELDOUT)["input_ids"][-1] == tok.sep_token_id
        assert tok.mask_token_id is not None and tok.pad_token_id is not None
    else:
        assert text == HELDOUT  # byte-level BPE and unigram keep every character of this text
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # a trained vocabulary compresses its own kind of text: more than a character per token
    assert chars_per_token(tok, [HELDOUT])["chars_per_token"] > 1.5


def test_chat_template_and_special_tokens(tmp_path):
    spec = TokenizerSpec(
        type="bpe", vocab_size=300, min_frequency=1, special_tokens=("<|sep|>",), chat_template="chatml"
    )
    train_tokenizer([CORPUS], spec, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for special in ("<|im_start|>", "<|im_end|>", "<|sep|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1  # never split
    text = tok.apply_chat_template([{"role": "user", "content": "Speak."}], tokenize=False)
    assert text == "<|im_start|>user\nSpeak.<|im_end|>\n"


def test_cache_reuses_the_same_text_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    spec = TokenizerSpec(type="bpe", vocab_size=300, min_frequency=1)
    a = cached_tokenizer([CORPUS], spec)
    mtime = (a / "tokenizer.json").stat().st_mtime_ns
    assert cached_tokenizer([CORPUS], spec) == a and (a / "tokenizer.json").stat().st_mtime_ns == mtime
    assert cached_tokenizer([CORPUS + "x"], spec) != a  # other text: another tokenizer
    assert cached_tokenizer([CORPUS], TokenizerSpec(type="bpe", vocab_size=280, min_frequency=1)) != a


def test_bad_settings_are_named():
    with pytest.raises(ModelError, match="tokenizer type 'bpee'"):
        TokenizerSpec(type="bpee")
    with pytest.raises(ModelError, match="vocab size 100: a bpe tokenizer needs at least"):
        TokenizerSpec(type="bpe", vocab_size=100)


def test_cli_reports_compression_beside_another_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS + HELDOUT * 5)
    other = tmp_path / "other"
    train_tokenizer([CORPUS], TokenizerSpec(type="unigram", vocab_size=200), other)
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--min-frequency", "1", "--out", str(out),
               "--compare", str(other), "--json"])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    heldout = report["heldout_characters"]
    assert 0 < heldout < len(corpus.read_text()) * 0.2
    ours, theirs = report["compression"][str(out)], report["compression"][str(other)]
    assert ours["characters"] == theirs["characters"] == heldout
    assert ours["chars_per_token"] == pytest.approx(heldout / ours["tokens"])
    assert report["round_trip"] is True
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2


def test_ngram_baselines_match_hand_computation():
    # train "aab": alphabet {a, b}, V = 3 (with the unknown symbol), N = 3
    # unigram: P(a) = (2+1)/(3+3) = 1/2, P(b) = (1+1)/6 = 1/3, P(c unseen) = 1/6
    assert unigram_nll(["aab"], ["ab"]) == pytest.approx(math.log(2) + math.log(3))
    assert unigram_nll(["aab"], ["c"]) == pytest.approx(math.log(6))
    # bigram: pairs aa, ab; n(a .) = 2. "ab": P(a) by the unigram = 1/2, P(b|a) = (1+1)/(2+3) = 2/5
    assert bigram_nll(["aab"], ["ab"]) == pytest.approx(math.log(2) + math.log(5 / 2))
    # "ba": P(b) = 1/3, P(a|b) = (0+1)/(0+3) = 1/3;  "ac": P(a) = 1/2, P(unknown|a) = (0+1)/(2+3)
    assert bigram_nll(["aab"], ["ba"]) == pytest.approx(2 * math.log(3))
    assert bigram_nll(["aab"], ["ac"]) == pytest.approx(math.log(2) + math.log(5))
    out = char_ngram_baselines(["aab"], ["ab", "ba"])
    assert out["characters"] == 4 and out["alphabet"] == 2
    assert out["bigram_ppl_per_char"] == pytest.approx(math.exp((math.log(5) + 2 * math.log(3)) / 4))
    assert out["unigram_bits_per_char"] == pytest.approx(2 * math.log(6) / 4 / math.log(2))
