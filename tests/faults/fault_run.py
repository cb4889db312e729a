"""`gptkit ARGS` with one fault injected, chosen by GPTKIT_FAULT (run as a script by the tests).

The product code has no test hooks: this wrapper patches functions the trainer and the
checkpoint writer call, then runs the real CLI. A "kill" is a real SIGKILL of this process
(no cleanup, no finally blocks, no flushing), delivered at a chosen point:

    step:S         right after optimizer step S, before it is logged or saved
    log:S          halfway through writing step S's metrics line (a torn line)
    weights:N      during the N-th checkpoint save: model.safetensors half written
    train_state:N  during the N-th save: train_state/tensors.safetensors half written
    fsync:N        during the N-th save: every file written and fsynced, before the rename
    swap:N         during the N-th save: between its two renames (only the backup exists)
    full:N         not a kill: the N-th save's model.safetensors write hits a full disk
                   (raising the error safetensors raises then)
    worker:TEXT    `gptkit prepare`: the tokenizer worker process given a piece of text that
                   holds TEXT is SIGKILLed (what the out-of-memory killer does)

Measuring the CPU's peak FLOP/s (for MFU) is skipped: it costs seconds and is not under test.
"""

import os
import signal
import sys
from pathlib import Path

from safetensors import SafetensorError

import gptkit.atomic_dir as atomic_dir
import gptkit.checkpoint as checkpoint
import gptkit.metrics as metrics
import gptkit.prepare as prepare
import gptkit.train as train
from gptkit.cli import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def half_write(path: str | Path) -> None:
    """Cut a file just written to half its size: what a kill mid-write leaves."""
    path = Path(path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
        f.flush()
        os.fsync(f.fileno())


def nth(n: int):
    """A counter: call it once per event; True on the n-th call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n

    return hit


def install(fault: str) -> None:
    kind, _, arg = fault.partition(":")
    n = int(arg) if arg.isdigit() else 0
    if kind == "worker":
        # Workers are forked from this process, so they run this patched function.
        real_encode = prepare._encode

        def encode(batch, tokenizer=None):
            if tokenizer is None and any(arg in text for text, _ in batch):
                die()  # tokenizer None: inside a worker process, not the parent
            return real_encode(batch, tokenizer)

        # Batches go to workers as a reference to gptkit.prepare._encode: make it this one.
        encode.__module__, encode.__qualname__ = "gptkit.prepare", "_encode"
        prepare._encode = encode
    elif kind == "step":
        real_step = train.Trainer.train_step

        def train_step(self):
            out = real_step(self)
            if self.step == n:
                die()
            return out

        train.Trainer.train_step = train_step
    elif kind == "log":
        real_log = metrics.MetricsLogger.log

        def log(self, step, values):
            if step == n and "train/loss" in values:
                f = self._file or self._open_jsonl()
                f.write(f'{{"step": {step}, "time": 17')
                f.flush()
                die()
            return real_log(self, step, values)

        metrics.MetricsLogger.log = log
    elif kind in ("weights", "full", "train_state"):
        # One save writes model.safetensors, then train_state/tensors.safetensors.
        target = "tensors.safetensors" if kind == "train_state" else "model.safetensors"
        real_save_file, hit = checkpoint.save_file, nth(n)

        def save_file(tensors, filename, metadata=None):
            if Path(filename).name != target or not hit():
                return real_save_file(tensors, filename, metadata=metadata)
            if kind == "full":  # what safetensors raises on a full disk (seen on a tmpfs)
                Path(filename).write_bytes(b"\0" * 64)  # what fit before the disk filled
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            real_save_file(tensors, filename, metadata=metadata)
            half_write(filename)
            die()

        checkpoint.save_file = save_file
    elif kind == "fsync":
        real_fsync_tree, hit = checkpoint.fsync_tree, nth(n)

        def fsync_tree(root):
            real_fsync_tree(root)
            if hit():
                die()

        checkpoint.fsync_tree = fsync_tree
    elif kind == "swap":
        real_replace, hit = os.replace, nth(n)

        def replace(src, dst, **kwargs):
            real_replace(src, dst, **kwargs)
            if Path(dst).name.startswith(".checkpoint.old-") and hit():
                die()

        atomic_dir.os.replace = replace  # atomic_dir.os is the os module: patched for all
    elif kind:
        sys.exit(f"fault_run.py: unknown fault {fault!r}")


if __name__ == "__main__":
    train.measure_peak_flops = lambda *args, **kwargs: 1e11
    install(os.environ.get("GPTKIT_FAULT", ""))
    sys.exit(main(sys.argv[1:]))
