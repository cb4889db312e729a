"""Truncated or byte-flipped files: a token shard and meta.json, a checkpoint's weights,
config.json and training state (train_state/'s tensors and JSON), a Hugging Face
model.safetensors and config.json, and a GGUF file cut in its header, metadata, tensor infos
and tensor data. Each must fail with gptkit's own error class and a one-line message naming
the damaged file, both from the library and from the CLI (exit status 2, one stderr line, no
traceback), never with an exception from deep inside numpy, torch, safetensors or gguf-py.

Damage written as "cut:N" keeps the first N bytes (N < 0: drops the last -N), "flip:N"
inverts byte N, "flip-every:K" inverts the high byte of every K-th token of a shard; "@part"
stands for an offset inside that part of a GGUF file (faultkit.gguf_offsets).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from faultkit import (
    TINY,
    damage,
    gguf_offsets,
    one_line_error,
    prepare_data,
    write_tiny_gguf,
)

import gptkit.train as train_module
from gptkit.api import load
from gptkit.checkpoint import CheckpointError, load_checkpoint, load_train_state
from gptkit.cli import main
from gptkit.convert import ConversionError, export_hf
from gptkit.data import DataError, TokenData
from gptkit.shards import ShardError
from gptkit.train import train
from gptkit.train_config import load_train_config

CASES = {
    # target: damages
    "shard": [
        "empty",
        "cut:20",  # inside the 32-byte header
        "cut:-3",  # the last token and a half gone
        "flip:0",  # magic
        "flip:8",  # format version
        "flip:12",  # bytes per token
        "flip:23",  # high byte of the token count
        "flip-every:8",  # token ids far past the vocabulary, all through the data
    ],
    "meta.json": ["empty", "cut:-15", "flip:4"],
    "checkpoint-weights": ["empty", "cut:4", "cut:60", "cut:-1", "flip:3", "flip:20"],
    "checkpoint-config": ["empty", "cut:-20", "flip:30"],
    # The tensors' sha256 in state.json finds a flip anywhere in them, moment data included.
    "train-state-tensors": ["empty", "cut:100", "cut:-30", "flip:10%", "flip:50%", "flip:90%"],
    "train-state-json": ["empty", "cut:-30", "flip:2"],
    "hf-weights": ["cut:4", "cut:60", "cut:-1", "flip:3", "flip:20"],
    "hf-config": ["cut:-20", "flip:2"],
    "gguf": [
        "empty",
        "cut:@magic",
        "cut:@counts",
        "cut:@metadata",
        "cut:@tensor-info",
        "cut:@tensor-data",
        "cut:@last-byte",
        "flip:0",
    ],
}
PARAMS = [(target, how) for target, damages in CASES.items() for how in damages]


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """Measuring the CPU's peak FLOP/s takes seconds per run and is not under test."""
    monkeypatch.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Undamaged inputs, copied before each case damages them: prepared data, a resumable
    training run, a Hugging Face export of its model and a tiny GGUF file."""
    root = tmp_path_factory.mktemp("originals")
    data = prepare_data(root)
    run = root / "run"
    settings = [f"data_dir={data}", f"out_dir={run}", *TINY, "max_steps=2", "eval_every=0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)
        train(load_train_config(None, settings))
    model, tokenizer, _ = load_checkpoint(run / "checkpoint")
    hf = export_hf(model, root / "hf", eos_token_id=tokenizer.eos_id)
    tokenizer.save(hf)
    gguf_file = write_tiny_gguf(root / "tiny.gguf")
    return {"data": data, "run": run, "hf": hf, "gguf": gguf_file}


def setup(target: str, originals: dict, tmp: Path):
    """(file to damage, library call that reads it, CLI argv that reads it, error classes)."""
    copy = {
        "data": lambda: shutil.copytree(originals["data"], tmp / "data"),
        "run": lambda: shutil.copytree(originals["run"], tmp / "run"),
        "hf": lambda: shutil.copytree(originals["hf"], tmp / "hf"),
    }
    pretrain = ["pretrain", f"out_dir={tmp / 'new'}", *TINY, "max_steps=2", "eval_every=0"]
    resume = [
        "pretrain",
        f"data_dir={originals['data']}",
        f"out_dir={tmp / 'run'}",
        *TINY,
        "max_steps=4",
        "--resume",
    ]
    generate = ["generate", "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"]
    if target in ("shard", "meta.json"):
        data = copy["data"]()
        name = "train_000000.bin" if target == "shard" else "meta.json"

        def read():
            split = TokenData(data, "train")
            split.random_windows(np.random.default_rng(0), 8, 32)

        return data / name, read, [*pretrain, f"data_dir={data}"], (ShardError, DataError)
    if target.startswith(("checkpoint", "train-state")):
        ckpt = copy["run"]() / "checkpoint"
        if target == "checkpoint-weights":
            argv = [*generate, "--model", str(ckpt)]
            return ckpt / "model.safetensors", lambda: load_checkpoint(ckpt), argv, CheckpointError
        if target == "checkpoint-config":
            return ckpt / "config.json", lambda: load_checkpoint(ckpt), resume, CheckpointError
        name = "tensors.safetensors" if target == "train-state-tensors" else "state.json"
        return ckpt / "train_state" / name, lambda: load_train_state(ckpt), resume, CheckpointError
    if target.startswith("hf"):
        hf = copy["hf"]()
        name = "model.safetensors" if target == "hf-weights" else "config.json"
        errors = (ConversionError, CheckpointError)
        return (
            hf / name,
            lambda: load(hf, device="cpu"),
            ["convert", str(hf), str(tmp / "out")],
            errors,
        )
    path = shutil.copy(originals["gguf"], tmp / "tiny.gguf")
    argv = [*generate, "--model", str(path)]
    return Path(path), lambda: load(path, device="cpu"), argv, ConversionError  # GGUFError


@pytest.mark.parametrize("target, how", PARAMS, ids=[f"{t}-{h}" for t, h in PARAMS])
def test_damaged_file_is_a_clear_error_naming_it(target, how, originals, tmp_path, capsys):
    path, read, argv, errors = setup(target, originals, tmp_path)
    if "@" in how:  # an offset inside a named part of the GGUF file
        kind, part = how.split(":@")
        how = f"{kind}:{gguf_offsets(path)[part]}"
    before = path.read_bytes()
    damage(path, how)
    assert path.read_bytes() != before

    with pytest.raises(errors) as failed:
        read()
    message = str(failed.value)
    assert str(path) in message, f"the error does not name {path}: {message}"
    assert "\n" not in message.strip()

    capsys.readouterr()
    status = main(argv)
    line = one_line_error(status, capsys.readouterr().err)
    assert str(path) in line, line


def test_gguf_truncation_points_are_in_their_parts(originals):
    """The @part offsets land where their names say (so the cases above cut each part)."""
    offsets = gguf_offsets(originals["gguf"])
    order = ["magic", "counts", "metadata", "tensor-info", "tensor-data", "last-byte"]
    assert [offsets[p] for p in order] == sorted(offsets[p] for p in order)
    assert len(set(offsets.values())) == len(order)
