"""Training a tokenizer for a corpus with Hugging Face `tokenizers`, saved as a folder that
`AutoTokenizer.from_pretrained(folder)` loads (tokenizer.json + tokenizer_config.json).

    folder = train_tokenizer(texts, TokenizerSpec(type="bpe", vocab_size=4096), "tok/")
    folder = cached_tokenizer(texts, spec)            # under tunelab_home()/tokenizers/, keyed by text + settings
    chars_per_token(tokenizer, heldout_texts)         # compression: characters per token

Three kinds (docs/pretraining.md has the maths):
  - bpe: byte-level BPE (GPT-2's): text as UTF-8 bytes, so every string encodes and decodes exactly; merges
    learnt greedily by pair frequency. For causal (decoder) models.
  - wordpiece: BERT's: split on whitespace and punctuation, then greedy longest-match sub-words (`##` marks a
    continuation); [CLS] text [SEP] added around each input. For masked (encoder) models. Whitespace is not
    kept (decoding puts single spaces back).
  - unigram: SentencePiece's unigram language model over Metaspace (`▁` = space) pieces: the vocabulary that
    maximises the corpus likelihood, pruned from a large seed set.

The special tokens each kind needs come first in the vocabulary (ids 0, 1, ...); `special_tokens` adds more;
`chat_template: chatml` adds <|im_start|> / <|im_end|> and sets the ChatML template, so the tokenizer
serves `stage: sft` later.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.models.loading import CHATML_TEMPLATE
from tunelab.models.sources import ModelError, tunelab_home

KINDS = ("bpe", "wordpiece", "unigram")
CHAT_TEMPLATES = ("none", "chatml")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]

# the special tokens of each kind, and which role each plays (transformers' attribute names)
ROLES = {
    "bpe": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "unigram": {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                "mask_token": "<mask>"},
}  # fmt: skip


@dataclass(frozen=True)
class TokenizerSpec:
    """What to train (the `tunelab tokenizer train` flags and the `model.tokenizer.train` config section)."""

    type: str = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    special_tokens: Sequence[str] = field(default_factory=tuple)
    chat_template: str = "none"
    lowercase: bool = False

    def __post_init__(self):
        if self.type not in KINDS:
            raise ModelError(f"tokenizer type {self.type!r}: choose one of {', '.join(KINDS)}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ModelError(f"chat template {self.chat_template!r}: choose one of {', '.join(CHAT_TEMPLATES)}")
        if self.vocab_size < self.minimum_vocab():
            raise ModelError(
                f"vocab size {self.vocab_size}: a {self.type} tokenizer needs at least {self.minimum_vocab()} "
                f"(its special tokens{' and the 256 bytes' if self.type == 'bpe' else ''} and a few pieces)"
            )

    def specials(self) -> list[str]:
        """Every special token, in id order: the kind's own, the chat tokens, then the user's."""
        out = list(dict.fromkeys(ROLES[self.type].values()))
        out += CHATML_TOKENS if self.chat_template == "chatml" else []
        return list(dict.fromkeys(out + list(self.special_tokens)))

    def minimum_vocab(self) -> int:
        base = 256 if self.type == "bpe" else 0
        return base + len(dict.fromkeys(list(ROLES[self.type].values()) + list(self.special_tokens))) + 16


def _backend(spec: TokenizerSpec):
    """(tokenizers.Tokenizer, its trainer) for `spec`, untrained."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = spec.specials()
    if spec.type == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                      special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)  # fmt: skip
    elif spec.type == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                            special_tokens=specials, show_progress=False)  # fmt: skip
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC()] + ([normalizers.Lowercase()] if spec.lowercase else [])
        )
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=spec.vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)  # fmt: skip
    if spec.type == "bpe" and spec.lowercase:
        tok.normalizer = normalizers.Lowercase()
    return tok, trainer


def _post_processor(tok, spec: TokenizerSpec):
    """WordPiece: [CLS] A [SEP] (and [CLS] A [SEP] B [SEP]) around every input, as BERT's tokenizer does."""
    if spec.type != "wordpiece":
        return
    from tokenizers import processors

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def _chunks(texts: Iterable[str], lines: int = 200) -> Iterable[str]:
    """The texts in pieces of `lines` lines, newlines kept: `tokenizers` trains in parallel over the pieces, and
    byte-level BPE learns the newline runs as it sees them."""
    for text in texts:
        parts = text.splitlines(keepends=True)
        for i in range(0, len(parts), lines):
            yield "".join(parts[i : i + lines])


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec, out_dir: str | Path):
    """Train on `texts` and save to `out_dir`; returns the transformers tokenizer (PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    tok, trainer = _backend(spec)
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    if tok.get_vocab_size() <= len(spec.specials()):
        raise ModelError("the tokenizer corpus is empty: no text to learn a vocabulary from")
    _post_processor(tok, spec)
    roles = dict(ROLES[spec.type])
    extra = [t for t in spec.specials() if t not in roles.values()]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles, extra_special_tokens=extra or None)
    if spec.chat_template == "chatml":
        fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    (out / TRAINED_RECORD).write_text(
        json.dumps(asdict(spec) | {"special_tokens": list(spec.special_tokens)}, indent=2) + "\n"
    )
    return fast


TRAINED_RECORD = "tunelab_tokenizer.json"  # the settings a folder's tokenizer was trained with


def cache_key(texts: Sequence[str], spec: TokenizerSpec) -> str:
    """sha256 of the training text and the settings (and the `tokenizers` version, whose training may change)."""
    import tokenizers

    h = hashlib.sha256()
    h.update(
        json.dumps([asdict(spec) | {"special_tokens": list(spec.special_tokens)}, tokenizers.__version__]).encode()
    )
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def cached_tokenizer(texts: Sequence[str], spec: TokenizerSpec, log=None) -> Path:
    """The folder of a tokenizer trained with `spec` on exactly `texts`: trained once, then reused from
    `tunelab_home()/tokenizers/<type>-<vocab>-<key>` (written atomically, so a crash leaves no half folder)."""
    import os
    import shutil
    import tempfile

    target = tunelab_home() / "tokenizers" / f"{spec.type}-{spec.vocab_size}-{cache_key(texts, spec)}"
    if (target / "tokenizer.json").is_file():
        return target
    if log is not None:
        log(f"training a {spec.type} tokenizer (vocabulary {spec.vocab_size}) on {sum(map(len, texts)):,} characters "
            f"(once; cached in {target})")  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        train_tokenizer(texts, spec, work / "out")
        try:
            os.replace(work / "out", target)
        except OSError:  # another process finished the same tokenizer first: theirs is the same
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def chars_per_token(tokenizer, texts: Sequence[str]) -> dict:
    """Compression on `texts`: characters, tokens (no special tokens added) and characters per token."""
    chars = sum(len(t) for t in texts)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {"characters": chars, "tokens": tokens, "chars_per_token": chars / max(tokens, 1)}


def round_trips(tokenizer, text: str) -> bool:
    """Whether decoding the encoding of `text` gives `text` back exactly (byte-level BPE always does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def train_from_files(
    files: Sequence[str],
    spec: TokenizerSpec,
    out_dir: str | Path,
    heldout_fraction: float = 0.1,
    compare: Sequence[str] = (),
    text_column: str = "text",
) -> dict:
    """`tunelab tokenizer train`: train on `files` less the held-out tail of each document (`heldout_fraction`),
    save to `out_dir`, and report the compression on the held-out text beside each tokenizer in `compare`
    (model specs; their tokenizer is loaded, not the model). Returns the report."""
    from tunelab.config import ModelConfig
    from tunelab.data.corpus import read_documents, split_documents
    from tunelab.models.loading import load_tokenizer

    docs = read_documents(list(files), text_column=text_column)
    train, heldout = split_documents(docs, heldout_fraction)
    tok = train_tokenizer([t for _, t in train], spec, out_dir)
    texts = [t for _, t in heldout]
    report = {"out": str(out_dir), "type": spec.type, "vocab_size": len(tok), "train_characters": sum(len(t) for _, t in train),
              "heldout_characters": sum(map(len, texts)), "compression": {}}  # fmt: skip
    if texts:
        report["compression"][str(out_dir)] = chars_per_token(tok, texts) | {"vocab_size": len(tok)}
        report["round_trip"] = all(round_trips(tok, t) for t in texts)
        for spec_name in compare:
            other = load_tokenizer(ModelConfig(name=spec_name))
            report["compression"][spec_name] = chars_per_token(other, texts) | {"vocab_size": len(other)}
    return report
