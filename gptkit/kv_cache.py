"""The KV cache: every layer's keys and values for a batch of sequences, each row filled to a
length of its own.

The cache owns the positions. Before a forward pass the model asks it where the new tokens go
(`positions`, and `key_mask` for the columns a row may not see); each layer writes its keys and
values through `update`; the last layer's write advances every row. Callers never move a
length by hand: they start rows with `pad`, drop tokens with `truncate`, and keep, copy or clear
rows with `reorder`, `move` and `clear`.

Its three users:
- decode.py: N prompts left-padded to one length. `pad` names each row's leading columns that
  hold padding, which the key mask hides and the position ids skip.
- beam search and speculative decoding: rows of one length; `reorder` keeps surviving beams,
  `truncate` forgets refused draft tokens.
- the serving engine: rows of different lengths decoding one token each per step (every row
  writes at its own column), one row prefilled through a view (`rows`), grown on demand.

Shapes: L = layers, B = rows, Hkv = key/value heads, M = columns (max_len), D = head_dim,
T = new tokens, S = the longest row after this pass.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values [L, B, Hkv, M, D]; writing each step into a fixed buffer
    (instead of concatenating) keeps decoding free of per-token reallocation."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        device=None,
        dtype=None,
        pad: list[int] | None = None,
    ):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Host-side bookkeeping (Python ints, so reading a length never waits on a device).
        # A view (`rows`) shares these lists with its parent and sees rows first..first+B-1.
        self._lengths = [0] * batch  # columns filled, per row
        self._pad = list(pad) if pad is not None else [0] * batch  # leading padding columns
        self._first = 0
        self._columns: torch.Tensor | None = None  # this pass's write columns [B], ragged rows

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def lengths(self) -> list[int]:
        """Columns filled in each row (a left-padded row counts its padding)."""
        return self._lengths[self._first : self._first + self.batch]

    @property
    def length(self) -> int:
        """The longest row: the next pass's queries start at this column."""
        return max(self.lengths)

    def _pads(self) -> list[int]:
        return self._pad[self._first : self._first + self.batch]

    def _ragged(self) -> bool:
        lengths = self.lengths
        return any(n != lengths[0] for n in lengths)

    def positions(self, T: int) -> torch.Tensor:
        """Position ids [B, T] of the next T tokens: each row counts from its first real token
        (a padding column is given position 0; the key mask hides it anyway)."""
        device = self.k.device
        if not self._ragged() and not any(self._pads()):
            start = self.lengths[0]
            return torch.arange(start, start + T, device=device).expand(self.batch, T)
        first = torch.tensor(
            [n - p for n, p in zip(self.lengths, self._pads(), strict=True)], device=device
        )
        return (first[:, None] + torch.arange(T, device=device)).clamp(min=0)

    def columns(self, T: int) -> torch.Tensor | None:
        """[B, T] the columns the next T tokens take in each row; None when every row has one
        length (they are then length..length+T-1 in all)."""
        if not self._ragged():
            return None
        return torch.tensor(self.lengths, device=self.k.device)[:, None] + torch.arange(
            T, device=self.k.device
        )

    def key_mask(self, T: int) -> torch.Tensor | None:
        """[B, S] bool, True where a row holds a real token once the next T are written; None
        when every row is whole (no padding, one length), the common case that needs no mask."""
        if not self._ragged() and not any(self._pads()):
            return None
        device = self.k.device
        columns = torch.arange(self.length + T, device=device)[None, :]  # [1, S]
        pad = torch.tensor(self._pads(), device=device)[:, None]
        end = torch.tensor(self.lengths, device=device)[:, None] + T
        return (columns >= pad) & (columns < end)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this layer's new keys and values k, v [B, Hkv, T, D] after each row's filled
        columns; return the layer's keys and values so far [B, Hkv, S, D]. The last layer's
        write completes the pass and advances every row by T."""
        T, lengths = k.shape[2], self.lengths
        start = min(lengths)
        end = max(lengths) + T
        if end > self.max_len:
            raise ValueError(f"{end} positions do not fit a cache of {self.max_len}")
        if start + T == end:  # min == max: every row has one length
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
        else:
            if T != 1:
                raise ValueError("rows of different lengths can only decode one token at a time")
            if self._columns is None:  # computed once per pass, at the first layer
                self._columns = torch.tensor(lengths, device=k.device)
            rows = torch.arange(self.batch, device=k.device)
            self.k[layer][rows, :, self._columns] = k[:, :, 0]  # [B, Hkv, D] at per-row columns
            self.v[layer][rows, :, self._columns] = v[:, :, 0]
        if layer == self.k.shape[0] - 1:
            self.advance(T)
            self._columns = None
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def next_column(self) -> tuple[int, int]:
        """(column, position id) of a single row's next token."""
        column = self._lengths[self._first]
        return column, column - self._pad[self._first]

    def advance(self, T: int) -> None:
        """Count T more columns filled in every row, by a pass that wrote its keys and values
        into k and v itself instead of through `update` (the native step, cpu_step.py)."""
        for r in range(self._first, self._first + self.batch):
            self._lengths[r] += T

    def truncate(self, length: int) -> None:
        """Forget every column from `length` on in every row (speculative decoding drops the keys
        of refused draft tokens). Nothing is cleared: the next `update` writes over them."""
        if not 0 <= length <= min(self.lengths):
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        for r in range(self._first, self._first + self.batch):
            self._lengths[r] = length

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows by index [B'] (beam search keeps the caches of the surviving beams). The
        result owns its rows: a view that is reordered no longer shares its parent's."""
        rows = index.tolist()
        lengths, pads = self.lengths, self._pads()
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self._lengths, self._pad = [lengths[i] for i in rows], [pads[i] for i in rows]
        self._first = 0

    def rows(self, first: int, n: int) -> KVCache:
        """Rows first..first+n-1 as a cache of their own that shares this one's memory and
        lengths: a pass through it fills those rows here. Valid until `grow`."""
        if first < 0 or first + n > self.batch:
            raise ValueError(f"rows {first}..{first + n - 1} of a {self.batch}-row cache")
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, first : first + n], self.v[:, first : first + n]
        view._lengths, view._pad, view._first = self._lengths, self._pad, self._first + first
        view._columns = None
        return view

    def clear(self, row: int) -> None:
        """Empty one row (a new sequence starts there)."""
        self._lengths[self._first + row], self._pad[self._first + row] = 0, 0

    def move(self, src: int, dst: int) -> None:
        """Copy row src (its filled columns and length) into row dst."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self._lengths[self._first + dst] = n
        self._pad[self._first + dst] = self._pad[self._first + src]

    def grow(self, columns: int, limit: int) -> None:
        """Hold at least `columns` positions per row, doubling up to `limit`: memory follows the
        longest sequence, not the context (8192 positions x 8 rows of SmolLM2 would hold 3 GB
        from the first request on). Views taken before are stale afterwards."""
        if columns <= self.max_len:
            return
        size = min(max(columns, 2 * self.max_len), limit)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], size, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
