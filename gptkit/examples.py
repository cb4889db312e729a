"""Task data -> model rows: each example is input ids and, per position, the target to learn
there (IGNORE where nothing is scored), so every objective trains through one loss. See
finetune.py for what each objective scores; predict.py reads the same rows back out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .chat_template import render
from .config import ConfigError
from .tokenizer import Tokenizer

IGNORE = -100


@dataclass
class Example:
    ids: list[int]  # model inputs
    # per input position: the id or label to predict there, or IGNORE (multi-field
    # classifiers: a list, one per field)
    targets: list[int] | list[list[int]]


# -- examples ------------------------------------------------------------------------------


def chat_example(
    tokenizer: Tokenizer, messages: list[dict[str, str]], template: str, block_size: int
) -> Example | None:
    """A conversation as one example scored on the assistant's turns; None when truncation
    to the context leaves no assistant token.

    Each assistant turn's text is found by rendering the conversation up to it twice, with
    the generation prompt and with the turn, so it works for any template that renders
    conversations incrementally (ChatML, Llama 3, SmolLM2, ...).
    """
    names = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    pieces: list[tuple[str, bool]] = []  # (text, scored), in order
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], template, add_generation_prompt=True, **names)
        after = render(messages[: i + 1], template, add_generation_prompt=False, **names)
        if not (before.startswith(done) and after.startswith(before)):
            raise ConfigError(
                "the chat template does not render conversations incrementally, so the "
                "assistant's tokens cannot be found; use template=chatml"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_scored in pieces:
        piece = tokenizer.encode(text)
        ids += piece
        scored += [is_scored] * len(piece)
    ids, scored = ids[: block_size + 1], scored[: block_size + 1]
    if not any(scored[1:]):
        return None
    targets = [t if s else IGNORE for t, s in zip(ids[1:], scored[1:], strict=True)]
    return Example(ids[:-1], targets)


def classification_example(
    tokenizer: Tokenizer, text: str, label: int | list[int], block_size: int
) -> Example:
    """The text (its start, if too long), then EOS; `label` is the target at the last token.
    A multi-field classifier's label is a list, one id per field (each within its field)."""
    end = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids = tokenizer.encode(text)[: block_size - len(end)] + end
    if not ids:
        raise ConfigError(f"the text {text!r} has no tokens to classify")
    nothing = IGNORE if isinstance(label, int) else [IGNORE] * len(label)
    return Example(ids, [nothing] * (len(ids) - 1) + [label])


def tagging_example(
    tokenizer: Tokenizer, words: Sequence[str], tags: Sequence[int], block_size: int
) -> Example:
    """Words joined by spaces; each tag is the target at its word's last sub-token. Words
    past the context are dropped (the example then has fewer targets than words)."""
    ids: list[int] = []
    targets: list[int] = []
    for i, (word, tag) in enumerate(zip(words, tags, strict=True)):
        piece = tokenizer.encode(word if i == 0 else " " + word)
        if len(ids) + len(piece) > block_size:
            break
        ids += piece
        targets += [IGNORE] * (len(piece) - 1) + [tag]
    return Example(ids, targets)


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate examples and cut the stream into rows of block_size (the last one shorter):
    no padding, at the price of attention across example boundaries (TRL's packing)."""
    ids = [t for e in examples for t in e.ids]
    targets = [t for e in examples for t in e.targets]
    return [
        Example(ids[i : i + block_size], targets[i : i + block_size])
        for i in range(0, len(ids), block_size)
        if any(t != IGNORE for t in targets[i : i + block_size])
    ]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs [B, T] and targets [B, T] ([B, T, F] for F label fields; IGNORE
    on padding). Causal attention keeps padding after a row's tokens from changing them, so
    no attention mask is needed."""
    T = max(len(e.ids) for e in examples)
    fields = torch.tensor(examples[0].targets[0]).shape  # () or (F,)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T, *fields), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        x[row, : len(e.ids)] = torch.tensor(e.ids)
        y[row, : len(e.targets)] = torch.tensor(e.targets)
    return x, y


class EpochOrder:
    """Which example sits at each place of a run's stream of examples: a seeded permutation
    per epoch, so a batch is a pure function of (seed, its place) and a resumed run draws
    exactly the batches an unbroken one would."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perm: tuple[int, np.ndarray] = (-1, np.empty(0))

    def rows(self, start: int, count: int) -> list[int]:
        """The indices of the examples at places start .. start + count - 1."""
        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            if self._perm[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = (epoch, rng.permutation(self.n))
            out.append(int(self._perm[1][pos]))
        return out


class _Split(Protocol):
    data: str
    val_data: str
    val_fraction: float
    seed: int


def split_val(
    train: list[Any], read: Callable[[str], list[Any]], config: _Split
) -> tuple[list[Any], list[Any]]:
    """(train, val) records: val_data's records when it is set, else a seeded val_fraction of
    the training records."""
    if config.val_data:
        return train, read(config.val_data)
    order = np.random.default_rng(config.seed).permutation(len(train))
    n_val = max(1, round(len(train) * config.val_fraction))
    if n_val >= len(train):
        raise ConfigError(f"{config.data}: too few examples to hold out a validation set")
    return [train[i] for i in order[n_val:]], [train[i] for i in order[:n_val]]
