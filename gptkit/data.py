"""Token shards (written by `gptkit prepare`) -> training and validation windows.

A split's shards are memory-mapped and read as one token stream, so a corpus larger than RAM
costs only the windows a batch touches. Training batches are random windows, as nanoGPT takes
them, drawn from a generator seeded by (seed, step, micro-batch): the batch of a step is a pure
function of those, so a run resumed at step N reads exactly what the uninterrupted run would
have read, with no data cursor to save, and a distributed run reads the same micro-batches as
a single process however they are dealt to the ranks. Validation reads fixed, non-overlapping
windows in order, so every evaluation sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import first_line
from .safeload import read_json
from .shards import read_shard


class DataError(ValueError):
    """Token data that is missing or cannot serve the request; the message says which."""


class TokenData:
    """One split ("train" or "val") of a `gptkit prepare` output directory."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        try:
            self.meta = read_json(meta_path)  # size- and depth-bounded
        except FileNotFoundError:
            raise DataError(
                f"{meta_path} is missing: run `gptkit prepare` first, or let it finish"
            ) from None
        except ValueError as e:  # truncated or damaged; safeload's message names the file
            raise DataError(f"{first_line(e, 300)}; run `gptkit prepare` again") from None
        splits = self.meta.get("splits") if isinstance(self.meta, dict) else None
        if not isinstance(splits, dict):
            raise DataError(f"{meta_path} has no splits; is it damaged? run `gptkit prepare` again")
        if split not in splits:
            raise DataError(f"{meta_path} has no {split!r} split")
        self.split = split
        try:
            names = [str(n) for n in splits[split]["shards"]]
        except (KeyError, TypeError):
            raise DataError(f"{meta_path}: the {split!r} split lists no shards; damaged?") from None
        self.paths = [self.directory / n for n in names]
        for path in self.paths:
            if not path.is_file():
                raise DataError(
                    f"{path} is missing (listed in {meta_path}); run `gptkit prepare` again"
                )
        self.shards = [read_shard(path) for path in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # token offset of each
        self.n_tokens = int(self.starts[-1])
        # Token ids must fit the tokenizer the data was prepared with. Each batch is checked
        # (cheap: a max over a few windows), never the whole memmapped split up front: a shard
        # whose bytes were damaged would otherwise crash deep in the model's embedding lookup.
        tokenizer = self.meta.get("tokenizer")
        vocab = tokenizer.get("vocab_size") if isinstance(tokenizer, dict) else None
        self.vocab_size = vocab if isinstance(vocab, int) and vocab > 0 else None

    def __len__(self) -> int:
        return self.n_tokens

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, across shard boundaries if need be."""
        parts, end = [], start + length
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < end:
            shard, offset = self.shards[i], start - int(self.starts[i])
            take = min(end - start, len(shard) - offset)
            parts.append(shard[offset : offset + take])
            start, i = start + take, i + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _check(self, block_size: int) -> None:
        if self.n_tokens < block_size + 1:
            raise DataError(
                f"the {self.split} split of {self.directory} has {self.n_tokens} tokens, fewer "
                f"than one window of block_size + 1 = {block_size + 1}; use a smaller "
                "block_size or more data"
            )

    def _windows(self, starts, block_size: int) -> np.ndarray:
        # [B, T + 1]: inputs and their next-token targets, which the objective splits apart
        windows = np.stack([self.window(int(s), block_size + 1) for s in starts])
        if self.vocab_size is not None and windows.size and windows.max() >= self.vocab_size:
            self._bad_token(starts, windows)
        return windows

    def _bad_token(self, starts, windows: np.ndarray) -> None:
        """Raise a DataError naming the shard and position of the first out-of-range id."""
        row, col = (int(i[0]) for i in np.nonzero(windows >= self.vocab_size))
        position = int(starts[row]) + col  # in the split's token stream
        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        raise DataError(
            f"{self.paths[i]} holds token id {int(windows[row, col])} at token "
            f"{position - int(self.starts[i])}, but the tokenizer has only {self.vocab_size} "
            "ids: the shard is damaged (or from another tokenizer); run `gptkit prepare` again"
        )

    def random_windows(
        self, rng: np.random.Generator, batch_size: int, block_size: int
    ) -> np.ndarray:
        """batch_size random windows [batch_size, block_size + 1], drawn with `rng`."""
        self._check(block_size)
        starts = rng.integers(0, self.n_tokens - block_size, size=batch_size)
        return self._windows(starts, block_size)

    def eval_windows(
        self,
        batch_size: int,
        block_size: int,
        max_batches: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(batch index, windows [batch_size, block_size + 1]): non-overlapping windows from the
        start of the split, in order; at most max_batches (0: all). A partial last batch is
        dropped so every batch has the same shape. Under torchrun each rank takes every
        world_size-th batch, and all ranks take the same number (FSDP needs every rank in
        every forward)."""
        self._check(block_size)
        n_windows = (self.n_tokens - 1) // block_size
        n_batches = n_windows // batch_size
        if max_batches:  # at least one per rank: eval_batches=1 on 2 ranks scores 2
            n_batches = min(n_batches, max(max_batches, world_size))
        n_batches -= n_batches % world_size
        if n_batches == 0:
            raise DataError(
                f"the {self.split} split holds {n_windows} windows of {block_size} tokens, "
                f"fewer than {world_size} batch(es) of {batch_size}; lower the batch size or "
                "block_size"
            )
        for b in range(rank, n_batches, world_size):
            starts = (np.arange(batch_size) + b * batch_size) * block_size
            yield b, self._windows(starts, block_size)


def batch_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The generator of micro-batch `micro` of training step `step`: what it reads and how the
    objective corrupts it are a pure function of these three numbers, so a resumed run (and
    any split of the micro-batches over ranks) sees exactly the batches of an unbroken run."""
    return np.random.default_rng([seed, step, micro])
