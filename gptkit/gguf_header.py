"""GGUF files (llama.cpp's format), read: every metadata value and where every tensor lies.

The header is walked here rather than by gguf-py's GGUFReader, for two reasons. GGUFReader
trusts the header: a string or array claiming 2**63 items has it loop past the end of its
memory map, and tensor dims whose product overflows uint64 wrap to a small size; here every
length is a Python int checked against the bytes really there. And it is slow: 2.5 s on
SmolLM2's 49k-token vocabulary, where this takes 0.1 s. tests/test_gguf.py checks every value
and tensor place against GGUFReader's. gguf-py still supplies the type table and dequantizes.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .convert import ConversionError


class GGUFError(ConversionError):
    """A GGUF file gptkit cannot read; the one-line message names the file and the problem."""


_MISSING = object()
# GGUF's value types (gguf.GGUFValueType) as struct formats; 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: GGUF allows them; llama.cpp writes none
# Tensor types stored as plain numbers (read with this numpy type); all others are blocks of bytes.
_PLAIN = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclass(frozen=True)
class Stored:
    """Where one tensor lies in the file and how its bytes read."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    offset: int  # from the start of the file
    n_bytes: int
    dtype: np.dtype  # what the bytes read as: the number type, or uint8 for quantized blocks
    row: int  # items of that dtype per innermost row (gguf.quants.dequantize wants rows)


class Header:
    """A walk over a GGUF file's header that keeps every value. Each length, count and tensor
    extent is checked against the file's size as it is read; a loop over items is bounded by
    the file's size, as every item takes at least one byte."""

    def __init__(self, path: Path, data: mmap.mmap, gguf: Any):
        self.path, self.data, self.size, self.pos = path, data, len(data), 0
        self.gguf = gguf
        self.order = "<"
        self.fields: dict[str, Any] = {}
        self.tensors: list[Stored] = []
        self.names: set[str] = set()

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a readable GGUF file ({problem})")

    def take(self, n: int, what: str) -> int:
        """Step over n bytes; their start."""
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n:,} bytes at offset {self.pos:,}, past the end of the file "
                f"({self.size:,} bytes); truncated or corrupt?"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def number(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def text(self, what: str) -> str:
        n = self.number("Q", f"length of {what}")
        start = self.take(n, f"{what} (a string of {n:,} bytes)")
        try:
            return str(self.data[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start:,} is not UTF-8") from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.number(_SCALARS[kind], what)
        if kind == _STRING:
            return self.text(what)
        if kind != _ARRAY:
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define")
        if depth >= _MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item = self.number("I", f"item type of {what}")
        n = self.number("Q", f"length of {what}")
        if item in _SCALARS:
            fmt = f"{self.order}{n}{_SCALARS[item]}"
            start = self.take(n * struct.calcsize(_SCALARS[item]), f"{what} ({n:,} items)")
            return list(struct.unpack_from(fmt, self.data, start))
        if n > self.size - self.pos:  # each string or array item takes >= 8 bytes
            raise self.fail(f"{what} claims {n:,} items, more than the file's bytes")
        return [self.value(item, what, depth + 1) for _ in range(n)]

    def read(self) -> Header:
        self.take(4, "magic")
        if self.data[:4] != b"GGUF":
            raise self.fail("no GGUF magic at the start")
        version = self.number("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack_from(">I", self.data, 4)[0]
        if version not in (2, 3):
            raise self.fail(f"GGUF version {version}; gptkit reads versions 2 and 3")
        n_tensors, n_fields = self.number("Q", "tensor count"), self.number("Q", "field count")
        # A field takes >= 13 bytes (key length, type, a 1-byte value), a tensor's info >= 24.
        for count, what, least in ((n_fields, "metadata fields", 13), (n_tensors, "tensors", 24)):
            if count * least > self.size - self.pos:
                raise self.fail(
                    f"the header claims {count:,} {what}, more than the file could hold"
                )
        for _ in range(n_fields):
            key = self.text("a metadata key")
            shown = _shown(key)
            if key in self.fields:
                raise self.fail(f"metadata key {shown!r} appears twice")
            kind = self.number("I", f"type of {shown}")
            if key == "general.alignment" and kind != _UINT32:
                raise self.fail(f"general.alignment has value type {kind}, not uint32 ({_UINT32})")
            self.fields[key] = self.value(kind, f"metadata {shown!r}")
        alignment = self.fields.get("general.alignment", 32)  # GGUF_DEFAULT_ALIGNMENT
        if alignment == 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment={alignment} is not a power of two")
        infos = [self._tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        for name, dims, qtype, offset in infos:
            self._place(name, dims, qtype, data_start + offset)
        return self

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.text("a tensor name")
        shown = _shown(name)
        n_dims = self.number("I", f"dimension count of tensor {shown}")
        if n_dims > _MAX_DIMS:
            raise self.fail(f"tensor {shown} claims {n_dims:,} dimensions (at most 4)")
        dims = [self.number("Q", f"dimensions of tensor {shown}") for _ in range(n_dims)]
        qtype = self.number("I", f"type of tensor {shown}")
        return name, dims, qtype, self.number("Q", f"offset of tensor {shown}")

    def _place(self, name: str, dims: list[int], qtype: int, start: int) -> None:
        shown = _shown(name)
        if name in self.names:
            raise self.fail(f"tensor {shown} appears twice")
        self.names.add(name)
        sizes = self.gguf.GGML_QUANT_SIZES
        kind = next((k for k in sizes if int(k) == qtype), None)
        if kind is None:
            raise self.fail(f"tensor {shown} has type {qtype}, which GGML does not define")
        block, block_bytes = sizes[kind]
        inner = dims[0] if dims else 1
        if inner % block:
            raise self.fail(f"tensor {shown}: rows of {inner} do not fill {block}-blocks")
        n_bytes = math.prod(dims) // block * block_bytes
        if start + n_bytes > self.size:
            raise self.fail(
                f"tensor {shown} with GGUF dims {dims} spans bytes "
                f"{start:,}..{start + n_bytes:,}, past the end of the file "
                f"({self.size:,} bytes); truncated or corrupt?"
            )
        if kind.name in _PLAIN:
            dtype, row = np.dtype(_PLAIN[kind.name]).newbyteorder(self.order), inner
        else:
            dtype, row = np.dtype(np.uint8), inner // block * block_bytes
        shape = tuple(reversed(dims))  # GGUF lists dims innermost first
        self.tensors.append(Stored(name, kind, shape, start, n_bytes, dtype, row))


def _shown(text: str) -> str:
    """A string from the file as a message shows it: escaped (no newline from the file reaches
    a message) and cut short (a key may be megabytes long)."""
    return repr(text[:80])[1:-1] + ("..." if len(text) > 80 else "")


class GGUFFile:
    """An open GGUF file: metadata lookup with errors that name the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            import gguf
        except ImportError:
            msg = "reading GGUF needs the gguf package: pip install gguf"
            raise GGUFError(f"{self.path}: {msg}") from None
        self.gguf = gguf
        size = self.path.stat().st_size
        if size < 24:  # magic, version and the two counts
            raise GGUFError(f"{self.path}: not a readable GGUF file (only {size} bytes)")
        with (
            self.path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            header = Header(self.path, data, gguf).read()
        self.fields, self.tensors = header.fields, header.tensors

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.fields:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return self.fields[key]

    def length(self, key: str) -> int:
        """Items in an array field."""
        return len(self.get(key))

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")
