"""What a training run needs, worked out before it starts: its FLOPs per token (for MFU),
whether it computes under bf16 autocast, and whether it fits in memory (resources.py counts).
The Trainer (train.py) asks all three; preference.py's reference pass asks about autocast."""

from __future__ import annotations

import os

import torch

from . import resources
from .config import GPTConfig
from .distributed import world_size
from .model import GPT
from .train_config import TrainConfig


def flops_per_token(model: GPT, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6 per trained weight of a matmul (forward 2, backward 4:
    gradients of the input and of the weight), 4 per frozen one (no weight gradient), plus
    attention scores and values, 6 * 2 * n_layer * n_head * head_dim * T (Kaplan et al.; PaLM
    appendix B) at the batch's sequence length T (default: the context, as pretraining
    windows fill it; fine-tuning batches are often far shorter, and counting SmolLM2's 8192
    for them made MFU 4x too high). Embedding tables are lookups, except a token table tied
    to the LM head."""
    c: GPTConfig = model.config
    lookups = [] if model.head.weight is model.tok_emb.weight else [id(model.tok_emb.weight)]
    if c.positions == "learned":
        lookups.append(id(model.pos_emb.weight))
    weights = [p for p in model.parameters() if id(p) not in lookups]
    trained = sum(p.numel() for p in weights if p.requires_grad)
    frozen = sum(p.numel() for p in weights) - trained
    T = c.block_size if seq_len is None else seq_len
    return 6 * trained + 4 * frozen + 12 * c.n_layer * c.n_head * c.head_dim * T


def uses_autocast(config: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast by default on CUDA; on a CPU only when asked: it runs several times faster
    than fp32 on CPUs with AVX-512-BF16 or AMX and many times slower on the others
    (precision.py)."""
    return config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda")


def check_training_memory(
    model: GPTConfig,
    config: TrainConfig,
    device: torch.device,
    *,
    seq_len: int | None = None,
    rows_per_example: int = 1,
    trainable: int | None = None,
    weights_allocated: bool = False,
) -> None:
    """ResourceError unless training `model` as `config` says fits on `device` (see
    resources.py for what is counted). seq_len: the longest row a batch holds (None: the
    model's block_size, as pretraining windows are); rows_per_example: rows a batch holds per
    example (2 for a preference pair)."""
    shards = world_size() if config.fsdp else 1
    # CPU ranks on one machine share its memory; each GPU rank has a device of its own.
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = resources.training_need(
        model,
        device,
        config.batch_size * rows_per_example,
        seq_len=seq_len,
        trainable=trainable,
        shards=shards,
        weights_allocated=weights_allocated,
        activation_dtype=torch.bfloat16 if uses_autocast(config, device) else torch.float32,
    )
    label = config.init_from or str(config.model.get("preset") or "the configured model")
    resources.check_fits(need, label, copies)
