"""The vocabulary of a GGUF file: which of llama.cpp's tokenizers reads a transformers tokenizer, and the tokens,
types, scores and names it needs to split text exactly as transformers does.

  - byte-level BPE (GPT-2 / SmolLM2 / Llama 3 / Qwen): llama.cpp's `gpt2` tokenizer, the merges and the
    pre-tokenizer's name (`pre_tokenizer_name`: given, llama.cpp's fingerprint table, or an exact layout);
  - SentencePiece-style BPE with byte fallback (Llama 2 / Mistral 7B / TinyLlama / Gemma / Phi-3): llama.cpp's
    `llama` tokenizer, with scores made from the merges' order where that gives transformers' ids (`spm_scores`);
  - general.name, which llama.cpp reads for Phi-3's whitespace stripping (`file_name`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field

from tunelab.export import ExportError
from tunelab.export.pretokenizers import FINGERPRINTS, LLAMA_CPP_PRE_TOKENIZERS, PROBE_TEXT


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the ids the tokenizer gives llama.cpp's probe text: how convert_hf_to_gguf.py tells
    pre-tokenizers apart (special tokens added as `encode` adds them by default, as there)."""
    ids = tokenizer.encode(PROBE_TEXT)
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


# Qwen2's split (its tokenizer.json, and transformers' Qwen2Tokenizer): llama.cpp's `qwen2` pre-tokenizer
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _layout_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name when the tokenizer.json splits text exactly as one of llama.cpp's regex sets.

    Three layouts, checked strictly: with no normalizer and ByteLevel with GPT-2's regex and no prefix space,
    ByteLevel alone is GPT-2's split (`gpt-2`) and single digits first, then GPT-2's split, SmolLM's (`smollm`);
    Qwen2's regex as an isolating Split before a regex-free ByteLevel (NFC-normalised, as Qwen2's own
    tokenizer.json, which convert_hf_to_gguf.py also writes as `qwen2`) is `qwen2`. Anything else is left to the
    fingerprint table, so an unknown tokenizer is refused rather than guessed."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel":
        return None
    byte_level = steps[-1]
    if (
        len(steps) == 2
        and spec.get("normalizer") in (None, {"type": "NFC"})
        and steps[0] == {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
        and byte_level.get("use_regex") is False
        and not byte_level.get("add_prefix_space")
    ):
        return "qwen2"
    if spec.get("normalizer"):
        return None
    if not byte_level.get("use_regex", True) or byte_level.get("add_prefix_space"):
        return None
    head = steps[:-1]
    if not head:
        return "gpt-2"
    if len(head) == 1 and head[0].get("type") == "Digits" and head[0].get("individual_digits"):
        return "smollm"
    return None


def pre_tokenizer_name(tokenizer, given: str | None = None) -> tuple[str, str]:
    """(`tokenizer.ggml.pre`, how it was found) for a byte-level BPE tokenizer; ExportError when llama.cpp
    would not know it.

    In order: `given` (the value of the GGUF file the model was converted from, or the user's choice);
    the fingerprint of the probe text in llama.cpp's table (what convert_hf_to_gguf.py does); the
    tokenizer.json layout when it is exactly GPT-2's or SmolLM's split (a tokenizer trained with
    those rules, as tunelab's tiny test tokenizer is, has a vocabulary of its own and so a fingerprint
    no table lists).
    """
    if given is not None:
        if given not in LLAMA_CPP_PRE_TOKENIZERS:
            raise ExportError(
                f"llama.cpp knows no pre-tokenizer {given!r}; known: {', '.join(sorted(LLAMA_CPP_PRE_TOKENIZERS))}"
            )
        return given, "given"
    digest = tokenizer_fingerprint(tokenizer)
    if digest in FINGERPRINTS:
        name, _ref = FINGERPRINTS[digest]
        if name in LLAMA_CPP_PRE_TOKENIZERS:
            return name, "fingerprint"
    layout = _layout_pre_tokenizer(tokenizer)
    if layout is not None:
        return layout, "layout"
    raise ExportError(
        f"llama.cpp would refuse this tokenizer ({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}): "
        f"its pre-tokenizer (how text is split before BPE) is not one llama.cpp recognises (probe fingerprint "
        f"{digest[:16]}..., as llama.cpp's convert_hf_to_gguf.py computes it). If you know which of llama.cpp's "
        "pre-tokenizers splits text the way this tokenizer does, pass it: `tunelab export RUN --format gguf "
        "--pre-tokenizer NAME` (write_gguf(..., pre_tokenizer=NAME)); otherwise export with --format hf and "
        "convert with a llama.cpp whose convert_hf_to_gguf.py knows the model."
    )


def tokenizer_kind(tokenizer) -> str:
    """`bpe`: byte-level BPE (GPT-2 / SmolLM2 / Llama 3 / Qwen style), llama.cpp's `gpt2` tokenizer model; `spm`:
    SentencePiece-style BPE with byte fallback (Llama 2 / Mistral 7B / TinyLlama), its `llama` one; ExportError
    for another."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "bpe"
    if (
        model.get("type") == "BPE"
        and model.get("byte_fallback")
        and any(d.get("type") == "ByteFallback" for d in steps)
    ):
        return "spm"
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers (GPT-2 / SmolLM2 / Llama 3 / Qwen style) and SentencePiece-"
        f"style BPE with byte fallback (Llama 2 / Mistral 7B / TinyLlama); this one is {model.get('type')} with "
        f"decoder {decoder.get('type')}. Export with --format hf instead."
    )


def token_types(tokenizer, n_vocab: int, kind: str):
    """Tokens in id order (padded with [PADi] up to the embedding size) and their llama.cpp types."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(reverse) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(reverse)} but the model embeds only {n_vocab} tokens")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        if kind == "spm" and i == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "spm" and re.fullmatch(r"<0x[0-9A-F]{2}>", reverse[i]):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def spm_scores(tokenizer) -> tuple[dict[str, float], bool, str | None]:
    """({piece: score}, add_space_prefix, a note) for llama.cpp's SentencePiece tokenizer, which merges the adjacent
    pair whose concatenation is the best-scored piece, where transformers' BPE merges the pair earliest in `merges`.
    The two agree when every split of a piece into two pieces is a merge and each piece's merges sit together
    in the list (as transformers' converter of a SentencePiece model writes them: it lists every split, ordered
    by the piece's score); the score is then minus the piece's place. Pieces of equal score have their merges
    interleaved instead: accepted where llama.cpp's ties give the same ids (_check_tied_runs). Else refused.
    Spaces: llama.cpp puts a ▁ before the text and after each special token (add_space_prefix), as Llama 2's
    normalizer and a Metaspace pre-tokenizer with prepend_scheme `always` do; `first` (transformers 5's
    LlamaTokenizer with legacy: false) puts none after a special token, which the note says."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    space, note = _spm_spaces(spec)
    model = spec["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i not in tokenizer.added_tokens_decoder}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    known = set(merges)
    for piece in vocab:
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab and (piece[:k], piece[k:]) not in known:
                raise ExportError(f"{piece!r} = {piece[:k]!r} + {piece[k:]!r} is no merge of the tokenizer: {_SPM_FIX}")
    # the pieces whose merges sit apart in the list: transformers' converter orders pieces of equal score (Llama
    # 2's runs of ▁, all at -1e9) by the lengths of their parts, so their merges interleave at the list's end
    first, last = {}, {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
        last[a + b] = rank
    apart = [first[t] for t in first if any("".join(merges[r]) != t for r in range(first[t], last[t]))]
    tied = {a + b for a, b in merges[min(apart) :]} if apart else set()  # from the first of them to the end
    if tied:
        _check_tied_runs(tokenizer, merges, tied, vocab)
    floor = -float(len(merges))
    return {t: floor if t in tied else -float(r) for t, r in first.items()}, space, note


def _check_tied_runs(tokenizer, merges: list, tied: set, vocab: dict) -> None:
    """Pieces whose merges interleave are given one score, the lowest, and llama.cpp breaks their ties leftmost.
    That gives transformers' ids when each is a run of one character (Llama 2's ▁▁ ... ▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁▁; runs of
    line ends or tabs alike), merged after every other piece, never part of another piece, and every run up to
    twice the longest splits the same way both ways (simulated here, llama.cpp's bigram queue against
    transformers' own model; runs of different characters never merge with each other)."""
    if any(len(set(t)) != 1 for t in tied):
        raise ExportError(f"the merges of {sorted(tied)[:3]} ... are not together in the tokenizer's list: {_SPM_FIX}")
    if any((a in tied or b in tied) and a + b not in tied for a, b in merges):
        raise ExportError(f"a piece is made from a run of one character, which merges last: {_SPM_FIX}")
    for c in sorted({t[0] for t in tied}):
        longest = max(len(t) for t in tied if t[0] == c)
        for n in range(2, 2 * longest + 1):
            pieces = [c] * n
            while True:  # llama.cpp: the best-scored pair (all tied here), leftmost first
                at = next((i for i in range(len(pieces) - 1) if pieces[i] + pieces[i + 1] in tied), None)
                if at is None:
                    break
                pieces[at : at + 2] = [pieces[at] + pieces[at + 1]]
            if [vocab[p] for p in pieces] != [t.id for t in tokenizer.backend_tokenizer.model.tokenize(c * n)]:
                raise ExportError(f"a run of {n} {c!r} splits differently in llama.cpp: {_SPM_FIX}")


def _spm_spaces(spec: dict) -> tuple[bool, str | None]:
    """(add_space_prefix, note) of a SentencePiece-style tokenizer's space handling; ExportError for another."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    if not pre and steps in ([{"type": "Prepend", "prepend": "▁"}, replace], [replace]):  # Llama 2's tokenizer.json
        return len(steps) == 2, None
    # Gemma's: no ▁ before the text; its split at spaces finds none left once they are ▁ (a no-op)
    gemma_split = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    if pre == gemma_split and steps == [replace]:
        return False, None
    inner = any("▁" in piece[1:] for piece in spec["model"]["vocab"])
    if (
        not steps
        and pre.get("type") == "Metaspace"
        and pre.get("replacement") == "▁"
        and not (pre.get("split") and inner)
    ):
        scheme = pre.get("prepend_scheme", "always")
        note = {
            "always": "llama.cpp puts one ▁ more where a text, or the text after a special token, begins with a space: "
            "this tokenizer (Metaspace, prepend_scheme always) adds its ▁ only to text that does not start with one",
            "first": "llama.cpp puts a ▁ before text that follows a special token, where this tokenizer (Metaspace, "
            "prepend_scheme first: transformers' LlamaTokenizer with legacy: false) puts none (`</s>a`: `▁a` there), "
            "and one ▁ more where a text begins with a space",
        }.get(scheme)
        if note:
            note += "; llama.cpp's own convert_hf_to_gguf.py writes the same file (tokenizer.ggml.add_space_prefix)"
        return scheme != "never", note
    raise ExportError(
        "GGUF export of a SentencePiece-style tokenizer needs its spaces as ▁ (Llama 2's normalizer, or a Metaspace "
        f"pre-tokenizer); this one has normalizer {norm.get('type')} and pre-tokenizer {pre.get('type')}, which "
        "llama.cpp would split differently. Export with --format hf."
    )


_SPM_FIX = ("llama.cpp would merge pieces in another order than transformers here; export with --format hf and convert "
            "with llama.cpp's convert_hf_to_gguf.py from the model's tokenizer.model")  # fmt: skip


@dataclass
class Vocabulary:
    """What the GGUF file's tokenizer holds, worked out (and checked) once, before anything is written."""

    kind: str  # bpe | spm (tokenizer_kind)
    tokens: list[str]
    types: list
    pre: str | None  # bpe: tokenizer.ggml.pre
    pre_from: str
    scores: list[float] | None = None  # spm
    space_prefix: bool = False  # spm: add_space_prefix
    notes: list[str] = field(default_factory=list)  # what llama.cpp will split otherwise than transformers


def vocabulary(tokenizer, n_vocab: int, pre_tokenizer: str | None = None) -> Vocabulary:
    """The Vocabulary of `tokenizer` for a model embedding `n_vocab` tokens; ExportError for one GGUF cannot hold."""
    kind = tokenizer_kind(tokenizer)
    tokens, types = token_types(tokenizer, n_vocab, kind)
    if kind == "bpe":
        return Vocabulary(kind, tokens, types, *pre_tokenizer_name(tokenizer, pre_tokenizer))
    scores, space, note = spm_scores(tokenizer)
    return Vocabulary(kind, tokens, types, None, "SentencePiece (no pre-tokenizer)",
                      [scores.get(t, 0.0) for t in tokens], space, [note] if note else [])  # fmt: skip


def add_tokenizer(writer, tokenizer, vocab: Vocabulary) -> None:
    import gguf

    kind = vocab.kind
    if kind == "spm":  # llama.cpp's SentencePiece tokenizer: scores instead of merges, no pre-tokenizer
        writer.add_tokenizer_model("llama")
        writer.add_token_list(vocab.tokens)
        writer.add_token_scores(vocab.scores)
        writer.add_token_types(vocab.types)
        writer.add_add_space_prefix(vocab.space_prefix)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads the files save_pretrained writes
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=kind == "bpe", n_vocab=len(vocab.tokens))
    if kind == "bpe" and not special.merges:
        raise ExportError("the tokenizer has no BPE merges; GGUF byte-level BPE needs them")
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    if "bos" not in special.add_special_token:  # llama.cpp would otherwise guess; say what HF does
        bos = tokenizer.bos_token_id
        ids = tokenizer("a")["input_ids"]
        special.add_special_token["bos"] = bos is not None and bool(ids) and ids[0] == bos
    special.add_to_gguf(writer, quiet=True)


def file_name(name: str, tokenizer) -> tuple[str, str | None]:
    """(general.name, a note). llama.cpp gives the special tokens of any file whose name holds "phi3" or "phi-3"
    Phi-3's whitespace stripping (every added token strips the spaces after it, but <unk>, <s> and <|endoftext|>;
    </s> too), and no other file any: the name decides how text after a special token is split. So the name
    holds "phi3" exactly when the tokenizer strips as Phi-3's does (Phi-3's own does), and never when it strips
    nothing (a run folder called phi3-... of another model: llama.cpp would also look for Phi-3's <|endoftext|>)."""
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    strips = {c for c, t in added.items() if t.rstrip}
    phi3 = (set(added) | ({"</s>"} & set(tokenizer.get_vocab()))) - {"<unk>", "<s>", "<|endoftext|>"}
    named = any(k in name.lower() for k in ("phi3", "phi-3"))
    if strips and strips == phi3 and "<|endoftext|>" in added:
        return (name if named else f"{name} (phi3)"), None
    cleaned = re.sub(r"(?i)phi-?3", "phi_3", name)
    if strips:
        return cleaned, (f"this tokenizer strips the spaces after {', '.join(sorted(strips))}; llama.cpp keeps them, "
                         "so text right after those tokens splits differently there")  # fmt: skip
    return cleaned, None
