"""Byte-level tokenizer, memory-mapped token files and deterministic, resumable batches.

numpy only: this module never imports jax, so data preparation runs anywhere.

Tokenizer
    Token ids are the raw UTF-8 bytes of the text, 0..255 (`BYTE_VOCAB_SIZE`).
    There are no special tokens. A corpus is one contiguous byte stream:
    every document piece written to a split is followed by `DOC_SEPARATOR`
    (a blank line, b"\\n\\n"), and training sequences are contiguous windows
    of that stream, so a window may span the end of one document and the
    start of the next.

On-disk format (a directory written by `prepare`)
    train.bin, val.bin  flat little-endian token arrays of `meta["dtype"]`
                        (the smallest unsigned dtype that holds the
                        vocabulary: uint8 for bytes; directories written
                        with uint16 before still load), no header;
                        n tokens = file size / itemsize.
    meta.json           {"format": "tedjax-tokens", "version": 1,
                         "tokenizer": "utf8-bytes", "vocab_size": 256,
                         "dtype": "uint8", "n_train_tokens", "n_val_tokens",
                         "sha256": {"train", "val"} (of the .bin bytes),
                         "val_fraction", "split_rule", "doc_separator",
                         "sources", "documents", "n_documents",
                         "unigram_entropy_train", ...}
    Record files (.jsonl, .parquet, .arrow: what Hugging Face `datasets`
    writes) give one document per row, the `text_field` column.
    Every file is written to a temporary name, fsync'ed and then moved into
    place with os.replace, meta.json last: a crash never leaves a half file
    under a final name, and two processes preparing the same directory from
    the same sources both leave the same complete result.

Train/val split rule (deterministic)
    Documents are taken in order (each source in the order given; a directory
    is scanned recursively, files sorted by relative POSIX path). From each
    document the last floor(val_fraction * n_bytes) bytes go to val, the rest
    to train; the cut is moved forward to the next line start (or, when the
    tail has no newline, to the next UTF-8 character start), so every
    document contributes a prefix to train and a suffix to val.

Batches
    `BatchIterator` samples `[batch, seq_len + 1]` windows: for epoch e the
    window starts `0, seq_len, 2*seq_len, ...` (inputs never overlap) are
    permuted with `np.random.default_rng((seed, e))`; step i takes the global
    positions [i*batch, (i+1)*batch) of the concatenated epoch orders, so a
    batch may wrap into the next epoch. The batch at step i is a pure
    function of (tokens, seed, i), which makes resuming exact.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DOC_SEPARATOR",
    "DEFAULT_PATTERN",
    "DEFAULT_STDLIB_MAX_BYTES",
    "encode",
    "decode",
    "prepare",
    "HFTokenizer",
    "prepare_stdlib",
    "stdlib_source_dir",
    "default_corpus_dir",
    "ensure_stdlib_corpus",
    "read_meta",
    "TokenFile",
    "load_tokens",
    "BatchIterator",
    "synthetic_batches",
    "unigram_entropy",
    "main",
]

BYTE_VOCAB_SIZE = 256
DOC_SEPARATOR = b"\n\n"
DEFAULT_PATTERN = "*.py|*.txt|*.md"
DEFAULT_STDLIB_MAX_BYTES = 16 * 1024 * 1024
SPLITS = ("train", "val")
META_NAME = "meta.json"
FORMAT_NAME = "tedjax-tokens"
FORMAT_VERSION = 1
SPLIT_RULE = (
    "per document: the last floor(val_fraction * n_bytes) bytes go to val, moved "
    "forward to the next line start (or next UTF-8 character start if the tail has "
    "no newline); the rest goes to train"
)
_ALLOWED_DTYPES = ("uint8", "uint16", "uint32")
_EXCLUDED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", ".git"})
# Tokens read per chunk when scanning a whole file (max id, hash, counts).
_CHUNK_TOKENS = 1 << 22
# Record files (one document per row): what Hugging Face `datasets` writes (to_json, parquet shards, save_to_disk).
RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")
# Text bytes per encoding task sent to a worker process.
_BATCH_BYTES = 1 << 20


# --------------------------------------------------------------------------- tokenizer


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as token ids: uint8[n_bytes]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids: Any) -> str:
    """Text of a 1-D sequence of byte ids (list, numpy or jax array), errors="replace".

    Invalid UTF-8 and ids outside 0..255 (e.g. from a model whose vocabulary is
    padded past 256) decode as U+FFFD.
    """
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ValueError(
            f"decode takes one sequence (a 1-D array), got shape {arr.shape}; "
            "decode each row separately"
        )
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode needs integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    # 0xFF never occurs in valid UTF-8, so it always decodes to U+FFFD.
    arr = np.where((arr < 0) | (arr >= BYTE_VOCAB_SIZE), 0xFF, arr)
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- preparing


def _patterns(pattern: str | Sequence[str]) -> list[str]:
    parts = pattern.split("|") if isinstance(pattern, str) else list(pattern)
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise ValueError(f"empty file pattern {pattern!r}; pass e.g. {DEFAULT_PATTERN!r}")
    return parts


def _collect_files(
    sources: Sequence[str | os.PathLike], pattern: str | Sequence[str], skipped: list[str] | None = None
) -> list[Path]:
    """Files of `sources` in a deterministic order (see the module docstring).

    Files under a directory that do not match `pattern`, and directories in
    `_EXCLUDED_DIRS`, are appended to `skipped` (sorted), when given.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("no sources given; pass at least one text file or directory")
    pats = _patterns(pattern)
    files: list[Path] = []
    seen: set[Path] = set()
    for src in sources:
        root = Path(src).expanduser()
        if root.is_file():
            found = [root]  # an explicitly named file is taken whatever its name
        elif root.is_dir():
            rel: list[str] = []
            left_out: list[str] = []
            for dirpath, dirnames, filenames in os.walk(root):
                left_out += [str(Path(dirpath) / d) + "/" for d in dirnames if d in _EXCLUDED_DIRS]
                dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
                for name in filenames:
                    if any(fnmatch.fnmatchcase(name, p) for p in pats):
                        rel.append((Path(dirpath) / name).relative_to(root).as_posix())
                    else:
                        left_out.append(str(Path(dirpath) / name))
            found = [root / r for r in sorted(rel)]
            if skipped is not None:
                skipped.extend(sorted(left_out))
        else:
            raise FileNotFoundError(
                f"source {str(root)!r} does not exist; pass existing text files or directories "
                "to `python -m tedjax.data prepare --out DIR SRC [SRC ...]`"
            )
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def smallest_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds ids 0 .. vocab_size - 1: uint8 for bytes, uint16 up to 65536."""
    for name in _ALLOWED_DTYPES:
        if vocab_size <= np.iinfo(np.dtype(name)).max + 1:
            return name
    raise ValueError(f"a vocabulary of {vocab_size} ids does not fit uint32")


def read_records(path: str | os.PathLike, text_field: str = "text") -> Iterator[str | None]:
    """The `text_field` value of every row of a .jsonl, .parquet or .arrow file, in order (None for a null).

    .jsonl is read with the standard library; .parquet and .arrow (Arrow IPC
    stream or file, as `datasets.save_to_disk` writes) need pyarrow, read one
    record batch at a time. A missing field or a non-string value raises a
    ValueError naming the file, the row and the fix (--text-field).
    """
    path = Path(path)

    def check(value, where: str, fields) -> str | None:
        if value is None or isinstance(value, str):
            return value
        raise ValueError(f"{where}: field {text_field!r} is a {type(value).__name__}, not text; "
                         f"pass --text-field naming a text column (fields: {', '.join(map(str, fields))})")

    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for row, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{row + 1} is not valid JSON ({e}); fix or drop that line") from None
                if not isinstance(record, dict) or text_field not in record:
                    fields = list(record) if isinstance(record, dict) else []
                    raise ValueError(f"{path}:{row + 1} has no field {text_field!r} (fields: "
                                     f"{', '.join(fields) or 'none, not an object'}); pass --text-field NAME")
                yield check(record[text_field], f"{path}:{row + 1}", list(record))
        return
    if path.suffix not in RECORD_SUFFIXES:
        raise ValueError(f"{path} is not a record file ({', '.join(RECORD_SUFFIXES)})")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path.suffix} files needs pyarrow: pip install 'tedjax[datasets]' "
                         "(or convert to .jsonl)") from None
    if path.suffix == ".parquet":
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        batches = lambda: reader.iter_batches(columns=[text_field], batch_size=4096)  # noqa: E731
    else:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
        names = reader.schema.names
        if hasattr(reader, "num_record_batches"):  # the IPC file format
            batches = lambda: (reader.get_batch(i) for i in range(reader.num_record_batches))  # noqa: E731
        else:  # the stream format (save_to_disk)
            batches = lambda: iter(reader)  # noqa: E731
    if text_field not in names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); pass --text-field NAME")
    row = 0
    for batch in batches():
        for value in batch.column(batch.schema.get_field_index(text_field)).to_pylist():
            yield check(value, f"{path} row {row}", names)
            row += 1


def _documents(files: Sequence[Path], text_field: str, not_utf8: dict[str, int], empty: list[str]
               ) -> Iterator[tuple[str, bytes]]:
    """(source name, UTF-8 bytes) of every non-empty document, in order: a text file is one document,
    a record file one per row. Empty documents are skipped (text files listed in `empty`)."""
    for path in files:
        if path.suffix in RECORD_SUFFIXES:
            for text in read_records(path, text_field):
                if text:
                    yield str(path), text.encode("utf-8", errors="replace")
            continue
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise OSError(f"cannot read source file {str(path)!r}: {e}") from e
        data = raw.decode("utf-8", errors="replace").encode("utf-8")
        if data != raw:
            not_utf8[str(path)] = _invalid_utf8_bytes(raw)
        if not data:
            empty.append(str(path))
            continue
        yield str(path), data


_WORKER_ENCODER = None


def _init_worker(tokenizer: str) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = HFTokenizer(tokenizer)


def _encode_pieces(pieces: list[tuple[str, bytes]], encoder=None) -> list[tuple[str, np.ndarray]]:
    """[(split, piece)] -> [(split, ids of piece + separator)], with `encoder` (a worker's own when None)."""
    encoder = encoder or _WORKER_ENCODER
    if encoder is None:  # bytes
        return [(split, np.frombuffer(piece + DOC_SEPARATOR, dtype=np.uint8)) for split, piece in pieces]
    return [(split, encoder.encode_document(piece)) for split, piece in pieces]


class _EncoderPool:
    """Encodes batches of document pieces in order: inline, or in `workers` processes (Hugging Face tokenizers).

    At most 2 x workers batches are in flight, so memory stays bounded however large the corpus.
    """

    def __init__(self, tokenizer, encoder, workers: int):
        self.encoder, self.pending, self.pool = encoder, [], None
        if tokenizer is not None and workers > 1:
            import multiprocessing

            # spawn: the caller may have threads (jax) that a fork would copy half-way
            self.pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer),))
            self.limit = 2 * workers

    def submit(self, pieces: list[tuple[str, bytes]], write) -> None:
        if self.pool is None:
            write(_encode_pieces(pieces, self.encoder))
            return
        self.pending.append(self.pool.apply_async(_encode_pieces, (pieces,)))
        while len(self.pending) >= self.limit:
            write(self.pending.pop(0).get())

    def finish(self, write) -> None:
        while self.pending:
            write(self.pending.pop(0).get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _split_point(data: bytes, val_fraction: float) -> int:
    """Index where `data`'s val part starts (== len(data) when it has none)."""
    n = len(data)
    n_val = int(n * val_fraction)
    if n_val <= 0:
        return n
    cut = n - n_val  # >= 1 because val_fraction < 1
    nl = data.find(b"\n", cut - 1)
    if 0 <= nl < n - 1:
        return nl + 1  # first line start at or after cut
    while cut < n and (data[cut] & 0xC0) == 0x80:  # skip UTF-8 continuation bytes
        cut += 1
    return cut


def _truncate(data: bytes, room: int) -> bytes:
    """The longest prefix of `data` of at most `room` bytes that ends a line
    (or, if no newline fits, ends a UTF-8 character)."""
    if room <= 0:
        return b""
    if len(data) <= room:
        return data
    nl = data.rfind(b"\n", 0, room)
    if nl >= 0:
        return data[: nl + 1]
    while room > 0 and (data[room] & 0xC0) == 0x80:  # don't split a character
        room -= 1
    return data[:room]


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _fsync_replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    try:  # make the rename durable too (best effort; not all platforms allow it)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _invalid_utf8_bytes(raw: bytes) -> int:
    """How many bytes of `raw` are not part of valid UTF-8."""
    count = 0
    while raw:
        try:
            raw.decode("utf-8")
            break
        except UnicodeDecodeError as err:
            count += err.end - err.start
            raw = raw[err.end:]
    return count


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


FINGERPRINT_RULE = "sha256 of the size (8 bytes little-endian) and 64 blocks of 4096 bytes at offsets i*(size-4096)//63"


def file_fingerprint(path: str | os.PathLike, blocks: int = 64, block: int = 4096) -> str:
    """A cheap identity of a large file: its size and `blocks` evenly spaced blocks (FINGERPRINT_RULE).

    Catches a replaced, regenerated, truncated or extended token file at the
    cost of reading 256 KiB; `prepare` verified every byte when it wrote it.
    """
    size = os.path.getsize(path)
    hasher = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(i * max(size - block, 0) // (blocks - 1))
            hasher.update(f.read(block))
    return hasher.hexdigest()


def corpus_fingerprint(path_dir: str | os.PathLike) -> str:
    """The identity of a prepared token directory: sha256 over meta.json's vocab_size and dtype and both
    splits' `file_fingerprint`s. A resume compares it, since another corpus can be prepared at one path."""
    d = Path(path_dir).expanduser()
    meta = read_meta(d)
    hasher = hashlib.sha256(f"{meta['vocab_size']}:{meta['dtype']}".encode())
    for split in SPLITS:
        hasher.update(file_fingerprint(d / f"{split}.bin").encode())
    return hasher.hexdigest()


def _entropy_from_counts(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return float("nan")
    p = counts[counts > 0].astype(np.float64) / float(total)
    return float(-(p * np.log(p)).sum())


def prepare(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.01,
    pattern: str | Sequence[str] = DEFAULT_PATTERN,
    max_bytes: int | None = None,
    dtype: str = "auto",
    *,
    tokenizer: str | os.PathLike | None = None,
    text_field: str = "text",
    workers: int = 1,
    progress: bool = False,
    _kind: str = "files",
    _extra_meta: dict | None = None,
) -> dict:
    """Tokenize text files into `out_dir`/{train.bin, val.bin, meta.json}; returns meta.

    sources: files and/or directories (scanned recursively for `pattern`, a
    "|"-separated list of glob patterns on the file name; sorted by relative
    path). max_bytes caps the corpus (train + val tokens): documents are taken
    in order, and the one the cap falls in is cut after its last whole line
    that fits (a line longer than the room is cut at a UTF-8 character
    boundary); later documents are dropped. Empty files are skipped.
    tokenizer: a Hugging Face tokenizer directory (its tokenizer.json) to use
    instead of bytes (see `HFTokenizer`). dtype "auto" picks the smallest
    unsigned dtype that holds the vocabulary (uint8 for bytes), recorded in
    meta.json. Files ending in .jsonl, .parquet or .arrow (what Hugging Face
    `datasets` writes: shards, `save_to_disk` files) are record files: each
    row's `text_field` string is one document (see `read_records`).
    `workers` > 1 encodes with a Hugging Face tokenizer in that many
    processes (the order, and so the output, is the same); `progress` shows
    a tqdm bar on stderr. Inputs are checked before anything is written.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= float(val_fraction) < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}; e.g. 0.01")
    val_fraction = float(val_fraction)
    if dtype not in (*_ALLOWED_DTYPES, "auto"):
        raise ValueError(f"dtype must be 'auto' or one of {_ALLOWED_DTYPES}, got {dtype!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    encoder = HFTokenizer(tokenizer) if tokenizer is not None else None
    vocab = BYTE_VOCAB_SIZE if encoder is None else encoder.vocab_size
    if dtype == "auto":
        dtype = smallest_dtype(vocab)
    if vocab > np.iinfo(np.dtype(dtype)).max + 1:
        raise ValueError(f"dtype {dtype} cannot hold the tokenizer's {vocab} token ids; use {smallest_dtype(vocab)}")
    if max_bytes is not None and (not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    skipped: list[str] = []
    files = _collect_files(sources, pattern, skipped)
    for path in files:  # a missing column or reader fails here, before anything is written
        if path.suffix in RECORD_SUFFIXES:
            next(iter(read_records(path, text_field)), None)
    if not files:
        raise ValueError(
            f"no files matching {pattern!r} under {[str(s) for s in sources]}; "
            "pass other sources or a wider --pattern"
        )

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} is a file; pass a directory for --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)

    np_dtype = np.dtype(dtype).newbyteorder("<")
    finals = {s: out / f"{s}.bin" for s in SPLITS}
    tmps = {s: _tmp_path(finals[s]) for s in SPLITS}
    meta_final = out / META_NAME
    meta_tmp = _tmp_path(meta_final)
    hashers = {s: hashlib.sha256() for s in SPLITS}
    n_tokens = {s: 0 for s in SPLITS}
    counts = np.zeros(vocab, dtype=np.int64)
    documents: list[str] = []  # text files, and record files with at least one document taken
    n_documents = 0
    empty: list[str] = []
    not_utf8: dict[str, int] = {}  # path -> bytes that were not valid UTF-8 (each became U+FFFD)
    total = 0
    ok = False
    bar = None
    try:
        handles = {}
        pool = _EncoderPool(tokenizer if encoder is not None else None, encoder, workers)
        try:
            for s in SPLITS:
                handles[s] = open(tmps[s], "wb")
            if progress:
                from tqdm import tqdm

                bar = tqdm(unit=" docs", desc=f"prepare {out.name}", file=sys.stderr, dynamic_ncols=True)

            def write(results) -> None:
                nonlocal counts
                for split, ids in results:
                    buf = ids.astype(np_dtype).tobytes()
                    handles[split].write(buf)
                    hashers[split].update(buf)
                    n_tokens[split] += ids.size
                    if split == "train":
                        counts += np.bincount(ids, minlength=vocab)

            batch: list[tuple[str, bytes]] = []
            batch_bytes = batch_docs = 0
            for name, data in _documents(files, text_field, not_utf8, empty):
                last = max_bytes is not None and total + len(data) + len(DOC_SEPARATOR) > max_bytes
                if last:  # the cap falls inside this document: keep the lines that fit
                    data = _truncate(data, max_bytes - total - len(DOC_SEPARATOR))
                    if not data:
                        break
                total += len(data) + len(DOC_SEPARATOR)
                if not documents or documents[-1] != name:
                    documents.append(name)
                n_documents += 1
                cut = _split_point(data, val_fraction)
                batch += [(split, piece) for split, piece in (("train", data[:cut]), ("val", data[cut:])) if piece]
                batch_bytes += len(data)
                batch_docs += 1
                if batch_bytes >= _BATCH_BYTES:
                    pool.submit(batch, write)
                    if bar is not None:
                        bar.update(batch_docs)
                    batch, batch_bytes, batch_docs = [], 0, 0
                if last:
                    break
            if batch:
                pool.submit(batch, write)
                if bar is not None:
                    bar.update(batch_docs)
            pool.finish(write)
            for h in handles.values():
                h.flush()
                os.fsync(h.fileno())
        finally:
            pool.close()
            if bar is not None:
                bar.set_postfix(tokens=f"{n_tokens['train'] + n_tokens['val']:,}")
                bar.close()
            for h in handles.values():
                h.close()
        for s in SPLITS:  # verify what reached the disk once, here, so a run start need not
            if _file_sha256(tmps[s]) != hashers[s].hexdigest():
                raise OSError(f"{tmps[s]} does not read back as written (disk or file system error); run prepare again")
        if not documents:
            raise ValueError(
                f"no text was taken: max_bytes={max_bytes} leaves no room for a line of the "
                f"first document ({str(files[0])!r}) plus the separator; raise --max-bytes"
            )
        if val_fraction > 0 and n_tokens["val"] == 0:
            raise ValueError(
                f"val_fraction={val_fraction} gave 0 validation tokens from {total} bytes "
                "(each document's val tail rounds down to nothing); raise --val-fraction "
                "or add more text"
            )
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tokenizer": "utf8-bytes",
            "vocab_size": BYTE_VOCAB_SIZE,
            "dtype": dtype,
            "byteorder": "little",
            "n_train_tokens": n_tokens["train"],
            "n_val_tokens": n_tokens["val"],
            "sha256": {s: hashers[s].hexdigest() for s in SPLITS},
            "val_fraction": val_fraction,
            "split_rule": SPLIT_RULE,
            "doc_separator": DOC_SEPARATOR.decode("ascii"),
            "pattern": "|".join(_patterns(pattern)),
            "max_bytes": None if max_bytes is None else int(max_bytes),
            "kind": _kind,
            "sources": [str(Path(s).expanduser().resolve()) for s in sources],
            "n_documents": n_documents,
            "documents": documents,
            "unigram_entropy_train": _entropy_from_counts(counts),
            "fingerprint": {s: file_fingerprint(tmps[s]) for s in SPLITS},
            "fingerprint_rule": FINGERPRINT_RULE,
            "skipped_files": skipped,
            "empty_files": empty,
            "not_utf8_files": not_utf8,
        }
        if encoder is not None:
            meta.update(encoder.meta())
        if _extra_meta:
            meta.update(_extra_meta)
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for s in SPLITS:  # token files first, meta.json (the "complete" marker) last
            _fsync_replace(tmps[s], finals[s])
        _fsync_replace(meta_tmp, meta_final)
        ok = True
        return meta
    finally:
        for p in (*tmps.values(), meta_tmp):
            if p.exists():
                p.unlink()
        if not ok and created:
            try:
                out.rmdir()  # only succeeds if empty: a failed prepare leaves nothing behind
            except OSError:
                pass


class HFTokenizer:
    """A Hugging Face tokenizer (its tokenizer.json, through the `tokenizers` library) for `prepare`.

    Each document piece is encoded without special tokens and followed by the
    end-of-text token (`eos_token` of tokenizer_config.json, else
    `eos_token_id` of config.json / generation_config.json), or by the
    encoding of DOC_SEPARATOR when the directory names none.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from None
        root = Path(path).expanduser()
        file = root / "tokenizer.json" if root.is_dir() else root
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer {str(root)!r} has no tokenizer.json; pass a Hugging Face model or "
                                    "tokenizer directory (or the tokenizer.json file itself)")
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a plain Exception for a bad file
            raise ValueError(f"{file} is not a valid tokenizers file ({err})") from None
        self.file = file.resolve()
        self.vocab_size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._eos_id(file.parent)
        self.separator = [self.eos_id] if self.eos_id is not None else self.encode(DOC_SEPARATOR.decode())

    def _eos_id(self, directory: Path) -> int | None:
        try:
            token = json.loads((directory / "tokenizer_config.json").read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        except (OSError, ValueError, AttributeError):
            pass
        for name in ("generation_config.json", "config.json"):
            try:
                value = json.loads((directory / name).read_text()).get("eos_token_id")
            except (OSError, ValueError, AttributeError):
                continue
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and 0 <= value < self.vocab_size:
                return value
        return None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_document(self, piece: bytes) -> np.ndarray:
        return np.asarray(self.encode(piece.decode("utf-8")) + self.separator, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def meta(self) -> dict:
        return {"tokenizer": f"hf:{self.file}", "tokenizer_sha256": hashlib.sha256(self.file.read_bytes()).hexdigest(),
                "vocab_size": self.vocab_size, "doc_separator_ids": self.separator}


def stdlib_source_dir() -> Path:
    """The Python standard library's source directory (that of `os.__file__`)."""
    return Path(os.__file__).resolve().parent


def prepare_stdlib(
    out_dir: str | os.PathLike,
    max_bytes: int = DEFAULT_STDLIB_MAX_BYTES,
    val_fraction: float = 0.01,
) -> dict:
    """Prepare the stdlib's `*.py` files (sorted, site-packages excluded, capped at max_bytes)."""
    return prepare(
        [stdlib_source_dir()],
        out_dir,
        val_fraction=val_fraction,
        pattern="*.py",
        max_bytes=max_bytes,
        _kind="stdlib",
        _extra_meta={"python_version": sys.version.split()[0]},
    )


def default_corpus_dir() -> Path:
    """Where the stdlib corpus lives by default.

    $TEDJAX_DATA_DIR/stdlib-pyX.Y if set; else <repo>/data/stdlib-pyX.Y in a
    source checkout; else ~/.cache/tedjax/stdlib-pyX.Y.
    """
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}"
    env = os.environ.get("TEDJAX_DATA_DIR")
    if env:
        return Path(env).expanduser() / name
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists() or (repo / ".git").exists():
        return repo / "data" / name
    return Path.home() / ".cache" / "tedjax" / name


def _stdlib_corpus_ok(out: Path, max_bytes: int, val_fraction: float) -> bool:
    try:
        meta = read_meta(out)
    except (FileNotFoundError, ValueError):
        return False
    if (
        meta.get("kind") != "stdlib"
        or meta.get("max_bytes") != max_bytes
        or meta.get("val_fraction") != float(val_fraction)
        or meta.get("python_version") != sys.version.split()[0]
    ):
        return False
    item = np.dtype(meta["dtype"]).itemsize
    for s in SPLITS:
        p = out / f"{s}.bin"
        if not p.is_file() or p.stat().st_size != meta[f"n_{s}_tokens"] * item:
            return False
    return True


def ensure_stdlib_corpus(
    out_dir: str | os.PathLike | None = None,
    max_bytes: int = DEFAULT_STDLIB_MAX_BYTES,
    val_fraction: float = 0.01,
) -> Path:
    """Prepare the stdlib corpus in `out_dir` (default `default_corpus_dir()`) unless it is there.

    Idempotent: an existing corpus with the same settings is left untouched.
    Two processes racing both write the same bytes through atomic renames.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_corpus_dir()
    if not _stdlib_corpus_ok(out, max_bytes, val_fraction):
        prepare_stdlib(out, max_bytes=max_bytes, val_fraction=val_fraction)
    return out


# --------------------------------------------------------------------------- loading


def _prepare_hint(path: Path) -> str:
    return (
        f"create it with `python -m tedjax.data prepare --out {path} SRC [SRC ...]` "
        f"(or `python -m tedjax.data stdlib --out {path}` for the Python stdlib corpus)"
    )


def read_meta(path_dir: str | os.PathLike) -> dict:
    """Parse and check `path_dir`/meta.json (read-only)."""
    d = Path(path_dir).expanduser()
    if not d.exists():
        raise FileNotFoundError(f"token directory {str(d)!r} does not exist; {_prepare_hint(d)}")
    if not d.is_dir():
        raise ValueError(f"token path {str(d)!r} is a file, not a directory; {_prepare_hint(d)}")
    mp = d / META_NAME
    if not mp.is_file():
        raise FileNotFoundError(
            f"{str(mp)!r} is missing, so {str(d)!r} is not a complete token directory "
            f"(an interrupted prepare?); re-run prepare: {_prepare_hint(d)}"
        )
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{str(mp)!r} is corrupt (not valid JSON: {e}); delete the directory and re-run "
            f"prepare: {_prepare_hint(d)}"
        ) from None
    problems = []
    if not isinstance(meta, dict):
        problems.append("top level is not an object")
        meta = {}
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        problems.append(f"vocab_size={vocab!r} is not a positive integer")
    dt = meta.get("dtype")
    if dt not in _ALLOWED_DTYPES:
        problems.append(f"dtype={dt!r} is not one of {_ALLOWED_DTYPES}")
    for s in SPLITS:
        n = meta.get(f"n_{s}_tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            problems.append(f"n_{s}_tokens={n!r} is not a non-negative integer")
    if not problems and vocab > np.iinfo(np.dtype(dt)).max + 1:
        problems.append(f"vocab_size={vocab} does not fit dtype {dt}")
    if problems:
        raise ValueError(
            f"{str(mp)!r} is corrupt: {'; '.join(problems)}; delete the directory and re-run "
            f"prepare: {_prepare_hint(d)}"
        )
    return meta


class TokenFile:
    """A validated, read-only memmap of one split: `tokens` is dtype[n_tokens].

    Checks (all before returning, none writes anything): the directory and
    meta.json exist and parse; the .bin size equals n_tokens * itemsize; the
    file is not empty; it holds at least one `seq_len + 1` window when
    `seq_len` is given; and, when `verify` is True, a chunked pass finds every
    id < vocab_size and the sha256 recorded in meta.json. `verify="fingerprint"`
    (what a run start uses) checks the cheap fingerprint `prepare` recorded
    instead, since prepare verified every byte; directories without one (older
    or hand-made) get the full pass.
    """

    def __init__(
        self,
        path_dir: str | os.PathLike,
        split: str = "train",
        seq_len: int | None = None,
        verify: bool | str = True,
    ):
        if verify not in (True, False, "fingerprint"):
            raise ValueError(f"verify must be True, False or 'fingerprint', got {verify!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        d = Path(path_dir).expanduser()
        meta = read_meta(d)
        path = d / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} is missing although meta.json exists; re-run prepare: "
                f"{_prepare_hint(d)}"
            )
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        n = meta[f"n_{split}_tokens"]
        size = path.stat().st_size
        if size != n * dtype.itemsize:
            raise ValueError(
                f"{str(path)!r} has {size} bytes but meta.json says {n} tokens of "
                f"{meta['dtype']} = {n * dtype.itemsize} bytes (truncated, or written by a "
                f"different prepare); re-run prepare: {_prepare_hint(d)}"
            )
        if n == 0:
            raise ValueError(
                f"{str(path)!r} is empty (0 tokens); prepare it from more text"
                + (" with --val-fraction > 0" if split == "val" else "")
                + f": {_prepare_hint(d)}"
            )
        if seq_len is not None:
            if seq_len < 1:
                raise ValueError(f"seq_len must be >= 1, got {seq_len}")
            if n < seq_len + 1:
                raise ValueError(
                    f"{str(path)!r} has {n} tokens, too short for one sequence of seq_len="
                    f"{seq_len} (needs seq_len + 1 = {seq_len + 1}); use a smaller seq_len or "
                    f"prepare more text: {_prepare_hint(d)}"
                )
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        vocab = meta["vocab_size"]
        fingerprints = meta.get("fingerprint")
        want_fingerprint = fingerprints.get(split) if isinstance(fingerprints, dict) else None
        if verify == "fingerprint" and want_fingerprint is not None:
            if file_fingerprint(path) != want_fingerprint:
                raise ValueError(
                    f"{str(path)!r} does not match the fingerprint recorded in meta.json (the file "
                    f"changed after prepare); re-run prepare: {_prepare_hint(d)}"
                )
        elif verify:
            hasher = hashlib.sha256()
            max_id = 0
            for i in range(0, n, _CHUNK_TOKENS):
                chunk = np.asarray(tokens[i : i + _CHUNK_TOKENS])
                max_id = max(max_id, int(chunk.max()))
                hasher.update(chunk.tobytes())
            if max_id >= vocab:
                raise ValueError(
                    f"{str(path)!r} holds token id {max_id} but vocab_size is {vocab} "
                    f"(ids must be < {vocab}): the file was written with another tokenizer "
                    f"or is corrupt; re-run prepare or fix vocab_size in meta.json: "
                    f"{_prepare_hint(d)}"
                )
            hashes = meta.get("sha256")
            want = hashes.get(split) if isinstance(hashes, dict) else None
            if want is not None and hasher.hexdigest() != want:
                raise ValueError(
                    f"{str(path)!r} does not match the sha256 recorded in meta.json (the file "
                    f"changed after prepare); re-run prepare: {_prepare_hint(d)}"
                )
        self.dir = d
        self.split = split
        self.path = path
        self.meta = meta
        self.vocab_size: int = vocab
        self.tokens: np.memmap = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.path)!r}, n_tokens={len(self)}, vocab_size={self.vocab_size}, "
            f"dtype={self.meta['dtype']})"
        )


def load_tokens(
    path_dir: str | os.PathLike,
    split: str = "train",
    seq_len: int | None = None,
    verify: bool = True,
) -> np.memmap:
    """Read-only memmap dtype[n_tokens] of `split`, validated as in `TokenFile`."""
    return TokenFile(path_dir, split, seq_len=seq_len, verify=verify).tokens


# --------------------------------------------------------------------------- batches


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchIterator:
    """Deterministic, resumable sampler of `[batch, seq_len + 1]` token windows.

    Window starts are 0, seq_len, 2*seq_len, ... while a full `seq_len + 1`
    window fits: n_windows = (n_tokens - 1) // seq_len (inputs never overlap;
    a window's last target is the next window's first input). For epoch e the
    windows are ordered by `np.random.default_rng((seed, e)).permutation`
    (identity when shuffle=False); step i takes global positions
    [i*batch_size, (i+1)*batch_size) of the epochs laid end to end, so when
    the file has fewer windows than batch_size (or the epoch does not divide
    evenly) a batch wraps around into the next epoch's order.

    With process_count P > 1, process p gets rows [p*B/P, (p+1)*B/P) of the
    global batch, so `jax.make_array_from_process_local_data` reassembles the
    global `[B, L]` batch. `__next__` returns
    {"inputs": int32[B/P, L], "targets": int32[B/P, L]} with targets = inputs
    shifted left by one token.
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenFile,
        batch_size: int,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
    ):
        if isinstance(tokens, TokenFile):
            tokens = tokens.tokens
        if not hasattr(tokens, "ndim") or tokens.ndim != 1:
            raise ValueError(
                f"tokens must be a 1-D array (e.g. from load_tokens), got "
                f"{getattr(tokens, 'shape', type(tokens))}"
            )
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)
        self.process_count = _check_int("process_count", process_count, 1)
        self.process_index = _check_int("process_index", process_index, 0)
        if self.process_index >= self.process_count:
            raise ValueError(
                f"process_index={process_index} must be < process_count={process_count}"
            )
        if self.batch_size % self.process_count:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by process_count={process_count}; "
                "use a global batch size that is a multiple of the process count"
            )
        self.step = _check_int("start_step", start_step, 0)
        self.shuffle = bool(shuffle)
        self.tokens = tokens
        n = int(tokens.shape[0])
        self.n_windows = (n - 1) // self.seq_len if n > 0 else 0
        if self.n_windows < 1:
            raise ValueError(
                f"token array has {n} tokens, too short for one sequence of seq_len="
                f"{self.seq_len} (needs seq_len + 1 = {self.seq_len + 1}); use a smaller "
                "seq_len or prepare more text"
            )
        self.local_batch_size = self.batch_size // self.process_count
        self._row_lo = self.process_index * self.local_batch_size
        self._perm_cache: dict[int, np.ndarray] = {}
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    # -- order -------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            if len(self._perm_cache) >= 2:  # keep the current and the next epoch only
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = perm
        return perm

    def window_indices(self, step: int) -> np.ndarray:
        """Window indices (into the start grid) of this process's rows at `step`: int64[B/P]."""
        rows = np.arange(self.local_batch_size, dtype=np.int64)
        pos = step * self.batch_size + self._row_lo + rows
        epochs, within = np.divmod(pos, self.n_windows)
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._epoch_order(int(e))[within[mask]]
        return out

    def windows(self, step: int) -> np.ndarray:
        """This process's token windows at `step`: int32[B/P, seq_len + 1]."""
        starts = self.window_indices(step) * self.seq_len
        return np.asarray(self.tokens[starts[:, None] + self._offsets]).astype(np.int32)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """{"inputs": int32[B/P, L], "targets": int32[B/P, L]} at `step` (no state change)."""
        w = self.windows(step)
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    @property
    def epoch(self) -> int:
        """Epoch of the first row of the next batch."""
        return (self.step * self.batch_size) // self.n_windows

    # -- iteration ---------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    # -- checkpointing -----------------------------------------------------
    def state(self) -> dict:
        """JSON-serialisable position.

        {"step", "seed", "batch_size", "seq_len", "shuffle", "n_windows"}; only
        "step" moves, the rest guards `restore` against other data or settings.
        """
        return {
            "step": int(self.step),
            "seed": int(self.seed),
            "batch_size": int(self.batch_size),
            "seq_len": int(self.seq_len),
            "shuffle": bool(self.shuffle),
            "n_windows": int(self.n_windows),
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()` of an earlier iterator over the same data and settings.

        process_index/process_count may differ (the step counts global batches).
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not a BatchIterator state (needs a 'step' key): {state!r}")
        mine = self.state()
        diff = [
            f"{k}: saved {state[k]!r} vs now {mine[k]!r}"
            for k in ("seed", "batch_size", "seq_len", "shuffle", "n_windows")
            if k in state and state[k] != mine[k]
        ]
        if diff:
            raise ValueError(
                "cannot restore the batch iterator, the saved state is for other data or "
                f"settings ({'; '.join(diff)}); restore with the same token file, seed, "
                "batch_size, seq_len and shuffle, or start a new run"
            )
        self.step = _check_int("state['step']", state["step"], 0)


# --------------------------------------------------------------------------- synthetic data


def synthetic_batches(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    n_successors: int = 4,
    noise: float = 0.05,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless {"inputs": int32[B, L], "targets": int32[B, L]} from a fixed learnable Markov chain.

    Each next token is (previous + d) mod vocab_size with d drawn from
    `n_successors` fixed offsets (chosen by `seed`, skewed probabilities), or
    with probability `noise` a uniform jump, so the entropy rate is about
    log(n_successors) nats instead of log(vocab_size). Vectorised (cumsum),
    deterministic given `seed`.
    """
    vocab_size = _check_int("vocab_size", vocab_size, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    seed = _check_int("seed", seed, 0)
    k = min(_check_int("n_successors", n_successors, 1), vocab_size - 1)
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise!r}")
    rng = np.random.default_rng((seed, 0x5EED))
    offsets = rng.choice(np.arange(1, vocab_size), size=k, replace=False).astype(np.int64)
    probs = 1.0 / np.arange(1, k + 1)
    probs /= probs.sum()
    while True:
        first = rng.integers(0, vocab_size, size=(batch_size, 1))
        steps = offsets[rng.choice(k, size=(batch_size, seq_len), p=probs)]
        jump = rng.random((batch_size, seq_len)) < noise
        steps = np.where(jump, rng.integers(0, vocab_size, size=(batch_size, seq_len)), steps)
        seq = np.cumsum(np.concatenate([first, steps], axis=1), axis=1) % vocab_size
        seq = seq.astype(np.int32)
        yield {"inputs": seq[:, :-1], "targets": seq[:, 1:]}


def unigram_entropy(tokens: np.ndarray | Sequence[int]) -> float:
    """Entropy (nats/token) of the empirical unigram distribution of `tokens`.

    A model that beats this on validation has learned more than token
    frequencies. Chunked, so large memmaps are fine.
    """
    arr = tokens.tokens if isinstance(tokens, TokenFile) else tokens
    if not hasattr(arr, "shape"):
        arr = np.asarray(arr)
    arr = arr.reshape(-1) if arr.ndim != 1 else arr
    if arr.shape[0] == 0:
        raise ValueError("unigram_entropy needs at least one token, got an empty array")
    counts = np.zeros(0, dtype=np.int64)
    for i in range(0, arr.shape[0], _CHUNK_TOKENS):
        chunk = np.asarray(arr[i : i + _CHUNK_TOKENS]).astype(np.int64)
        if chunk.min() < 0:
            raise ValueError(f"token ids must be >= 0, found {int(chunk.min())}")
        c = np.bincount(chunk)
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
    return _entropy_from_counts(counts)


# --------------------------------------------------------------------------- CLI


def _summary(out: Path, meta: dict) -> str:
    return (
        f"wrote {out}: {meta['n_documents']} documents, "
        f"{meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens "
        f"({meta['dtype']}, vocab {meta['vocab_size']}); "
        f"train unigram entropy {meta['unigram_entropy_train']:.4f} nats/token"
        + "".join(f"\n{line}" for line in _report(meta))
    )


def _report(meta: dict, examples: int = 5) -> list[str]:
    """What `prepare` left out or changed: skipped and empty files, files that were not UTF-8."""

    def some(names) -> str:
        names = list(names)
        return ", ".join(names[:examples]) + (f", ... ({len(names) - examples} more)" if len(names) > examples else "")

    lines = []
    skipped = meta.get("skipped_files") or []
    if skipped:
        lines.append(f"skipped {len(skipped)} files/directories not matching --pattern {meta['pattern']!r} (or in "
                     f"{'/'.join(sorted(_EXCLUDED_DIRS))}; all listed in meta.json): {some(skipped)}")
    if meta.get("empty_files"):
        lines.append(f"skipped {len(meta['empty_files'])} empty files: {some(meta['empty_files'])}")
    bad = meta.get("not_utf8_files") or {}
    if bad:
        lines.append(f"{len(bad)} files were not valid UTF-8; their {sum(bad.values())} invalid bytes became U+FFFD "
                     f"(bytes EF BF BD): {some(f'{k} ({v} bytes)' for k, v in bad.items())}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tedjax.data {prepare,stdlib} ...`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m tedjax.data", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize text files/directories into DIR")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("sources", nargs="+", help="text files or directories (scanned recursively)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--pattern", default=DEFAULT_PATTERN,
                   help="'|'-separated file-name globs for files found in directories (default %(default)r); "
                   "files named on the command line are always taken; directories named "
                   f"{', '.join(sorted(_EXCLUDED_DIRS))} are skipped. Skipped files and files that are not "
                   "UTF-8 (invalid bytes become U+FFFD) are reported and listed in meta.json")
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--tokenizer", default=None,
                   help="a Hugging Face tokenizer directory (tokenizer.json) to use instead of UTF-8 bytes")
    p.add_argument("--text-field", default="text",
                   help="the column holding the text in .jsonl/.parquet/.arrow record files (default %(default)r)")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--workers", type=int, default=max(1, min(8, usable)),
                   help="processes encoding with --tokenizer (default: the usable CPUs, up to 8)")
    p.add_argument("--dtype", default="auto", choices=("auto", *_ALLOWED_DTYPES),
                   help="token file dtype; auto = the smallest that holds the vocabulary (uint8 for bytes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("stdlib", help="tokenize the Python standard library's *.py files")
    s.add_argument("--out", default=None, help=f"output directory (default {default_corpus_dir()})")
    s.add_argument("--val-fraction", type=float, default=0.01)
    s.add_argument("--max-bytes", type=int, default=DEFAULT_STDLIB_MAX_BYTES)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            out = Path(args.out)
            meta = prepare(
                args.sources, out, val_fraction=args.val_fraction, pattern=args.pattern,
                max_bytes=args.max_bytes, tokenizer=args.tokenizer, text_field=args.text_field,
                workers=args.workers, dtype=args.dtype, progress=not args.no_progress and sys.stderr.isatty(),
            )
        else:
            out = Path(args.out) if args.out else default_corpus_dir()
            meta = prepare_stdlib(out, max_bytes=args.max_bytes, val_fraction=args.val_fraction)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_summary(out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
