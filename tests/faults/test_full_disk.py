"""A full disk during a checkpoint write: one clear error, the previous checkpoint untouched
(same bytes), no half-written temporary directory left, and `--resume` from it reaches the
same weights as a run that never failed.

Each write of a save fails in turn: the weights (safetensors, Rust), config.json and the
tokenizer files (Python), the optimizer state (safetensors again), and the fsync that flushes
them. The patched writes raise what each library raises on a full disk (recorded on a real
full tmpfs); a real small tmpfs is filled up too when this process may mount one.
"""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from faultkit import (
    TINY,
    assert_same_tensors,
    digest,
    gptkit,
    leftovers,
    one_line_error,
    prepare_data,
    weights,
)
from safetensors import SafetensorError

import gptkit.checkpoint as checkpoint
import gptkit.train as train_module
from gptkit.checkpoint import CheckpointError, load_checkpoint
from gptkit.train import train
from gptkit.train_config import load_train_config

ARGS = [*TINY, "max_steps=8", "checkpoint_every=4", "eval_every=4"]
STAGES = ["weights", "config", "tokenizer", "train_state", "fsync"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("full"))


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """Measuring the CPU's peak FLOP/s takes seconds per run and is not under test."""
    monkeypatch.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)


def config(data_dir: Path, out: Path):
    return load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", *ARGS])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Weights and checkpoint size of the run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)
        train(config(data_dir, out))
    size = sum(p.stat().st_size for p in (out / "checkpoint").rglob("*") if p.is_file())
    files = sum(1 for p in (out / "checkpoint").rglob("*") if p.is_file())
    return weights(out / "checkpoint"), size, files


class SecondSave:
    """Wraps the trainer's save_checkpoint: the second save (step 8) is armed to fail, and the
    checkpoint it is about to replace is fingerprinted first."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.calls, self.before = 0, None
        real = train_module.save_checkpoint

        def save(directory, *args, **kwargs):
            self.calls += 1
            if self.armed:
                self.before = digest(Path(directory))
            return real(directory, *args, **kwargs)

        mp.setattr(train_module, "save_checkpoint", save)

    @property
    def armed(self) -> bool:
        return self.calls == 2


# What each writer raises when the disk fills up, as observed on a full tmpfs: safetensors'
# Rust error, Python's OSError.
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def inject(stage: str, mp: pytest.MonkeyPatch, second: SecondSave) -> None:
    """Make `stage`'s write of the second save fail as a full disk makes it fail (after
    writing part of the file, as a real write does)."""
    if stage in ("weights", "train_state"):
        target = "model.safetensors" if stage == "weights" else "tensors.safetensors"
        real_save_file = checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            if second.armed and Path(filename).name == target:
                Path(filename).write_bytes(b"\0" * 64)
                raise SafetensorError(SAFETENSORS_FULL)
            return real_save_file(tensors, filename, metadata=metadata)

        mp.setattr(checkpoint, "save_file", save_file)
    elif stage in ("config", "tokenizer"):
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            inside = self.parent.name if stage == "config" else self.parent.parent.name
            wanted = stage == "tokenizer" or self.name == "config.json"
            if second.armed and inside.startswith(".checkpoint.tmp-") and wanted:
                real_write_text(self, data[: len(data) // 2], *args, **kwargs)
                raise enospc()
            return real_write_text(self, data, *args, **kwargs)

        mp.setattr(Path, "write_text", write_text)
    elif stage == "fsync":  # delayed allocation: the error surfaces when the data is flushed
        real_fsync = os.fsync

        def fsync(fd):
            if second.armed:
                raise enospc()
            return real_fsync(fd)

        mp.setattr(os, "fsync", fsync)


def check_failed_save(error: str, out: Path, second: SecondSave, reference, data_dir) -> None:
    """The error is one clear line, the step-4 checkpoint is as it was, and resuming from it
    reaches the reference weights."""
    ckpt = out / "checkpoint"
    assert "\n" not in error
    assert f"cannot write checkpoint {ckpt}" in error, error
    assert f"cannot write checkpoint {ckpt}: the disk is full" in error, error
    assert "free some space" in error, error
    assert "--resume" in error, error
    assert f"{ckpt} still holds the previous checkpoint" in error, error
    assert second.before and digest(ckpt) == second.before  # not a byte changed
    assert leftovers(out) == []  # the half-written temporary directory is gone
    _, _, meta = load_checkpoint(ckpt)
    assert meta["train"]["step"] == 4
    result = train(config(data_dir, out), resume=True)
    assert result.steps == 8
    assert_same_tensors(reference[0], weights(ckpt), "resumed after a full disk")


@pytest.mark.parametrize("stage", STAGES)
def test_full_disk_while_saving_is_one_clear_error_and_keeps_the_checkpoint(
    stage, data_dir, tmp_path, reference
):
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        second = SecondSave(mp)
        inject(stage, mp, second)
        with pytest.raises(CheckpointError) as failed:
            train(config(data_dir, out))
    assert second.calls == 2
    assert isinstance(failed.value, OSError)  # what callers caught before it had a name
    check_failed_save(str(failed.value), out, second, reference, data_dir)


def test_full_disk_via_the_cli_is_one_line_then_resume_works(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    args = ["pretrain", f"data_dir={data_dir}", f"out_dir={out}", *ARGS]
    done = gptkit(*args, fault="full:2")  # the second save's weights hit a full disk
    line = one_line_error(done.returncode, done.stderr)
    assert f"cannot write checkpoint {out / 'checkpoint'}: the disk is full" in line
    assert "No space left on device" in line, line
    assert leftovers(out) == []
    assert load_checkpoint(out / "checkpoint")[2]["train"]["step"] == 4
    done = gptkit(*args, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tensors(reference[0], weights(out / "checkpoint"), "CLI resume after full disk")


def _mount_tmpfs(path: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes at `path`; None, or why it could not be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


def test_a_real_full_tmpfs(data_dir, tmp_path, reference):
    """A tmpfs with room for one checkpoint and a half: the second save runs out of space for
    real, wherever in its writes that happens; after the disk grows, --resume finishes."""
    _, size, files = reference
    page = 4096
    pages = size // page + files + 4  # each file rounds up to whole pages; metrics, dirs
    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, pages * page * 3 // 2)
    if why:
        pytest.skip(why)
    try:
        out = disk / "run"
        with pytest.MonkeyPatch.context() as mp:
            second = SecondSave(mp)
            with pytest.raises(CheckpointError) as failed:
                train(config(data_dir, out))
        assert second.calls == 2
        grow = ["mount", "-o", f"remount,size={pages * page * 4}", str(disk)]
        subprocess.run(grow, check=True, capture_output=True)
        check_failed_save(str(failed.value), out, second, reference, data_dir)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
