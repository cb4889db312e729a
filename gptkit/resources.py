"""Memory guards: refuse a model that cannot fit before allocating it, with one clear line,
rather than being killed by the out-of-memory killer halfway through a load.

The estimate comes from the config alone: parameter and buffer counts are read off two
shape-only (meta-device) models of one and two layers, so it costs milliseconds and no memory
even for a config that claims a million layers (a hostile config.json or GGUF header).

    inference  weights + buffers in the load dtype, + what loading holds on the way (the
               largest tensor twice: as read and as converted) and a runtime allowance
               (kv_cache_bytes gives the KV cache a workload adds on top)
    training   weights + gradients + AdamW's two moments for the *trained* parameters only
               (LoRA and the other frozen-body methods train a few percent of them; gptkit
               trains float32 parameters under autocast, so there is no separate fp32 master
               copy) + the activations autograd keeps for one micro-batch + a fixed allowance
               for the runtime (autograd, allocator and kernel scratch, thread pools).

Activations are counted at the sequence length the run really batches (the longest example
after truncation for fine-tuning, block_size for pretraining windows), never at the model's
context alone: SmolLM2's 8192 positions would claim ~100 GB for a run that peaks under 2 GB.
Per token and layer autograd keeps 9 values per hidden unit (norm inputs, q/k/v, attention
output, residual branches; scaled_dot_product_attention keeps no T x T scores) plus 2 per MLP
unit (GELU/ReLU: the hidden before and after the activation) or 4 (SwiGLU: gate, up, their
activation and product), measured with saved_tensors_hooks; the head adds 2 values per output
(logits and their log-softmax or gradient). tests/test_memory_calibration.py holds these
estimates to within 0.7x-2x of real processes' peak memory.

Set GPTKIT_NO_MEMORY_CHECK=1 to skip the check (say, with swap the estimate does not see).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, GPTConfig

SKIP_ENV = "GPTKIT_NO_MEMORY_CHECK"
# Values autograd keeps per token and layer (see the module docstring): x n_embd, and x the
# MLP's width (GELU / ReLU, SwiGLU).
ACTIVATION_VALUES_PER_EMBD = 9
ACTIVATION_VALUES_PER_MLP_UNIT = {"swiglu": 4}
ACTIVATION_VALUES_PER_MLP_UNIT_DEFAULT = 2
# Calibrated (tests/test_memory_calibration.py): what a process grows by beyond its tensors:
# autograd and kernel scratch, allocator slack, the tokenizer, a model file's mapped pages.
TRAINING_RUNTIME_BYTES = 64 << 20
INFERENCE_RUNTIME_BYTES = 128 << 20


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
    runtime: int = 0  # autograd, allocator and kernel scratch: a calibrated constant
    weights_held: bool = False  # the weights are in memory already: only the rest is checked

    @property
    def total(self) -> int:
        """The whole footprint: what the process's memory grows by, weights included."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    @property
    def to_allocate(self) -> int:
        """What is still to be allocated, and must fit in the memory available now."""
        return self.total - (self.weights if self.weights_held else 0)


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


def largest_matrix(config: GPTConfig) -> int:
    """Elements of the model's largest weight matrix: the token table, the fused q/k/v
    projection, or the MLP's (fused) input projection."""
    C = config.n_embd
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim * C
    mlp = (2 if config.activation == "swiglu" else 1) * config.intermediate_size * C
    return max(config.vocab_size * C, qkv, mlp)


def inference_need(
    config: GPTConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MemoryNeed:
    """Loading `config` in `dtype`: its weights, plus what loading holds on the way (loaders
    convert one tensor at a time, so at worst the largest one twice: as read and as
    converted) and the runtime's own allowance."""
    c, size = count(config), _itemsize(dtype)
    return MemoryNeed(
        "inference",
        torch.device(device),
        dtype,
        weights=(c.params + c.buffers) * size,
        runtime=INFERENCE_RUNTIME_BYTES + 2 * largest_matrix(config) * size,
    )


def kv_cache_bytes(
    config: GPTConfig, rows: int, positions: int, dtype: torch.dtype = torch.float32
) -> int:
    """Keys and values of every layer for `rows` sequences of `positions` tokens (kv_cache.py)."""
    per_position = 2 * config.n_layer * config.n_kv_head * config.head_dim
    return rows * min(positions, config.block_size) * per_position * _itemsize(dtype)


def activation_values_per_token(config: GPTConfig) -> int:
    """Values autograd keeps per token of a training micro-batch (see the module docstring)."""
    mlp = ACTIVATION_VALUES_PER_MLP_UNIT.get(
        config.activation, ACTIVATION_VALUES_PER_MLP_UNIT_DEFAULT
    )
    per_layer = ACTIVATION_VALUES_PER_EMBD * config.n_embd + mlp * config.intermediate_size
    outputs = config.vocab_size if config.head == "lm" else len(config.labels)
    return config.n_layer * per_layer + 2 * outputs


def activation_bytes(
    config: GPTConfig, batch_size: int, dtype: torch.dtype, seq_len: int | None = None
) -> int:
    """Activations of one micro-batch of batch_size rows of seq_len tokens (default: the
    model's whole context, which is what pretraining windows are)."""
    tokens = batch_size * min(seq_len or config.block_size, config.block_size)
    return tokens * activation_values_per_token(config) * _itemsize(dtype)


def training_need(
    config: GPTConfig,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    *,
    seq_len: int | None = None,
    trainable: int | None = None,
    shards: int = 1,
    weights_allocated: bool = False,
    activation_dtype: torch.dtype = torch.float32,
) -> MemoryNeed:
    """What training `config` in float32 with AdamW needs on `device`.

    seq_len: the longest row a micro-batch will hold (fine-tuning: the longest example after
    truncation; default block_size). trainable: parameters that get gradients and moments
    (default: all; fewer under LoRA and other frozen-body methods, whose frozen weights get
    neither). shards: FSDP ranks the weights, gradients and moments are split over.
    weights_allocated: the model is already built, so only what training adds is checked.
    activation_dtype: bfloat16 under autocast."""
    dtype = torch.float32
    size = _itemsize(dtype)
    c = count(config)
    trainable = c.params if trainable is None else trainable
    return MemoryNeed(
        "training",
        torch.device(device),
        dtype,
        weights=(c.params + c.buffers) * size // shards,
        gradients=trainable * size // shards,
        optimizer=2 * trainable * size // shards,
        activations=activation_bytes(config, batch_size, activation_dtype, seq_len),
        runtime=TRAINING_RUNTIME_BYTES,
        weights_held=weights_allocated,
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
    total = need.to_allocate * copies
    if available is None or total <= available:
        return
    dtype = str(need.dtype).removeprefix("torch.")
    where = "this machine has" if need.device.type == "cpu" else f"{need.device} has"
    parts = [
        f"{name} {gb(value)}"
        for name, value in (
            ("weights", 0 if need.weights_held else need.weights),
            ("gradients", need.gradients),
            ("AdamW moments", need.optimizer),
            ("activations", need.activations),
            ("runtime", need.runtime),
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


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # no glibc (macOS, musl): nothing to ask
        return lambda: None
    return lambda: trim(0)


# glibc keeps the pages of freed blocks resident unless asked (malloc_trim(0)).
return_freed_pages = _malloc_trim()
