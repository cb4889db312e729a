"""The checkpoint directory format, and the only module that reads or writes it.

    checkpoint/
      config.json         {"format": 1, "gptkit_version": ..., "model": GPTConfig, ...extra}
      model.safetensors   weights (a tied LM head is stored once, as tok_emb.weight)
      tokenizer/          Tokenizer.save() output, when a tokenizer is given

Writes go to a hidden temporary directory beside the target, are fsynced, and are renamed into
place, so a crash mid-write never leaves a half checkpoint where a whole one was (what a killed
save leaves beside it is removed by the next save that succeeds; a full disk is one clear
CheckpointWriteError). Loading uses safetensors only (no pickle) and checks every name and
shape before touching the model.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__, resources
from .config import ConfigError, GPTConfig, PeftConfig, first_line
from .convert import unpickling_problem
from .model import GPT
from .peft import apply_peft, peft_config
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"
TRAIN_STATE = "train_state/state.pt"  # a trainer's optimizer, step and RNG states


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous one is intact.
    Also an OSError, as the failed write it reports was before gptkit named it."""


class DamagedCheckpointError(CheckpointError):
    """config.json is there but unreadable: a damaged checkpoint, not a missing one."""


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a gptkit checkpoint (or the backup a crashed save left).

    A directory whose config.json exists but is damaged counts as one, so that loading it
    reports the damage (naming the file) instead of "no checkpoint here" (which would send a
    `--resume` user off to start the run over).
    """
    try:
        read_meta(path)
    except DamagedCheckpointError:
        return True
    except CheckpointError:
        return False
    return True


# Write failures that mean "no room left": a full disk, or a user's quota.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_error(directory: Path, error: BaseException) -> CheckpointWriteError | None:
    """A one-line CheckpointError for an I/O failure while writing `directory`, or None when
    `error` is not one (a bug must keep its traceback).

    safetensors (Rust) and torch.save (C++) do not raise OSError for a failed write. On a full
    disk safetensors says "I/O error: No space left on device (os error 28)", and torch.save
    only "[enforce fail at inline_container.cc:...] . unexpected pos 576 vs 534": so their
    errors are recognised by their text, and a full disk also by asking the disk itself.
    """
    text = first_line(error)
    if isinstance(error, OSError):
        full = error.errno in _FULL or "no space left" in text.lower()
    elif isinstance(error, (SafetensorError, RuntimeError)):
        lowered = text.lower()
        said_full = any(w in lowered for w in ("no space", "os error 28", "quota", "os error 122"))
        free = _free_bytes(directory.parent)
        full = said_full or free < 1 << 20
        io_words = (
            "i/o error",
            "ioerror",
            "os error",
            "write failed",
            "inline_container",
            "iostream",
        )
        if not full and not any(w in lowered for w in io_words):
            return None
        if full and not said_full:  # torch's message would only puzzle: say what is wrong
            text = f"{free:,} bytes free"
    else:
        return None
    kept = f"; {directory} still holds the previous checkpoint" if directory.is_dir() else ""
    if full:
        message = (
            f"cannot write checkpoint {directory}: the disk is full ({text}); free some space "
            f"or choose an out_dir on another disk, then run again (a training run: with "
            f"--resume){kept}"
        )
    else:
        message = (
            f"cannot write checkpoint {directory} ({text}); check that its disk has space and "
            f"the directory is writable, then run again (a training run: with --resume){kept}"
        )
    write_error = CheckpointWriteError(message)
    write_error.errno = errno.ENOSPC if full else getattr(error, "errno", None)
    return write_error


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _remove_stale(directory: Path) -> None:
    """Delete what earlier, killed saves of `directory` left beside it: temporary directories
    of dead processes and backups from between the two renames. Each is a whole copy of the
    weights, so a run killed during saves would otherwise fill the disk, and an old backup
    must not be mistaken for the latest checkpoint after a later crash."""
    for path in directory.parent.glob(f".{directory.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
    write_extra_files=None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write model (+ tokenizer, + extra config keys) to `directory`.

    write_extra_files(tmp_dir) may add files (e.g. a trainer's train_state/) inside the same
    atomic write. `state` replaces model.state_dict() (a trainer passes the full weights it
    gathered from FSDP shards; `model` then only supplies the config).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    backup = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous() for k, v in (state or model.state_dict()).items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = {
            "format": FORMAT,
            "gptkit_version": __version__,
            "model": model.config.to_dict(),
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
            "tokenizer": tokenizer.kind if tokenizer is not None else None,
            "peft": peft.to_dict() if (peft := peft_config(model)) else None,
            **(extra or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if write_extra_files is not None:
            write_extra_files(tmp)
        _fsync_tree(tmp)
    except BaseException as e:
        error = _write_error(directory, e)  # first: it may look at the free space left
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        if error is not None:  # a full disk is the user's to fix: one line, not a traceback
            raise error from None
        raise
    # Swap in the new directory. Between the two renames only the backup exists, and
    # load_checkpoint falls back to it, so there is no moment without a loadable checkpoint.
    if directory.exists():
        os.replace(directory, backup)
    os.replace(tmp, directory)
    shutil.rmtree(backup, ignore_errors=True)
    _remove_stale(directory)
    return directory


def resolve_checkpoint(directory: Path) -> Path:
    """`directory`, or the backup that a crash between save_checkpoint's renames left."""
    if directory.is_dir():
        return directory
    # A crash between the two renames of save_checkpoint. save_checkpoint removes stale
    # backups after each successful save, so there is normally one; if not, the newest.
    backups = sorted(
        directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime
    )
    if backups:
        return backups[-1]
    raise CheckpointError(f"no checkpoint at {directory} (directory not found)")


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(Path(directory)) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; is this a gptkit checkpoint directory?"
        ) from None
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8 (UnicodeDecodeError)
        first = first_line(e, 120)
        raise DamagedCheckpointError(
            f"{path} is not valid JSON ({first}); the file is damaged: restore the model "
            "directory from a good copy"
        ) from None
    except OSError as e:
        raise DamagedCheckpointError(f"{path} cannot be read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path} holds no JSON object; the file is damaged")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path} is not a gptkit checkpoint (format {meta.get('format')!r})")
    return meta


def check_state_dict(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, the config needs {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise CheckpointError(f"{source} does not match its config: {shown}")


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """(model in eval mode, tokenizer or None, config.json contents)."""
    directory = resolve_checkpoint(Path(directory))
    meta = read_meta(directory)
    try:
        config = GPTConfig.from_dict(meta["model"])
        peft = PeftConfig.from_dict(meta["peft"]) if meta.get("peft") else None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG}: bad model config: {e}") from None
    resources.check_inference(config, str(directory), device, dtype)  # before reading weights
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is damaged") from None
    model = GPT.empty(config, device=device, dtype=dtype)
    if peft is not None:  # the same adapter modules as the model that was saved
        apply_peft(model, peft, init=False)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=False)  # strictness checked above (tied head absent)
    model.eval()

    tokenizer = None
    if (directory / TOKENIZER).is_dir():
        try:
            tokenizer = load_tokenizer(directory / TOKENIZER)
        except TokenizerError as e:
            raise CheckpointError(f"{directory / TOKENIZER}: {e}") from None
        check_tokenizer_fits(tokenizer, config)
    return model, tokenizer, meta


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """The train_state/state.pt a trainer saved in checkpoint `directory` (or in the backup a
    crashed save left): {"step": int, "optimizer": state dict, "rng": [...], ...}.

    A missing, truncated or damaged file is a CheckpointError naming it, not whatever
    torch.load's zip reader or unpickler happens to raise deep inside.
    """
    path = resolve_checkpoint(Path(directory)) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint has weights but no optimizer state, "
            "so it cannot resume; start a new run with init_from pointing at it"
        )
    # torch.save writes a zip with a CRC-32 per record, but torch.load does not check them
    # (PyTorch builds miniz without CRC checks), so a flipped bit in a moment tensor would
    # load silently and the "exact" resume would not be. Resuming is rare: check them here.
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; its directory is at the end
        raise CheckpointError(
            f"{path} is truncated or not a torch.save file ({path.stat().st_size:,} bytes, no "
            "zip directory at its end): resume from an earlier copy, or start a new run with "
            "init_from pointing at the checkpoint"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # the first record whose CRC-32 does not match, or None
        problem = f"record {bad} fails its CRC-32 check" if bad is not None else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        problem = f"its zip structure is broken: {e}"
    if problem is not None:
        raise CheckpointError(
            f"{path} is damaged ({problem}): resume from an earlier copy, or start a new run "
            "with init_from pointing at the checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message would advise weights_only=False
        raise CheckpointError(
            f"{path}: refused to unpickle ({unpickling_problem(e)}); it holds more than the "
            "training state gptkit writes and may have been tampered with"
        ) from None
    # A damaged zip or pickle surfaces as any of RuntimeError, UnpicklingError, EOFError,
    # KeyError, struct.error, UnicodeDecodeError... depending on where the damage lies; all
    # mean the same thing here, and weights_only=True already refuses anything unsafe.
    except Exception as e:
        first = first_line(e, 160)
        raise CheckpointError(
            f"{path} cannot be read ({first}); the training state is damaged: resume from an "
            "earlier copy, or start a new run with init_from pointing at the checkpoint"
        ) from None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("step"), int)
        and isinstance(state.get("optimizer"), dict)
        and isinstance(state.get("rng"), list | tuple)
    ):
        raise CheckpointError(f"{path} is not a gptkit training state; the file is damaged")
    return state


def check_tokenizer_fits(tokenizer: Tokenizer, config: GPTConfig) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary "
            f"has only {config.vocab_size}; use the tokenizer the model was trained with"
        )
