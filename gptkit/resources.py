"""Memory guards: refuse a model that cannot fit before allocating it, with one clear line,
rather than being killed by the out-of-memory killer halfway through a load.

The estimate comes from the config alone: parameter and buffer counts are read off two
shape-only (meta-device) models of one and two layers, so it costs milliseconds and no memory
even for a config that claims a million layers (a hostile config.json or GGUF header).

    inference  weights + buffers in the load dtype (the KV cache and activations come on top)
    training   weights + gradients + AdamW's two moments, in the parameters' dtype (gptkit
               trains float32 parameters under autocast, so there is no separate fp32 master
               copy), + an activation allowance: 16 values per hidden unit per layer per token
               (the inputs kept for the backward pass: norm, qkv, attention output and
               projection inputs, MLP input, its 4x-wide hidden before and after the
               activation) + 2 per vocabulary entry per token (logits and their gradient), for
               one micro-batch. Attention scores are not counted: scaled_dot_product_attention
               does not keep them.

Set GPTKIT_NO_MEMORY_CHECK=1 to skip the check (say, with swap the estimate does not see).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, GPTConfig

SKIP_ENV = "GPTKIT_NO_MEMORY_CHECK"
ACTIVATION_VALUES_PER_LAYER = 16  # x n_embd, per token (see the module docstring)


class ResourceError(ConfigError):
    """The machine cannot hold what was asked for; the message says how much and what to do."""


@dataclass(frozen=True)
class Counts:
    """Elements of a model, without allocating it."""

    params: int  # tied weights once
    buffers: int  # RoPE tables, masks: not in checkpoints, but allocated all the same


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one model needs on one device for one purpose."""

    purpose: str  # "inference" or "training"
    device: torch.device
    dtype: torch.dtype
    weights: int
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def count(config: GPTConfig) -> Counts:
    """Parameters and buffer elements of GPT(config), exact, in O(1) of n_layer: every block
    has the same parameters, so a two-layer and a one-layer meta model differ by one block."""
    from .model import GPT

    def measure(n_layer: int) -> tuple[int, int]:
        with torch.device("meta"):
            model = GPT(dataclasses.replace(config, n_layer=n_layer))
        return model.num_params(), sum(b.numel() for b in model.buffers())

    (p1, b1), (p2, b2) = measure(1), measure(2)
    layers = config.n_layer - 1
    return Counts(params=p1 + layers * (p2 - p1), buffers=b1 + layers * (b2 - b1))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def inference_need(
    config: GPTConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MemoryNeed:
    c = count(config)
    return MemoryNeed(
        "inference", torch.device(device), dtype, (c.params + c.buffers) * _itemsize(dtype)
    )


def activation_bytes(config: GPTConfig, batch_size: int, dtype: torch.dtype) -> int:
    tokens = batch_size * config.block_size
    per_token = ACTIVATION_VALUES_PER_LAYER * config.n_layer * config.n_embd + 2 * config.vocab_size
    return tokens * per_token * _itemsize(dtype)


def training_need(
    config: GPTConfig,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    *,
    trainable: int | None = None,
    shards: int = 1,
    weights_allocated: bool = False,
    activation_dtype: torch.dtype = torch.float32,
) -> MemoryNeed:
    """What training `config` in float32 with AdamW needs on `device`.

    trainable: parameters that get gradients and moments (default: all; fewer under
    LoRA and other frozen-body methods). shards: FSDP ranks the weights, gradients and
    moments are split over. weights_allocated: the model is already built, so only what
    training adds is counted. activation_dtype: bfloat16 under autocast."""
    dtype = torch.float32
    size = _itemsize(dtype)
    c = count(config)
    trainable = c.params if trainable is None else trainable
    return MemoryNeed(
        "training",
        torch.device(device),
        dtype,
        weights=0 if weights_allocated else (c.params + c.buffers) * size // shards,
        gradients=trainable * size // shards,
        optimizer=2 * trainable * size // shards,
        activations=activation_bytes(config, batch_size, activation_dtype),
    )


def _cgroup_headroom() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), or None when there is none."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages only (ignores reclaimable cache: errs towards allowing)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can still be allocated on `device`, or None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None  # mps and others: no reliable figure, so no check
    found = [b for b in (_meminfo_available(), _cgroup_headroom()) if b is not None]
    return min(found) if found else None


def gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_fits(need: MemoryNeed, label: str, copies: int = 1) -> None:
    """Raise ResourceError when `copies` x `need` is more than `need.device` has available.

    copies: processes on this machine each holding `need` (CPU ranks under torchrun)."""
    if os.environ.get(SKIP_ENV):
        return
    available = available_bytes(need.device)
    total = need.total * copies
    if available is None or total <= available:
        return
    dtype = str(need.dtype).removeprefix("torch.")
    where = "this machine has" if need.device.type == "cpu" else f"{need.device} has"
    parts = [
        f"{name} {gb(value)}"
        for name, value in (
            ("weights", need.weights),
            ("gradients", need.gradients),
            ("AdamW moments", need.optimizer),
            ("activations", need.activations),
        )
        if value
    ]
    per = f" x {copies} processes" if copies > 1 else ""
    hint = "a smaller batch_size, " if need.purpose == "training" else ""
    raise ResourceError(
        f"{label} needs ~{gb(total)} for {need.purpose} in {dtype} ({', '.join(parts)}{per}) "
        f"but {where} {gb(available)} available; use a smaller model, {hint}or a machine "
        f"with more memory (set {SKIP_ENV}=1 to try anyway)"
    )


def check_inference(
    config: GPTConfig,
    label: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> None:
    """Refuse loading `config` for inference on `device` in `dtype` when it cannot fit."""
    check_fits(inference_need(config, device, dtype), label)
