"""What decides a model spec's token ids, found from its files on disk without loading (or importing) anything:
the data store keys its token cache by it, so that a cache hit needs no tokenizer (docs/data.md)."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tunelab.models.sources import ModelError, resolve

# what AutoTokenizer reads from a model folder (config.json: the tokenizer class when tokenizer_config.json
# names none); a folder's other files (weights) do not change the ids
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "config.json")  # fmt: skip


def tokenizer_digest(cfg) -> str | None:
    """A digest of the files load_tokenizer(cfg) reads, the libraries that read them and tunelab's own
    defaults (its chat template when a tokenizer has none); None where those files are not a local folder
    (a hub id: its files are not known until transformers fetches them) or the tokenizer may run its own code."""
    from tunelab.models.loading import CHATML_TEMPLATE

    if cfg.trust_remote_code or cfg.architecture:  # a model from scratch: its tokenizer is model.tokenizer's
        return None
    folder = Path(cfg.name).expanduser()
    if not ((folder / "tokenizer_config.json").is_file() and not (folder / "config.json").is_file()):
        try:  # a named default is built once into a folder; when it is, this only finds that folder
            folder = Path(resolve(cfg.name))
        except ModelError:
            return None
        if not folder.is_dir():
            return None
    h = hashlib.blake2b(digest_size=16)
    for path in [*(folder / n for n in _TOKENIZER_FILES), *sorted(folder.glob("additional_chat_templates/*"))]:
        if path.is_file():
            h.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    for package in ("transformers", "tokenizers", "jinja2"):
        try:
            h.update(f"{package}={version(package)}\0".encode())
        except PackageNotFoundError:
            pass
    h.update(CHATML_TEMPLATE.encode())
    if cfg.new_special_tokens:  # tokens added on loading (models/new_tokens.py) split the text differently
        h.update(b"\0new_special_tokens\0" + "\0".join(cfg.new_special_tokens).encode())
    return h.hexdigest()
