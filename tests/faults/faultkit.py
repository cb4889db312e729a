"""Helpers for the fault-injection suite: tiny data and models, running `gptkit` with a fault
injected (see fault_run.py), damaging files, and comparing runs.

Not a conftest.py on purpose: tests/ modules import names from the top-level conftest
(`from conftest import TEXT`), and a second conftest module here could shadow it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import corpus_text, prepare_corpus
from safetensors.torch import load_file

from gptkit.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
FAULT_RUN = Path(__file__).with_name("fault_run.py")
TEXT = corpus_text(400)

# A tiny model and a short run on one thread, so every run takes the same arithmetic path and
# a resumed run can equal an unbroken one bit for bit. Dropout makes the RNG state matter too.
TINY = [
    "model.preset=tiny",
    "model.block_size=32",
    "batch_size=4",
    "warmup_steps=2",
    "eval_batches=2",
    "log_every=1",
    "threads=1",
    "progress=false",
    "tensorboard=false",
    "model.dropout=0.1",
]


def prepare_data(root: Path) -> Path:
    """A character-level corpus prepared into token shards: root/data."""
    return prepare_corpus(root, TEXT)


def start_gptkit(*args: str, fault: str | None = None) -> subprocess.Popen:
    """`gptkit ARGS` started in a fresh process, through fault_run.py with GPTKIT_FAULT=fault."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("GPTKIT_FAULT", None)
    if fault:
        env["GPTKIT_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, str(FAULT_RUN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def gptkit(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """`gptkit ARGS` run to the end in a fresh process (see start_gptkit)."""
    proc = start_gptkit(*args, fault=fault)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str):
    assert a.keys() == b.keys(), f"{what}: different tensor names"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: tensors differ: {differ[:5]}"


def metric_rows(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, metric, value) of every logged value except wall-clock ones."""
    skip = {"time", "step", "tokens_per_s", "mfu"}
    return [
        (row["step"], key, value)
        for row in read_metrics(run_dir)
        for key, value in row.items()
        if key not in skip
    ]


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a checkpoint dir, or of the backup a crash between renames left."""
    from gptkit.checkpoint import read_meta

    return read_meta(checkpoint)["train"]["step"]


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(run_dir: Path) -> list[str]:
    """Temporary or backup checkpoint directories that a save left behind."""
    return sorted(p.name for p in run_dir.glob(".checkpoint.*"))


def damage(path: Path, how: str) -> None:
    """Damage `path` in place. how: "empty"; "cut:N" keeps the first N bytes (N < 0: all but
    the last -N); "flip:N" inverts the byte at offset N (N < 0: from the end; "50%": halfway
    through the file); "flip-every:K"
    inverts the high byte of every K-th uint16 token after a 32-byte shard header."""
    data = bytearray(path.read_bytes())
    kind, _, arg = how.partition(":")
    at = len(data) * int(arg[:-1]) // 100 if arg.endswith("%") else int(arg or 0)
    if kind == "empty":
        data = bytearray()
    elif kind == "cut":
        data = data[:at]
    elif kind == "flip":
        data[at] ^= 0xFF
    elif kind == "flip-every":
        tokens = np.frombuffer(bytes(data[32:]), "<u2").copy()
        tokens[:: int(arg)] ^= 0xFF00
        data[32:] = tokens.tobytes()
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


def one_line_error(rc: int, stderr: str) -> str:
    """The single `gptkit: error: ...` line of a failed CLI call; asserts it is just that."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("gptkit: error: "), stderr[-2000:]
    return lines[0]


def read_json(path: Path):
    return json.loads(path.read_text())


def write_tiny_gguf(path: Path) -> Path:
    """A tiny llama GGUF (one layer, F32, byte-level BPE vocabulary) that gptkit can load."""
    from ggufkit import tiny_weights, write_gguf

    shape = dict(C=64, I=128)
    return write_gguf(path, tiny_weights(tied=True, **shape)[0], shape=shape)


def gguf_offsets(path: Path) -> dict[str, int]:
    """Byte offsets inside a GGUF file where a truncation lands in each of its parts."""
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first, last = reader.tensors[0], reader.tensors[-1]
    return {
        "magic": 2,
        "counts": 12,  # inside the tensor and metadata counts of the header
        "metadata": int(tokens.offset) + 40,  # inside the token list
        "tensor-info": int(first.field.offset) + 6,  # inside the first tensor's name
        "tensor-data": int(last.data_offset) + int(last.n_bytes) // 2,
        "last-byte": int(last.data_offset) + int(last.n_bytes) - 1,  # not padding
    }
