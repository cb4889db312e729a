"""Flags that several `gptkit` subcommands share, spelled and explained once."""

from __future__ import annotations

import argparse

from .config import QUANTIZE_CHOICES


def allow_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pickled weights (pytorch_model.bin), weights-only; pickles can run code, "
        "so only for files you trust (better: convert them to safetensors)",
    )


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
