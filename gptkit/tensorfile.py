"""Read a safetensors file into tensors that each own their memory.

safetensors' `load_file` memory-maps the file and hands out views of the mapping. The mapping
stays resident as long as any one of those views lives, so a loader that converts the weights
or lays them out anew (the CPU decode layout) holds the mapped file next to its copies: about
two copies of the weights at its peak. Here each tensor is read with a plain file read into a
tensor of its own, so dropping a tensor frees its memory. safetensors itself still parses and
checks the file (header, dtypes, shapes, offsets) before anything is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorFile:
    """A safetensors file whose tensors are read a few at a time: its header is checked (by
    safetensors) and parsed once, then `read` takes the tensors it is asked for. Raises
    safetensors' SafetensorError for a damaged file, as `load_file` does."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with safe_open(self.path, framework="pt"):  # checks the header against the file's size
            pass
        with self.path.open("rb") as file:
            (self._header_size,) = struct.unpack("<Q", file.read(8))
            self._header = json.loads(file.read(self._header_size))
        self._header.pop("__metadata__", None)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(info["shape"]) for name, info in self._header.items()}

    def read(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors named (default: all), on the CPU, each owning its memory."""
        tensors = {}
        with self.path.open("rb") as file:
            for name in self._header if names is None else names:
                info = self._header[name]
                begin, end = info["data_offsets"]
                if info["dtype"] not in _DTYPES:  # one clear line, as for any unreadable file
                    raise SafetensorError(f"tensor {name} has dtype {info['dtype']}, not read here")
                tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                buffer = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes
                file.seek(8 + self._header_size + begin)
                if file.readinto(buffer) != end - begin:
                    raise OSError(f"{self.path}: the file changed while it was being read")
                tensors[name] = tensor
        return tensors


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU (TensorFile)."""
    return TensorFile(path).read()
