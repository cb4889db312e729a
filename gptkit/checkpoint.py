"""The checkpoint directory format, and the only module that reads or writes it.

    checkpoint/
      config.json         {"format": 1, "gptkit_version": ..., "model": GPTConfig, ...extra}
      model.safetensors   weights (a tied LM head is stored once, as tok_emb.weight)
      tokenizer/          Tokenizer.save() output, when a tokenizer is given

Writes go to a hidden temporary directory beside the target, are fsynced, and are renamed into
place, so a crash mid-write never leaves a half checkpoint where a whole one was. Loading uses
safetensors only (no pickle) and checks every name and shape before touching the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import ConfigError, GPTConfig, PeftConfig
from .model import GPT
from .peft import apply_peft, peft_config
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit; the message names the file."""


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a gptkit checkpoint (or the backup a crashed save left)."""
    try:
        read_meta(path)
    except CheckpointError:
        return False
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Swap in the new directory. Between the two renames only the backup exists, and
    # load_checkpoint falls back to it, so there is no moment without a loadable checkpoint.
    if directory.exists():
        os.replace(directory, backup)
    os.replace(tmp, directory)
    shutil.rmtree(backup, ignore_errors=True)
    return directory


def resolve_checkpoint(directory: Path) -> Path:
    """`directory`, or the backup that a crash between save_checkpoint's renames left."""
    if directory.is_dir():
        return directory
    backups = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    if backups:  # a crash between the two renames of save_checkpoint
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
    except ValueError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); the checkpoint is damaged"
        ) from None
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


def check_tokenizer_fits(tokenizer: Tokenizer, config: GPTConfig) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary "
            f"has only {config.vocab_size}; use the tokenizer the model was trained with"
        )
