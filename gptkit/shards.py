"""Token shards: the files pretraining reads (written by prepare.py, read by data.py).

Shard format, version 1: a 32-byte header, then the tokens, little-endian.

    offset 0   8 bytes  magic b"GPTKTOK\\0"
    offset 8   uint32   format version (1)
    offset 12  uint32   bytes per token: 2 (uint16, when vocab_size <= 65536) or 4 (uint32)
    offset 16  uint64   token count
    offset 24  8 bytes  reserved (zero)

Shards are written to a .tmp name and moved into place once complete, so a crash leaves no
shard that looks whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GPTKTOK\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, reserved
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class ShardError(ValueError):
    """A token shard that is not what its header promises; the message names file and fix."""


def shard_dtype(vocab_size: int) -> np.dtype:
    return DTYPES[2] if vocab_size <= 1 << 16 else DTYPES[4]


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard as a read-only memmap, after checking its header."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size and MAGIC.startswith(head[:8]):  # empty, or cut in the header
        raise ShardError(
            f"{path} is truncated: {size} bytes, no {MAGIC!r} header of {HEADER.size} bytes; "
            "prepare the corpus again"
        )
    if head[:8] != MAGIC:
        raise ShardError(
            f"{path} is not a gptkit token shard (no {MAGIC!r} header); damaged? prepare the "
            "corpus again"
        )
    _, version, width, count = HEADER.unpack(head)
    if version > VERSION:
        raise ShardError(
            f"{path} has format version {version}, written by a newer gptkit (or a damaged "
            "header); upgrade gptkit or prepare the corpus again"
        )
    if version != VERSION:
        raise ShardError(f"{path} has unknown format version {version}; prepare it again")
    if width not in DTYPES:
        raise ShardError(f"{path} has unknown token width {width} (expected 2 or 4); damaged?")
    body = size - HEADER.size
    if body != count * width:
        # A damaged count in the header reads the same as a cut file: say both.
        what = "truncated" if body < count * width else "has trailing bytes"
        why = " (cut short, or its header is damaged)" if body < count * width else ""
        raise ShardError(
            f"{path} is {what}: header says {count} tokens, file holds {body / width:g}{why}; "
            "prepare the corpus again"
        )
    if count == 0:
        return np.zeros(0, DTYPES[width])
    return np.memmap(path, dtype=DTYPES[width], mode="r", offset=HEADER.size, shape=(count,))


class ShardWriter:
    """Writes one split's tokens into `{split}_NNNNNN.bin`, rolling over every `limit` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, limit: int) -> None:
        self.out_dir, self.split, self.dtype, self.limit = out_dir, split, dtype, limit
        self.shards: list[str] = []
        self.tokens = self.documents = self._in_shard = 0
        self._file: Any = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._file = (self.out_dir / f"{name}.tmp").open("wb")
                self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))
                self.shards.append(name)
            part = tokens[: self.limit - self._in_shard]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self._in_shard += len(part)
            self.tokens += len(part)
            tokens = tokens[len(part) :]
            if self._in_shard == self.limit:
                self.close()

    def close(self) -> None:
        """Fill in the count and move the shard into place (a crash leaves only a .tmp)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._in_shard))
        self._file.close()
        name = self.shards[-1]
        os.replace(self.out_dir / f"{name}.tmp", self.out_dir / name)
        self._file, self._in_shard = None, 0
