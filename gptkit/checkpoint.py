"""The checkpoint directory format, and the only module that reads or writes it.

    checkpoint/
      config.json         {"format": 1, "gptkit_version": ..., "model": GPTConfig, ...extra}
      model.safetensors   weights (a tied LM head is stored once, as tok_emb.weight)
      tokenizer/          Tokenizer.save() output, when a tokenizer is given
      train_state/        a trainer's: state.json + tensors.safetensors (step, AdamW, RNG)
                          and manifest.json (sha256 of these two, config.json and weights)

Writes go to a hidden temporary directory beside the target, are fsynced, and are renamed into
place (atomic_dir.py), so a crash mid-write never leaves a half checkpoint where a whole one was
(what a killed save leaves beside it is removed by the next save that succeeds; a full disk is
one clear CheckpointWriteError). Loading uses safetensors only (no pickle) and checks every name and
shape before touching the model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import pickle
import shutil
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import resources
from .atomic_dir import fsync_tree, resolve_directory, staging_dir, swap_in
from .config import ConfigError, GPTConfig, first_line
from .convert import unpickling_problem
from .model import GPT
from .peft import apply_peft, peft_config
from .quantize import Int8Linear, quantized, quantized_skeleton
from .quantize import check as check_quantize
from .safeload import MetadataError, first_non_finite, read_json
from .tensorfile import TensorFile
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer_files import load_tokenizer
from .train_config import PeftConfig
from .train_state import join_tensors, split_tensors, train_state_problem

FORMAT = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"
# A trainer's optimizer, step and RNG states: the tensors in safetensors, the rest in JSON.
# No pickle anywhere. manifest.json holds the sha256 of every file a resume reads (safetensors
# has no checksum, and an edited step or a weights file from another save must not resume
# silently: it would train on from the wrong place, or into NaN).
TRAIN_STATE = "train_state"
TRAIN_TENSORS, TRAIN_JSON, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
MANIFEST_COVERS = (CONFIG, WEIGHTS, f"{TRAIN_STATE}/{TRAIN_JSON}", f"{TRAIN_STATE}/{TRAIN_TENSORS}")
LEGACY_TRAIN_STATE = "state.pt"  # gptkit before 2026-12 pickled it with torch.save


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

    safetensors (Rust) does not raise OSError for a failed write: on a full disk it says
    "I/O error: No space left on device (os error 28)". A full disk is also recognised by
    asking the disk itself, as a failed fsync or flush need not say why.
    """
    text = first_line(error)
    if isinstance(error, SafetensorError):
        if "i/o error" not in text.lower():
            return None
        said_full = any(f"os error {n})" in text for n in _FULL)
    elif isinstance(error, OSError):
        said_full = error.errno in _FULL
    else:
        return None
    full = said_full or _free_bytes(directory.parent) < 1 << 20
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


def save_checkpoint(
    directory: str | Path,
    model: GPT,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write model (+ tokenizer, + extra config keys) to `directory`.

    train_state: a trainer's state (step, optimizer state dict, RNG states; nested dicts and
    lists of tensors, numbers, strings), written to train_state/ in the same atomic write.
    `state` replaces model.state_dict() (a trainer passes the full weights it gathered from
    FSDP shards; `model` then only supplies the config).
    """
    directory = Path(directory)
    tmp = staging_dir(directory)
    try:
        state = {k: v.detach().contiguous() for k, v in (state or model.state_dict()).items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        peft = peft_config(model)
        # A whole quantized model (quantize.py); a fine-tune's int8 base is its PeftConfig's.
        mode = quantized(model) if peft is None or peft.quantize == "none" else None
        meta = {
            "format": FORMAT,
            "gptkit_version": version("gptkit"),
            "model": model.config.to_dict(),
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
            "tokenizer": tokenizer.kind if tokenizer is not None else None,
            "peft": peft.to_dict() if peft else None,
            **({"quantize": mode} if mode else {}),
            **(extra or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if train_state is not None:
            _write_train_state(tmp, train_state)
        fsync_tree(tmp)  # a full disk may only show here (delayed allocation)
    except BaseException as e:
        error = _write_error(directory, e)  # first: it may look at the free space left
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        if error is not None:  # a full disk is the user's to fix: one line, not a traceback
            raise error from None
        raise
    swap_in(tmp, directory)
    return directory


def resolve_checkpoint(directory: Path) -> Path:
    """`directory`, or the backup that a crash between save_checkpoint's renames left."""
    found = resolve_directory(directory)
    if found is None:
        raise CheckpointError(f"no checkpoint at {directory} (directory not found)")
    return found


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(Path(directory)) / CONFIG
    try:
        meta = read_json(path)  # size- and depth-bounded: see safeload.py
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing; is this a gptkit checkpoint directory?"
        ) from None
    except MetadataError as e:  # bad JSON, not UTF-8, a device, too big or too deep
        raise DamagedCheckpointError(
            f"{first_line(e, 300)}; the file is damaged: restore the checkpoint from a good copy"
        ) from None
    except OSError as e:
        raise DamagedCheckpointError(f"{path} cannot be read ({e.strerror})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path} holds no JSON object; the file is damaged")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path} is not a gptkit checkpoint (format {meta.get('format')!r})")
    return meta


def check_state_dict(model: GPT, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped tensor of a file
    whose tensors have `shapes` (TensorFile.shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:  # absent, or the int8 head's own (quantize.py)
        expected.pop("lm_head.weight", None)
    problems = [f"missing {k}" for k in expected if k not in shapes]
    problems += [f"unexpected {k}" for k in shapes if k not in expected]
    problems += [
        f"{k} has shape {shapes[k]}, the config needs {shape}"
        for k, shape in expected.items()
        if k in shapes and shapes[k] != shape
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
        if config.head != "lm" and "score_bias" not in meta["model"]:
            config.score_bias = True  # written before heads lost their bias: they had one
        peft = PeftConfig.from_dict(meta["peft"]) if meta.get("peft") else None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG}: bad model config: {e}") from None
    resources.check_inference(config, str(directory), device, dtype)  # before reading weights
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    model = GPT.skeleton(config)
    if peft is not None:  # the same adapter modules as the model that was saved
        apply_peft(model, peft, init=False)
    if (mode := meta.get("quantize")) is not None:  # int8 layers, filled by assign below
        try:
            quantized_skeleton(model, mode)
            check_quantize(mode, torch.device(device))
        except ConfigError as e:
            raise CheckpointError(f"{directory}: a quantized checkpoint: {e}") from None
    try:
        file = TensorFile(weights)
        shapes = file.shapes
        check_state_dict(model, shapes, str(weights))
        # int8 layers are read and packed one at a time, after the rest: reading all of their
        # tensors first would hold the int8 weights twice at the peak (packed and as read)
        int8 = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
        later = {f"{name}.{t}" for name in int8 for t in Int8Linear.TENSORS}
        state = file.read(k for k in shapes if k not in later)
        check_finite(state.items(), weights)
        model.assign(state, device, dtype)  # the loaded tensors themselves: no second copy
        for name, layer in int8.items():
            pair = file.read(f"{name}.{t}" for t in Int8Linear.TENSORS)
            check_finite(pair.items(), weights)
            layer.load_int8(*pair.values())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} cannot be read ({e}); the file is damaged") from None
    model.eval()

    tokenizer = None
    if (directory / TOKENIZER).is_dir():
        try:
            tokenizer = load_tokenizer(directory / TOKENIZER)
        except TokenizerError as e:
            raise CheckpointError(f"{directory / TOKENIZER}: {e}") from None
        check_tokenizer_fits(tokenizer, config)
    return model, tokenizer, meta


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str | Path) -> None:
    """CheckpointError when a weight holds NaN or infinity (a diverged run, or damage): such a
    model generates "" greedily and fails every sampled request, so it is refused at load."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(
            f"{source}: tensor {bad} holds NaN or infinite values; the weights are unusable "
            "(a diverged training run, or damage): use an earlier checkpoint"
        )


def _write_train_state(checkpoint_dir: Path, state: dict[str, Any]) -> None:
    """train_state/ inside `checkpoint_dir` (whose config and weights are written already),
    and the manifest of hashes over all four files a resume reads."""
    folder = checkpoint_dir / TRAIN_STATE
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(state, "state", tensors)
    folder.mkdir()
    save_file(tensors, str(folder / TRAIN_TENSORS))
    (folder / TRAIN_JSON).write_text(json.dumps({"state": skeleton}) + "\n")
    digests = {name: _sha256(checkpoint_dir / name) for name in MANIFEST_COVERS}
    manifest = {"format": 1, "sha256": digests}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_DAMAGED = (
    "the training state is damaged or was changed: resume from an untouched copy, or start a "
    "new run with init_from pointing at the checkpoint"
)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    """The training state a trainer saved in checkpoint `directory` (or in the backup a
    crashed save left): {"step": int, "optimizer": state dict, "rng": [...]}.

    Every file a resume reads (config.json, model.safetensors, train_state's JSON and tensors)
    must match the sha256 in train_state/manifest.json, and every field must have its type and
    range; anything else is one CheckpointError naming the file. A pickled state.pt from an
    older gptkit is read only with --allow-pickle.
    """
    checkpoint_dir = resolve_checkpoint(Path(directory))
    folder = checkpoint_dir / TRAIN_STATE
    if (folder / LEGACY_TRAIN_STATE).is_file() and not (folder / TRAIN_JSON).exists():
        state = _load_legacy_train_state(folder / LEGACY_TRAIN_STATE)
        _check_step_agrees(state, checkpoint_dir, folder / LEGACY_TRAIN_STATE)
        return state
    meta_path, tensors_path = folder / TRAIN_JSON, folder / TRAIN_TENSORS
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the checkpoint has weights but no optimizer state, "
                "so it cannot resume; start a new run with init_from pointing at it"
            )
    manifest = folder / MANIFEST
    if manifest.exists():
        _check_manifest(checkpoint_dir, manifest)
    try:
        meta = read_json(meta_path)
    except MetadataError as e:  # its message names the file
        raise CheckpointError(f"{first_line(e, 200)}; {_DAMAGED}") from None
    skeleton = meta.get("state") if isinstance(meta, dict) else None
    if skeleton is None:
        raise CheckpointError(f"{meta_path} has no 'state' entry; {_DAMAGED}")
    if not manifest.exists():
        # The format of 2026-12-01 kept only the tensors' sha256, in state.json; without
        # that either, the manifest was removed.
        if not isinstance(meta.get("sha256"), str):
            raise CheckpointError(f"{manifest} is missing; {_DAMAGED}")
        if _sha256(tensors_path) != meta["sha256"]:
            raise CheckpointError(
                f"{tensors_path} does not match its sha256 in {TRAIN_JSON}; {_DAMAGED}"
            )
    try:
        state = join_tensors(skeleton, load_file(str(tensors_path)))
    except (SafetensorError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{folder} cannot be read ({first_line(e, 120)}); {_DAMAGED}"
        ) from None
    _check_train_state(state, meta_path)
    _check_step_agrees(state, checkpoint_dir, meta_path)
    return state


def _check_manifest(checkpoint_dir: Path, manifest: Path) -> None:
    """CheckpointError unless each file the manifest covers has the sha256 it records."""
    try:
        data = read_json(manifest)
    except MetadataError as e:
        raise CheckpointError(f"{first_line(e, 200)}; {_DAMAGED}") from None
    digests = data.get("sha256") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("format") != 1
        or not isinstance(digests, dict)
        or sorted(digests) != sorted(MANIFEST_COVERS)
        or not all(isinstance(d, str) for d in digests.values())
    ):
        raise CheckpointError(f"{manifest} is not a gptkit training-state manifest; {_DAMAGED}")
    for name in MANIFEST_COVERS:  # our own list of names: the manifest cannot point elsewhere
        path = checkpoint_dir / name
        try:
            digest = _sha256(path)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read ({e.strerror}); {_DAMAGED}") from None
        if digest != digests[name]:
            raise CheckpointError(
                f"{path} does not match the sha256 recorded in {manifest} (edited, damaged, "
                f"or from another save); {_DAMAGED}"
            )


def _check_step_agrees(state: dict[str, Any], checkpoint_dir: Path, path: Path) -> None:
    """The step of the training state is the one config.json records for the weights."""
    train = read_meta(checkpoint_dir).get("train")
    recorded = train.get("step") if isinstance(train, dict) else state["step"]
    if recorded != state["step"] or type(recorded) is not int:
        raise CheckpointError(
            f"{path} is at step {state['step']} but {checkpoint_dir / CONFIG} records step "
            f"{recorded!r} for the weights; {_DAMAGED}"
        )


def _load_legacy_train_state(path: Path) -> dict[str, Any]:
    from .convert import pickle_allowed

    if not pickle_allowed(None):
        raise CheckpointError(
            f"{path} is a pickled training state from an older gptkit, which can run code when "
            "loaded; pass --allow-pickle to read it (weights-only) if you trust it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message would advise weights_only=False
        raise CheckpointError(
            f"{path}: refused to unpickle ({unpickling_problem(e)}); it holds more than the "
            "training state gptkit writes and may have been tampered with"
        ) from None
    except Exception as e:  # damage surfaces as any of a dozen zip and unpickling errors
        raise CheckpointError(
            f"{path} cannot be read ({first_line(e, 160)}); it is damaged"
        ) from None
    _check_train_state(state, path)
    return state


def _check_train_state(state: Any, path: Path) -> None:
    problem = train_state_problem(state)
    if problem is not None:
        raise CheckpointError(f"{path} is not a valid gptkit training state: {problem}; {_DAMAGED}")


def check_train_state_fits(state: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """CheckpointError unless the optimizer state is for `model`'s trainable parameters:
    the same names in the groups, and moments of their shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grouped = [n for g in state["optimizer"]["param_groups"] for n in g["params"]]
    if sorted(map(str, grouped)) != sorted(params):
        raise CheckpointError(
            f"{source}: the optimizer state is for other parameters than this model trains; "
            f"{_DAMAGED}"
        )
    for name, entry in state["optimizer"]["state"].items():
        if name not in params or entry["exp_avg"].shape != params[name].shape:
            raise CheckpointError(
                f"{source}: the optimizer moments of {name} do not fit the model; {_DAMAGED}"
            )


def check_tokenizer_fits(tokenizer: Tokenizer, config: GPTConfig) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokenizer.vocab_size} token ids but the model's vocabulary "
            f"has only {config.vocab_size}; use the tokenizer the model was trained with"
        )
