"""Large data sets: rows validated once into Arrow files, tokenised by several processes, cached on disk by
content, and read back memory-mapped, so preparation holds a bounded amount in memory and a second run with
the same data, tokenizer and settings starts at once.

    if uses_store(cfg.data):
        check(cfg.data, seed, stage)                          # before the model loads: every row, file + line
        bundle = prepare(cfg.data, tokenizer, seed, stage)    # DataBundle of ArrowExamples (same examples)

Two caches under `data_cache_dir()` ($TUNELAB_HOME/cache/data, default ~/.cache/tunelab/cache/data), each
entry a folder written under a temporary name and renamed when complete (an interrupted run leaves none):

- `rows/KEY`: one source's rows, validated, as JSON text beside their line numbers. KEY hashes the file's
  bytes (hub and `task:` sources: the rows themselves), its format and columns, the stage and DATA_VERSION.
- `tokens/KEY`: those rows tokenised: input_ids, labels (truncated to max_length), length, label count,
  truncated and dropped flags, one Arrow file per tokenising process. KEY adds the tokenizer (the digest of
  its files that the caller passes, models.fingerprint.tokenizer_digest, else its whole serialised vocabulary
  and merges, chat template and special ids), max_length, train_on_prompt, the system prompt and how many
  rows are needed. With the digest, a hit loads no tokenizer at all (`tokenizer` may be a function that
  loads it).

Tokenising (encoder.py): one chat-template render per conversation, one tokenizer call per 1,024 rows, the
labels from the tokens' offsets in numpy, written as Arrow columns. This process takes the first share of
the rows; each other share goes to a process started fresh (`spawn`), which imports python, `tokenizers`,
jinja and pyarrow only, not torch or a model this process may hold (a forked worker would carry them).

Which rows train and which validate (limit, samples / weight, val_fraction, seeds) is worked out on row
positions with the very functions the in-memory path uses (`sources.mix_indices`, `build.split_rows`),
so both paths choose the same rows; packing runs on the cached length column. Small data stays on the
in-memory path (`data.cache: auto`): the store's fixed cost (processes, files) would only slow it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.bytebpe import WordMemo
from tunelab.data.encoder import Encoder, ShapeMismatch, encode_rows, encoder_for
from tunelab.data.errors import DataError, check_kept, source_names, where
from tunelab.data.formats import detect_format, row_to_messages, row_to_text
from tunelab.data.packing import pack_plan, packed_row
from tunelab.data.readers import iter_rows
from tunelab.data.sources import Source, cap_validation, mix_indices, resolve, split_rows
from tunelab.data.tasks import read_source
from tunelab.data.templating import IGNORE, render_examples
from tunelab.files import write_json_atomic

log = logging.getLogger("tunelab.data")

DATA_VERSION = 1  # raise when a change to reading or encoding changes what a cache entry holds
STORE_BYTES = 16 * 1024 * 1024  # data.cache: auto takes the store from this many bytes of local files
_WRITE_ROWS = 4096  # rows per Arrow record batch written by the scan
_ENCODE_BATCH = 1024  # rows per tokenizer call (and per record batch written) in a tokenising process
_MIN_SHARE = 1024  # rows a tokenising process is started for, at least


def data_cache_dir() -> Path:
    # the rule of models.sources.tunelab_home, which this layer may not import
    env = os.environ.get("TUNELAB_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"
    return home / "cache" / "data"


def _hash(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> content hash: check and build hash a file once


def file_digest(path: Path) -> str:
    """A hash of the file's bytes. Recorded under digests/ beside its size, mtime and inode, and taken from
    there while those are unchanged (a second start does not read a large file again); as git's index does
    with `racy` entries, a record is not trusted for a file modified within 2 s before it was hashed, since a
    later write in the same timestamp tick could keep the size and mtime."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    record = data_cache_dir() / "digests" / f"{_hash(memo[0])}.json"
    seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ino": stat.st_ino}
    try:
        saved = json.loads(record.read_text())
        if {k: saved[k] for k in seen} == seen and saved["hashed_at_ns"] - stat.st_mtime_ns > 2_000_000_000:
            _DIGESTS[memo] = saved["digest"]
            return saved["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hashed_at = time.time_ns()
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    _DIGESTS[memo] = h.hexdigest()
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {**seen, "hashed_at_ns": hashed_at, "digest": _DIGESTS[memo], "path": memo[0]})
    return _DIGESTS[memo]


def _local(path: str) -> Path | None:
    p = Path(path).expanduser()
    return p if not path.startswith("task:") and p.is_file() and not path.lower().endswith(".parquet") else None


def _entries(cfg: DataConfig, stage: str):
    """(sources of train, sources of validation or [], hub split of validation)."""
    train = resolve(cfg, stage)
    if not cfg.validation:
        return train, [], cfg.hub_split
    return train, resolve(cfg, stage, [cfg.validation]), "validation" if cfg.validation == cfg.train else cfg.hub_split


def uses_store(cfg: DataConfig, stage: str = "sft") -> bool:
    """data.cache: on, or auto with at least STORE_BYTES of local data files; off: the in-memory path.
    A source read as a slice (`split: train[:10%]`) is taken in memory: the store reads whole files."""
    if not cfg.train:
        return False
    train, val, _ = _entries(cfg, stage)
    if any(s.split for s in train + val):
        if cfg.cache == "on":
            log.info("data.cache: on, but a source is read as a split slice: read in memory instead")
        return False
    if cfg.cache != "auto":
        return cfg.cache == "on"
    return sum(p.stat().st_size for s in train + val if (p := _local(s.path))) >= STORE_BYTES


# ---------------------------------------------------------------------------------------- rows
@dataclass
class Scanned:
    """One source's validated rows on disk."""

    label: str  # the file name its rows carry in messages (readers' `file`)
    cfg: DataConfig  # format resolved
    path: Path  # the rows/KEY folder
    n: int
    key: str
    hit: bool


def _row_key_cfg(cfg: DataConfig) -> dict:
    return cfg.model_dump(mode="json", include={"format", "columns", "system_prompt", "roles"})


def _scan(src: Source, stage: str, hub_split: str, hub_config: str | None) -> Scanned:
    import pyarrow as pa

    local = _local(src.path)
    base = data_cache_dir() / "rows"
    about = [DATA_VERSION, stage, _row_key_cfg(src.cfg), src.path if local is None else None, hub_split, hub_config]
    key = _hash(about, file_digest(local)) if local is not None else None
    if key is not None and (base / key / "meta.json").is_file():
        meta = json.loads((base / key / "meta.json").read_text())
        return Scanned(meta["label"], DataConfig(**meta["cfg"]), base / key, meta["n"], key, True)
    rows = iter_rows(src.path, hub_split=hub_split, hub_config=hub_config) if local is not None else iter(
        read_source(src.path, hub_split=hub_split, hub_config=hub_config))  # fmt: skip
    tmp = base / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    content = hashlib.blake2b(digest_size=16)  # hub and task: sources are keyed by their rows
    schema = pa.schema([("line", pa.int64()), ("row", pa.large_string())])
    eff, label, n, lines, texts = src.cfg, src.path, 0, [], []
    try:
        with pa.OSFile(str(tmp / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for file, number, row in rows:
                if n == 0:
                    label = file
                    if eff.format == "auto":
                        eff = eff.model_copy(update={"format": detect_format(row, eff, stage, where(file, number))})
                        log.info("data: %s: detected format %s", src.path, eff.format)
                (row_to_text if eff.format == "text" else row_to_messages)(row, eff, where(file, number))
                text = json.dumps(row, ensure_ascii=False)
                if local is None:
                    content.update(text.encode())
                lines.append(number)
                texts.append(text)
                n += 1
                if len(lines) == _WRITE_ROWS:
                    writer.write_batch(
                        pa.record_batch(
                            [pa.array(lines, pa.int64()), pa.array(texts, pa.large_string())], schema=schema
                        )
                    )
                    lines, texts = [], []
            if lines:
                writer.write_batch(
                    pa.record_batch([pa.array(lines, pa.int64()), pa.array(texts, pa.large_string())], schema=schema)
                )
        if key is None:
            key = _hash(about, content.hexdigest())
        meta = {"label": label, "cfg": eff.model_dump(mode="json"), "n": n, "source": src.path}
        (tmp / "meta.json").write_text(json.dumps(meta))
        final = _publish(tmp, base / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Scanned(label, eff, final, n, key, False)


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished entry into place; another process that finished the same entry first wins."""
    try:
        tmp.rename(final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check(cfg: DataConfig, seed: int, stage: str = "sft") -> tuple[list[Scanned], list[Scanned]]:
    """Every row of every source read and checked (the in-memory path's check_rows), into the rows cache."""
    if not cfg.train:
        raise DataError("data.train is not set: give a .json/.jsonl/.csv/.tsv file or a hub dataset id.")
    train, val, val_split = _entries(cfg, stage)
    scans = [_scan(s, stage, cfg.hub_split, cfg.hub_config) for s in train]
    return scans, [_scan(s, stage, val_split, cfg.hub_config) for s in val]


def select(cfg: DataConfig, seed: int, train: list[Scanned], val: list[Scanned], stage: str = "sft"):
    """(train positions, validation positions, rows read): positions into the sources' rows laid end to end,
    train sources first. The choices of read_split, made on positions (see the module docstring)."""
    srcs, val_srcs, _ = _entries(cfg, stage)
    offset, mixed = 0, []
    for scan, src in zip(train, srcs):
        mixed += [offset + i for i in mix_indices(scan.n, src, seed)]
        offset += scan.n
    mixed = mixed[: cfg.limit]
    if not mixed:
        raise DataError(f"{source_names(cfg.train)}: no rows to train on.")
    if not val:
        train_pos, val_pos = split_rows(mixed, cfg.val_fraction, seed, cfg.val_max_rows)
        return train_pos, val_pos, len(mixed)
    val_pos = []
    for scan, src in zip(val, val_srcs):
        val_pos += [offset + i for i in mix_indices(scan.n, src, seed)]
        offset += scan.n
    train_pos, _ = split_rows(mixed, 0.0, seed)
    val_pos = cap_validation(val_pos, cfg.val_max_rows, seed)
    return train_pos, val_pos, len(mixed) + len(val_pos)


# -------------------------------------------------------------------------------------- tokens
def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids: the serialised tokenizer (vocabulary, merges, normaliser, added tokens), or a slow
    tokenizer's vocabulary, plus its class, chat template and special ids. Callers that can name the files
    the tokenizer is loaded from pass a digest of those instead (`fingerprint`), which needs no tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return _hash(type(tokenizer).__name__, vocab, getattr(tokenizer, "chat_template", None), special)


def _schema():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.schema([("input_ids", ints), ("labels", ints), ("length", pa.int32()), ("label_count", pa.int32()),
                      ("truncated", pa.bool_()), ("dropped", pa.bool_())])  # fmt: skip


def _columns(examples, max_length: int):
    """(ids, labels) arrays -> a record batch of the token columns, truncated and flagged as _encode_all
    (build.py) counts them."""
    import numpy as np
    import pyarrow as pa

    ids_out, labels_out, truncated, dropped, counts = [], [], [], [], []
    for ids, labels in examples:
        truncated.append(len(ids) > max_length)
        ids, labels = ids[:max_length], labels[:max_length]
        gone = not (labels[1:] != IGNORE).any()  # position 0 is never a target (causal shift)
        if gone:
            ids, labels = ids[:0], labels[:0]
        dropped.append(gone)
        counts.append(int((labels != IGNORE).sum()))
        ids_out.append(ids)
        labels_out.append(labels)
    lengths = np.fromiter(map(len, ids_out), dtype=np.int32, count=len(ids_out))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def lists(parts):
        values = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    columns = [lists(ids_out), lists(labels_out), pa.array(lengths), pa.array(np.array(counts, dtype=np.int32)),
               pa.array(truncated, pa.bool_()), pa.array(dropped, pa.bool_())]  # fmt: skip
    return pa.record_batch(columns, schema=_schema())


def num_processes(cfg: DataConfig, rows: int) -> int:
    if cfg.num_proc:
        return cfg.num_proc
    # a process costs ~1-2 s to start (python, tokenizers, jinja) and a copy of the tokenizer: worth it from a
    # few thousand rows; each then tokenises its batches on one thread (the cores are the processes')
    return max(1, min(os.cpu_count() or 1, 8, rows // 4000))


def encode_share(enc: Encoder | None, tokenizer, rows_file: str, start: int, stop: int, cfg: dict, label: str,
                 max_length: int, out: str, threads: bool = True) -> int:  # fmt: skip
    """Rows [start, stop) of a rows entry -> `out`, an Arrow stream of the token columns. Runs in a tokenising
    process (spawned: `tokenizer` is None there and the Rust tokenizer is made from `enc`) or in this one."""
    import numpy as np
    import pyarrow as pa

    if not threads:  # one process per core: the tokenizer's own thread pool would only contend with them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    backend = None
    if enc is not None:
        from tokenizers import Tokenizer

        backend = tokenizer.backend_tokenizer if tokenizer is not None else Tokenizer.from_str(enc.backend)
        memo = WordMemo.of(backend)
    cfg = DataConfig(**cfg)
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, _schema()) as writer:
        for part in _row_batches(rows_file, start, stop):
            rows = [(json.loads(r), cfg, where(label, n))
                    for r, n in zip(part.column("row").to_pylist(), part.column("line").to_pylist())]  # fmt: skip
            if enc is not None:
                examples = encode_rows(rows, enc, backend, memo)
            else:
                examples = [(np.array(e["input_ids"], np.int32), np.array(e["labels"], np.int32))
                            for e in render_examples(rows, tokenizer)]  # fmt: skip
            writer.write_batch(_columns(examples, max_length))
    return stop - start


def _row_batches(rows_file: str, start: int, stop: int):
    """Rows [start, stop) of a rows entry, _ENCODE_BATCH at a time, read as a stream rather than memory-mapped:
    a mapped file's pages, once read, count in the process's resident memory for as long as it runs."""
    import pyarrow as pa

    at = 0
    with pa.OSFile(rows_file) as f:
        for batch in pa.ipc.open_stream(f):
            a, b = max(start - at, 0), min(stop - at, batch.num_rows)
            at += batch.num_rows
            for i in range(a, b, _ENCODE_BATCH):
                yield batch.slice(i, min(_ENCODE_BATCH, b - i))
            if at >= stop:
                return


def _tokenise(scan: Scanned, upto: int, cfg: DataConfig, get_tokenizer, tok_fp: str) -> tuple[Path, bool]:
    base = data_cache_dir() / "tokens"
    settings = cfg.model_dump(mode="json", include={"max_length", "train_on_prompt", "system_prompt"})
    key = _hash(DATA_VERSION, scan.key, tok_fp, settings, upto)
    final = base / key
    if (final / "meta.json").is_file():
        return final, True
    tok = get_tokenizer()
    tmp = base / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        enc = _encoder(tok)
        eff = scan.cfg.model_copy(update=settings).model_dump(mode="json")
        procs = min(num_processes(cfg, upto), max(1, upto // _MIN_SHARE)) if enc is not None else 1
        cuts = [upto * i // procs for i in range(procs + 1)]
        shards = [f"tokens-{i:03d}.arrow" for i in range(procs)]
        jobs = [(scan.path / "rows.arrow", a, b, eff, scan.label, cfg.max_length, tmp / name)
                for a, b, name in zip(cuts, cuts[1:], shards)]  # fmt: skip
        try:
            _run_shares(jobs, enc, tok)
        except ShapeMismatch as e:
            log.warning("data: %s: the chat template renders this row's reply differently from its other "
                        "conversations; tokenising again with one render per turn (slower)", e)  # fmt: skip
            enc.shape = None
            _run_shares(jobs, enc, tok)
        (tmp / "meta.json").write_text(json.dumps({"shards": shards, "rows": upto, "source": scan.label}))
        final = _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, False


_ENCODERS: dict[int, tuple] = {}  # id(tokenizer) -> (tokenizer, its Encoder): a prepare's sources share one


def _encoder(tokenizer) -> Encoder | None:
    if id(tokenizer) not in _ENCODERS or _ENCODERS[id(tokenizer)][0] is not tokenizer:
        _ENCODERS.clear()
        enc = encoder_for(tokenizer)
        if enc is not None and enc.shape is None:
            log.info("data: this chat template cannot be rendered once per conversation (its rendering of a "
                     "conversation's start differs from the start of its full rendering): rendering per turn")  # fmt: skip
        _ENCODERS[id(tokenizer)] = (tokenizer, enc)
    return _ENCODERS[id(tokenizer)][1]


def _run_shares(jobs, enc: Encoder | None, tokenizer) -> None:
    """The first share here, each other in a process started fresh (`spawn`): a worker holds python,
    `tokenizers` and jinja, not what this process has imported (torch, a model), which a fork would carry
    into every worker's memory; its start (imports, ~1-2 s) overlaps this process's own share."""
    if len(jobs) == 1:
        rows_file, a, b, eff, label, max_length, out = jobs[0]
        encode_share(enc, tokenizer, str(rows_file), a, b, eff, label, max_length, str(out))
        return
    import multiprocessing

    # leaving the block terminates the workers: an error in this share (a bad row) or Ctrl-C stops them too
    with multiprocessing.get_context("spawn").Pool(len(jobs) - 1) as pool:
        results = [pool.apply_async(encode_share, (enc, None, str(f), a, b, eff, label, n, str(out), False))
                   for f, a, b, eff, label, n, out in jobs[1:]]  # fmt: skip
        rows_file, a, b, eff, label, max_length, out = jobs[0]
        encode_share(enc, tokenizer, str(rows_file), a, b, eff, label, max_length, str(out), False)
        for r in results:
            r.get()


def is_loader(tokenizer) -> bool:
    """A function that loads the tokenizer (build_datasets' lazy form), rather than a tokenizer."""
    import functools
    import inspect

    return inspect.isfunction(tokenizer) or isinstance(tokenizer, functools.partial)


def _open_tokens(folder: Path):
    """The tokenised rows of a cache entry, memory-mapped (nothing is read until used)."""
    import pyarrow as pa

    meta = json.loads((folder / "meta.json").read_text())
    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / s))).read_all() for s in meta["shards"]]
    return pa.concat_tables(tables)


class ArrowExamples(Sequence):
    """Examples read on demand from memory-mapped Arrow columns, as the lists the in-memory path holds:
    `examples[i]` is {"input_ids", "labels"} (+ "position_ids" when packed), a slice a list of those.
    Packed, row i lays the examples at positions[members[bounds[i]:bounds[i + 1]]] end to end."""

    def __init__(self, table, positions, rows: tuple | None = None):
        self.table, self.positions = table, positions
        self.members, self.bounds = rows if rows is not None else (None, None)
        self._ids, self._labels = table.column("input_ids"), table.column("labels")

    def __len__(self) -> int:
        return len(self.bounds) - 1 if self.bounds is not None else len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.bounds is None:
            return self._example(self.positions[i])
        members = self.members[self.bounds[i] : self.bounds[i + 1]]
        return packed_row([self._example(self.positions[m]) for m in members])

    def _example(self, at) -> dict:
        return {"input_ids": self._ids[int(at)].as_py(), "labels": self._labels[int(at)].as_py()}

    def lengths(self):
        """Tokens per example (per packed row when packed), from the length column alone."""
        import numpy as np

        n = self.table.column("length").to_numpy()[np.asarray(self.positions, dtype=np.int64)]
        return n if self.bounds is None else np.add.reduceat(n[self.members], self.bounds[:-1]).astype(np.int64)


def prepare(cfg: DataConfig, tokenizer, seed: int, stage: str = "sft", fingerprint: str | None = None):
    """build_datasets on the store: (train, val, stats, cache), the same examples and stats, memory-mapped.
    `tokenizer` may be a function that loads it, called only if something is to be tokenised; `fingerprint`
    (what decides the ids, e.g. a digest of the tokenizer's files) keys the cache in place of
    tokenizer_fingerprint, so that a cache hit needs no tokenizer at all. The choice of rows, the statistics
    and the packing are kept under plans/KEY (KEY: the whole data config, seed, stage, sources, tokenizer),
    so that a second start computes none of them (seconds at a million rows)."""
    import numpy as np
    import pyarrow as pa

    t0 = time.perf_counter()
    train_scans, val_scans = check(cfg, seed, stage)
    scans = train_scans + val_scans
    loaded = []

    def get_tokenizer():  # loaded once, at the first source that is not in the cache
        if not loaded:
            loaded.append(tokenizer() if is_loader(tokenizer) else tokenizer)
        return loaded[0]

    tok_fp = fingerprint or tokenizer_fingerprint(get_tokenizer())
    plan_key = _hash(DATA_VERSION, stage, seed, cfg.model_dump(mode="json", exclude={"num_proc", "cache"}),
                     [(s.key, s.n) for s in scans], tok_fp)  # fmt: skip
    plan = _load_plan(plan_key)
    if plan is None:
        train_pos, val_pos, rows_read = select(cfg, seed, train_scans, val_scans, stage)
        train_pos, val_pos = np.asarray(train_pos, dtype=np.int64), np.asarray(val_pos, dtype=np.int64)
        starts = np.cumsum([0] + [s.n for s in scans])
        needed = np.zeros(len(scans), dtype=np.int64)  # per source: how many of its first rows are used
        for p in (train_pos, val_pos):
            if len(p):
                src = np.searchsorted(starts, p, side="right") - 1
                np.maximum.at(needed, src, p - starts[src] + 1)
    else:
        needed = plan["needed"]
    tables, folders, hits = [], [], []
    for scan, upto in zip(scans, needed):
        folder, hit = _tokenise(scan, int(upto), cfg, get_tokenizer, tok_fp) if upto else (None, True)
        # each source's block spans all its rows, tokenised or not, so that positions index the whole
        part = [_open_tokens(folder)] if folder is not None else []
        tables += part + ([_empty_rows(scan.n - int(upto))] if scan.n > upto else [])
        folders.append(str(folder) if folder is not None else None)
        hits.append(hit)
    table = pa.concat_tables([t.cast(_schema()) for t in tables])
    if plan is None:
        plan = _plan(cfg, table, train_pos, val_pos, rows_read)
        plan["needed"] = needed
        _save_plan(plan_key, plan)
    stats = plan["stats"]
    check_kept(cfg, stats["train_rows"], stats["dropped"])
    hit = all(hits)
    cache = {"hit": hit, "folders": [f for f in folders if f], "rows": [str(s.path) for s in scans],
             "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    log.info("data cache %s: %s (%.1f s)", "hit" if hit else "written", ", ".join(cache["folders"]), cache["seconds"])
    rows = (plan["members"], plan["bounds"]) if cfg.packing else None
    return ArrowExamples(table, plan["train_keep"], rows), ArrowExamples(table, plan["val_keep"]), dict(stats), cache


def _plan(cfg: DataConfig, table, train_pos, val_pos, rows_read: int) -> dict:
    """The examples kept (dropped rows out), the statistics of build_datasets and the packing."""
    import numpy as np

    dropped_col = table.column("dropped").to_numpy(zero_copy_only=False)
    truncated_col = table.column("truncated").to_numpy(zero_copy_only=False)
    train_keep, val_keep = train_pos[~dropped_col[train_pos]], val_pos[~dropped_col[val_pos]]
    length = table.column("length").to_numpy()
    label_count = table.column("label_count").to_numpy()
    stats = {
        "rows_read": rows_read,
        "train_rows": len(train_keep),
        "val_rows": len(val_keep),
        "truncated": int(truncated_col[train_pos].sum() + truncated_col[val_pos].sum()),
        "dropped": int(dropped_col[train_pos].sum() + dropped_col[val_pos].sum()),
        "tokens": int(length[train_keep].sum()),
        "label_tokens": int(label_count[train_keep].sum()),
    }
    members = bounds = np.zeros(0, dtype=np.int64)
    if cfg.packing and len(train_keep):
        rows = pack_plan(length[train_keep], cfg.max_length)
        stats["packed_rows"] = len(rows)
        bounds = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
        members = np.fromiter((m for r in rows for m in r), dtype=np.int64, count=int(bounds[-1]))
    return {"stats": stats, "train_keep": train_keep, "val_keep": val_keep, "members": members, "bounds": bounds}


_PLAN_ARRAYS = ("train_keep", "val_keep", "members", "bounds", "needed")


def _load_plan(key: str) -> dict | None:
    import numpy as np

    folder = data_cache_dir() / "plans" / key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "plan.npz", allow_pickle=False) as arrays:
            return {"stats": meta["stats"], **{k: arrays[k] for k in _PLAN_ARRAYS}}
    except (OSError, ValueError, KeyError):
        return None


def _save_plan(key: str, plan: dict) -> None:
    import numpy as np

    base = data_cache_dir() / "plans"
    tmp = base / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    try:
        np.savez(tmp / "plan.npz", **{k: np.asarray(plan[k], dtype=np.int64) for k in _PLAN_ARRAYS})
        (tmp / "meta.json").write_text(json.dumps({"stats": plan["stats"]}))
        _publish(tmp, base / key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _empty_rows(n: int):
    """Stand-ins for rows past the last one used (a `limit`): flagged dropped, never selected."""
    import numpy as np
    import pyarrow as pa

    schema = _schema()
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], pa.int32()))
    zeros, ones = np.zeros(n, dtype=np.int32), np.ones(n, dtype=bool)
    columns = [empty, empty, pa.array(zeros), pa.array(zeros), pa.array(~ones), pa.array(ones)]
    return pa.Table.from_arrays(columns, schema=schema)
