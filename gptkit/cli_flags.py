"""Flags that several `gptkit` subcommands share, spelled and explained once."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .config import DTYPES, QUANTIZE_CHOICES

if TYPE_CHECKING:  # torch is imported where a command needs it, not to parse flags
    import torch


def allow_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled weights (pytorch_model.bin), weights-only; pickles can run code, "
        "so only for files you trust (better: convert them to safetensors)",
    )


def dtype_flag(p: argparse.ArgumentParser) -> None:
    """--dtype: what batch inference computes its matmuls in (precision.py)."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="bfloat16: matmuls in bfloat16 under autocast, for CPUs with AVX-512-BF16 or AMX "
        "(2-3x faster on a 2-core AMD EPYC with AVX-512-BF16; slower without them, and it "
        "warns); results move slightly",
    )


def checked_device(args: argparse.Namespace) -> torch.device:
    """--device resolved, with --dtype and --quantize checked against it: each a one-line
    error before any model loads."""
    from .loading import resolve_device
    from .precision import check

    device = resolve_device(args.device)
    check(args.dtype, device, args.quantize)
    return device


def quantize_flag(p: argparse.ArgumentParser, classifier: bool = False) -> None:
    """--quantize; a classifier's help says what int8 does to its probabilities."""
    effect = (
        "faster; probabilities move (see docs/RESULTS.md)"
        if classifier
        else "~1.5x faster generation, ~5%% more perplexity"
    )
    p.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help=f"int8 weights for the CPU: {effect}"
    )
