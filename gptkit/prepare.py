"""Corpus -> token shards + meta.json: the input of pretraining.

Sources are plain-text files (.txt, .md or any explicitly named file: one file is one document),
JSONL / CSV / Parquet files (one row is one document, its `text_column`), folders (their files
of those kinds, recursively, in sorted order) or a Hugging Face `datasets` name (streamed).
Each document's tokens are followed by the tokenizer's end-of-text id. A document after the
first goes to the validation split when a hash of (seed, document index) falls below
`val_fraction`, so the split is deterministic and needs no second pass; if no document lands
there, the last one does (when it is small enough to have been held back). A corpus of a single
document (one text file, like tinyshakespeare) is split by position instead, as nanoGPT splits
a text: its last `val_fraction` of tokens are the validation split. Bytes that are not UTF-8
are replaced with U+FFFD and reported (file, offset of the first, count), never fatal.

Everything streams: long text files are read in pieces cut after a newline (decoding is exact;
a token may differ from whole-file encoding at a rare piece boundary), and a long JSONL, CSV or
Parquet row is cut the same way, so no worker ever tokenizes more than a piece at once (a 10 MB
row used to take 1.8 GB). Pieces are tokenized in worker processes in order, so the output is
byte-identical for any number of workers. A worker that dies (killed, out of memory) is one
PrepareError naming the file and line it was encoding, never a hang (concurrent.futures reports
a dead worker; multiprocessing.Pool silently replaced it and waited for ever).

Output directory: `train_000000.bin`, `train_000001.bin`, ..., `val_000000.bin`, `meta.json`
(written last: a directory without it is an unfinished run) and `tokenizer/`.

The shard format: shards.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import sources as _sources  # its PIECE_BYTES read at call time (tests shrink it)
from .config import first_line
from .shards import VERSION, ShardWriter, shard_dtype
from .sources import Piece, PrepareError, Reader, source_files
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer_files import load_tokenizer

HOLD_BACK_TOKENS = 1 << 24  # the last train document is held back for val only if smaller
SPILL_TOKENS = 1 << 20  # past this, a held document waits on disk (memory stays flat)


def _is_val(seed: int, index: int, fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


_WORKER_TOKENIZER: Tokenizer | None = None
Batch = list[tuple[str, bool]]  # (text piece, ends a document)


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _encode(batch: Batch, tokenizer: Tokenizer | None = None) -> list[tuple[np.ndarray, bool]]:
    """Token arrays for a batch of pieces; a piece that ends a document gets eos appended."""
    tok = tokenizer or _WORKER_TOKENIZER
    assert tok is not None and tok.eos_id is not None
    rows = tok.encode_many([text for text, _ in batch])
    dtype = shard_dtype(tok.vocab_size)
    return [
        (np.array(row + [tok.eos_id] if end else row, dtype), end)
        for row, (_, end) in zip(rows, batch, strict=True)
    ]


def _batches(
    pieces: Iterator[Piece], meter: tqdm, read: list[int]
) -> Iterator[tuple[Batch, tuple[str, str]]]:
    """Pieces grouped into batches of about PIECE_BYTES (sources.py), each with where its
    first and last pieces come from; `read[0]` counts the bytes read."""
    batch: Batch = []
    size, first, last = 0, "", ""
    for text, end, nbytes, where in pieces:
        first, last = (first or where), where
        batch.append((text, end))
        size += nbytes
        read[0] += nbytes
        meter.update(nbytes)
        if size >= _sources.PIECE_BYTES:
            yield batch, (first, last)
            batch, size, first = [], 0, ""
    if batch:
        yield batch, (first, last)


def _span(first: str, last: str) -> str:
    return first if first == last else f"{first} to {last}"


class _Held:
    """The held-back document's tokens: in memory while small, then in an unnamed file in the
    output folder, so holding one up to HOLD_BACK_TOKENS long does not grow memory with it."""

    def __init__(self, out_dir: Path, dtype: np.dtype) -> None:
        self.out_dir, self.dtype = out_dir, dtype
        self.tokens = 0
        self._parts: list[np.ndarray] = []
        self._file: Any = None

    def append(self, tokens: np.ndarray) -> None:
        self.tokens += len(tokens)
        if self._file is None and self.tokens > SPILL_TOKENS:
            # Not /tmp: it may be in memory. Unnamed, so no crash leaves it behind.
            self._file = tempfile.TemporaryFile(dir=self.out_dir)  # noqa: SIM115 close()
            for part in self._parts:
                self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self._parts = []
        if self._file is None:
            self._parts.append(tokens)
        else:
            self._file.write(tokens.astype(self.dtype, copy=False).tobytes())

    def pieces(self, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Tokens [start, stop) in order, in pieces of at most SPILL_TOKENS from the file
        (read, not memory-mapped: mapped pages would count as the process's memory)."""
        stop = self.tokens if stop is None else stop
        if self._file is None:
            offset = 0
            for part in self._parts:
                lo, hi = max(start - offset, 0), min(stop - offset, len(part))
                if lo < hi:
                    yield part[lo:hi]
                offset += len(part)
            return
        self._file.flush()
        self._file.seek(start * self.dtype.itemsize)
        for at in range(start, stop, SPILL_TOKENS):
            n = min(SPILL_TOKENS, stop - at)
            yield np.frombuffer(self._file.read(n * self.dtype.itemsize), self.dtype)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Splitter:
    """Routes each document's tokens to train or val. The latest train document is held back
    (while under HOLD_BACK_TOKENS) so that it can become the val split if no other did, or
    give its tail to val when it is the only document."""

    def __init__(self, writers: dict[str, ShardWriter], seed: int, fraction: float) -> None:
        self.writers, self.seed, self.fraction = writers, seed, fraction
        self.index, self.split, self.starting = 0, "train", True
        self.held: _Held | None = None  # None: the current document is not held

    def add(self, tokens: np.ndarray, end: bool) -> None:
        if self.starting:
            self.starting = False
            # The first document always starts in train, so a lone document can be split.
            val = self.index > 0 and _is_val(self.seed, self.index, self.fraction)
            self.split = "val" if val else "train"
            if self.split == "train":
                self._flush_held("train")
                self.held = _Held(self.writers["train"].out_dir, self.writers["train"].dtype)
        if self.held is not None and self.split == "train":
            self.held.append(tokens)
            if self.held.tokens > HOLD_BACK_TOKENS:  # too big to hold: write it now
                self._flush_held("train", count=False)  # counted when it ends
        else:
            self.writers[self.split].write(tokens)
        if end:
            self.index, self.starting = self.index + 1, True
            if self.split == "val" or self.held is None:  # a held one counts when flushed
                self.writers[self.split].documents += 1

    def finish(self) -> None:
        no_val = self.writers["val"].documents == 0 and self.fraction > 0
        if no_val and self.index == 1 and self.held is not None and self.held.tokens:
            held = self.held  # the only document: its tail becomes val
            cut = int(held.tokens * (1 - self.fraction))
            for split, start, stop in (("train", 0, cut), ("val", cut, held.tokens)):
                for part in held.pieces(start, stop):
                    self.writers[split].write(part)
                self.writers[split].documents += 1
            held.close()
            self.held = None
        self._flush_held("val" if no_val and self.index >= 2 else "train")
        for writer in self.writers.values():
            writer.close()

    def _flush_held(self, split: str, count: bool = True) -> None:
        held, self.held = self.held, None
        if held is None:
            return
        if held.tokens:
            for part in held.pieces():
                self.writers[split].write(part)
            self.writers[split].documents += count
        held.close()


def prepare(
    sources: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    *,
    text_column: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    dataset: str | None = None,
    dataset_split: str = "train",
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `sources` (and/or the HF `dataset`) into shards in `out_dir`; returns meta."""
    if tokenizer.eos_id is None:
        raise PrepareError(f"{tokenizer!r} has no end-of-text token to separate documents with")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise PrepareError(f"shard_tokens={shard_tokens} must be positive")
    if not sources and dataset is None:
        raise PrepareError("nothing to prepare: give text files, folders or a dataset")
    if not str(out_dir).strip():  # "" would write the shards into the current directory
        raise PrepareError("the output directory is empty: name one with --out")
    files = source_files(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("train_*.bin*"), *out.glob("val_*.bin*"), out / "meta.json"]:
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)  # no files left from another kind
    tokenizer.save(out / "tokenizer")
    workers = max(1, workers or os.cpu_count() or 1)
    dtype = shard_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    splitter = _Splitter(writers, seed, val_fraction)
    reader = Reader(text_column)
    start, read = time.perf_counter(), [0]
    total = sum(f.stat().st_size for f in files) if dataset is None else None
    meter = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress)

    def pieces() -> Iterator[Piece]:
        yield from reader.pieces(files)
        if dataset is not None:
            yield from reader.dataset(dataset, dataset_split)

    pool = None
    if workers > 1:
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(context),
            initializer=_init_worker,
            initargs=(str(out / "tokenizer"),),
        )
    try:
        for encoded in _in_order(_batches(pieces(), meter, read), tokenizer, pool, 2 * workers):
            for tokens, end in encoded:
                splitter.add(tokens, end)
        splitter.finish()
    finally:
        meter.close()
        if pool is not None:  # on an error: drop the queued batches, do not wait for them
            pool.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - start
    if splitter.index == 0:
        where = ", ".join(map(str, [*sources, *([dataset] if dataset else [])]))
        raise PrepareError(f"empty corpus: no text in {where}")
    if writers["val"].documents == 0 and val_fraction > 0:
        tqdm.write(
            f"gptkit prepare: warning: no validation documents among "
            f"{splitter.index}; give more documents (one per file or row), or a single "
            f"document under {HOLD_BACK_TOKENS:,} tokens to split by position",
            file=sys.stderr,
        )
    meta = {
        "format": "gptkit-tokens",
        "version": VERSION,
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "path": "tokenizer",
            "sha256": _fingerprint(out / "tokenizer"),
        },
        "dtype": dtype.name,
        "splits": {
            name: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
            for name, w in writers.items()
        },
        "sources": [str(s) for s in sources]
        + ([f"hf:{dataset}:{dataset_split}"] if dataset else []),
        "text_column": text_column,
        "seed": seed,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "bytes": read[0],
        "seconds": round(seconds, 3),
        "mb_per_s": round(read[0] / 1e6 / seconds, 3),
        "decode_errors": reader.decode_errors,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _in_order(
    batches: Iterator[tuple[Batch, tuple[str, str]]],
    tokenizer: Tokenizer,
    pool: ProcessPoolExecutor | None,
    ahead: int,
) -> Iterator[list[tuple[np.ndarray, bool]]]:
    """Encoded batches in input order, at most `ahead` in flight (Executor.map would read the
    whole corpus ahead into its queue, so memory would grow with it)."""
    if pool is None:
        for batch, (first, last) in batches:
            with _naming(_span(first, last)):
                encoded = _encode(batch, tokenizer)
            yield encoded
        return
    in_flight: deque[tuple[Future, tuple[str, str]]] = deque()

    def oldest() -> list[tuple[np.ndarray, bool]]:
        future, (first, last) = in_flight.popleft()
        # A dead worker fails every batch in flight, and which one killed it is unknown:
        # name them all (a tokenizer error is the batch's own).
        newest = in_flight[-1][1][1] if in_flight else last
        with _naming(_span(first, last), _span(first, newest)):
            return future.result()

    for batch, where in batches:
        in_flight.append((pool.submit(_encode, batch), where))
        if len(in_flight) >= ahead:
            yield oldest()
    while in_flight:
        yield oldest()


@contextlib.contextmanager
def _naming(where: str, in_flight: str | None = None) -> Iterator[None]:
    """Errors while encoding text from `where` (with `in_flight` being encoded meanwhile) as
    PrepareErrors that name it."""
    try:
        yield
    except BrokenProcessPool:
        raise PrepareError(
            f"a tokenizer worker process died while encoding {in_flight or where} (killed, or "
            "out of memory); nothing is finished (no meta.json): run again, with fewer "
            "--workers if memory is short"
        ) from None
    except TokenizerError as e:
        raise PrepareError(f"{where}: {first_line(e)}") from None


def _fingerprint(directory: Path) -> str:
    """sha256 over the saved tokenizer's files, so data and model can check they agree."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
