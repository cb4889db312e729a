"""The serving engine: one thread that batches every running request into each decoding step.

HTTP handlers `submit` a `Sequence` and receive its text through the sequence's `emit`
callback; they never call the model. The engine thread loops:

1. admit waiting sequences while a row is free: a short prompt (at most `prefill_chunk`
   tokens) is prefilled at once into its row of a shared KV cache (kv_cache.py); a longer
   one gets the next `prefill_chunk` of its tokens fed in this iteration and the rest in the
   next ones (one long prompt at a time). A prompt whose last chunk is in samples its first
   token and joins the running rows;
2. run ONE forward pass for all running rows (each row one token), sample each row with its
   own settings, and hand out the new text;
3. retire rows that finished (EOS, a stop string, max_tokens, the time limit) or whose client
   went away, and free their slots at once.

This is continuous batching: a request joins the running batch at the next step instead of
waiting for the batch to drain. Rows keep their own lengths, so a new short prompt and an old
long conversation share a step; the cache's key mask hides each row's unused columns.

Chunked prefill (as in vLLM and llama.cpp's server): an 8,000-token prompt is fed a chunk per
iteration between decoding steps, so running streams keep getting tokens instead of freezing
for the whole prefill, and its activations stay a chunk's worth. When nothing runs or waits,
the cache is dropped and the freed pages go back to the system.

Many LoRA adapters (multi_lora.load_loras): each sequence names its `adapter`, and every forward
pass runs inside the model's `multi_lora.select` with each row's adapter (a prefill: its one
row), so requests for different adapters share a decoding step.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from . import resources
from .config import GPTConfig
from .generation import SampleConfig, Sampler, TextStream, eval_mode
from .generation.decode import reply_stream
from .generation.stopping import skippable
from .kv_cache import KVCache
from .loading import Pretrained
from .multi_lora import MultiLoRA


class EngineBusy(RuntimeError):
    """The waiting queue is full: the caller should answer 503 and let the client retry."""


@dataclass
class Sequence:
    """One completion to generate. `emit` is called from the engine thread with events:
    ("text", piece), then exactly one ("done", finish_reason) or ("error", message). With
    sample.logprobs set, each token's ("logprob", (token id, logprob, {id: logprob} of the top
    k)) comes before the text it makes."""

    prompt: list[int]
    sample: SampleConfig  # max_new_tokens is already capped by the context
    emit: Callable[[tuple[str, Any]], None]
    deadline: float = float("inf")  # time.monotonic() after which generation is cut
    # Special tokens the model generates are left out of the text (vLLM's skip_special_tokens);
    # one whose string a stop sequence names (an end-of-turn token) ends the reply.
    skip_special: bool = False
    cancelled: bool = False  # set by the HTTP side when the client disconnects
    generated: int = 0
    adapter: int = 0  # the model's LoRA adapter for this sequence (multi_lora.MultiLoRA); 0: none

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Filling:
    """A long prompt being prefilled, a chunk per iteration, into the cache's last row (the
    running rows stay below it: 0..n-1 with n < max_batch while it fills)."""

    seq: Sequence
    done: int = 0  # prompt tokens already in the cache


@dataclass
class _Slot:
    seq: Sequence
    text: TextStream
    token: int  # the last sampled token, fed in at the next step
    budget: int
    sampler: Sampler  # this row's sampling state (penalty counts, seeded generator)


@dataclass
class EngineStats:
    steps: int = 0  # batched decoding steps
    tokens: int = 0  # tokens generated (including each prefill's first token)
    prefills: int = 0
    prefill_chunks: int = 0  # forward passes over prompt tokens (a long prompt takes several)
    releases: int = 0  # times the idle engine gave its cache memory back
    cache_columns: int = 0  # the most positions per row the cache has held
    max_batch: int = 0  # the most rows one step has decoded together
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Owns the model; `submit` from any thread, `start` once, `close` at shutdown."""

    def __init__(
        self, lm: Pretrained, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 64
    ):
        self.lm, self.max_batch, self.prefill_chunk = lm, max_batch, prefill_chunk
        self.config: GPTConfig = lm.model.config
        self.loras: MultiLoRA | None = getattr(lm.model, "multi_lora", None)
        check_cache_memory(lm, max_batch)
        # A model may have more embedding rows than its tokenizer has tokens (vocabularies
        # padded for speed); those ids have no text, so they are never sampled.
        self.vocab_size = lm.tokenizer.vocab_size
        self.specials = skippable(lm.tokenizer)  # what skip_special leaves out of the text
        self.waiting: queue.Queue[Sequence] = queue.Queue(maxsize=max_queue)
        self.running: list[_Slot] = []
        self.stats = EngineStats()
        self._cache: KVCache | None = None  # allocated at the first request
        self._filling: _Filling | None = None
        self._initial_columns = min(self.context, 256)  # the cache's first size per row
        self._closing = threading.Event()
        self._cutoff = float("inf")  # set by drain: when every generation is cut short
        self._thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)

    @property
    def context(self) -> int:
        return self.lm.model.context  # a soft prompt's positions left out

    def start(self) -> Engine:
        """Start the engine thread; after `close`, start a fresh one (an app's lifespan can run
        more than once, e.g. under several test clients)."""
        if self._thread.is_alive():
            return self
        if self._thread.ident is not None:  # it ran and was closed
            self._closing.clear()
            self._cutoff = float("inf")
            self._thread = threading.Thread(target=self._loop, name="gptkit-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, seq: Sequence) -> None:
        loaded = len(self.loras.names) if self.loras is not None else 0
        if not 0 <= seq.adapter <= loaded:
            raise ValueError(f"adapter {seq.adapter} is not loaded (the model has {loaded})")
        if self._closing.is_set() or self._cutoff < float("inf"):
            raise EngineBusy("the server is shutting down")
        try:
            self.waiting.put_nowait(seq)
        except queue.Full:
            raise EngineBusy(
                f"the server is busy ({self.waiting.maxsize} requests waiting); retry later"
            ) from None

    def drain(self, seconds: float) -> None:
        """Begin a graceful shutdown (safe from any thread or a signal handler): refuse new
        sequences, and end every running or waiting one `seconds` from now at the latest, with
        finish_reason "length", so that its response still completes normally."""
        self._cutoff = min(self._cutoff, time.monotonic() + seconds)

    def close(self, timeout: float = 10.0) -> None:
        """Stop: every running or waiting sequence ends with an error event."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        with eval_mode(self.lm.model), torch.inference_mode():
            while not self._closing.is_set():
                try:
                    self._admit()
                    if self.running:
                        self._step()
                    elif self._filling is None and self._grown():
                        self._release()
                except Exception as e:  # a bug must fail its requests, not kill the server
                    for seq in self._active():
                        seq.emit(("error", f"generation failed: {e}"))
                    self.running.clear()
                    self._filling = None
        for seq in self._active():
            seq.emit(("error", "the server is shutting down"))
        while not self.waiting.empty():
            self.waiting.get_nowait().emit(("error", "the server is shutting down"))

    def _active(self) -> list[Sequence]:
        filling = [self._filling.seq] if self._filling is not None else []
        return [slot.seq for slot in self.running] + filling

    def _grown(self) -> bool:
        """The cache holds more positions than it starts with (a long sequence grew it)."""
        return self._cache is not None and self._cache.max_len > self._initial_columns

    def _release(self) -> None:
        """Nothing runs and the cache grew: drop it and hand the freed pages back, so one long
        prompt does not keep the process large for ever. A cache at its first size is kept:
        one request at a time then costs no reallocation."""
        self._cache = None
        resources.return_freed_pages()
        self.stats.releases += 1

    def _admit(self) -> None:
        """Admit waiting sequences into free rows (block briefly only when nothing runs), about
        prefill_chunk prompt tokens of short prompts per iteration, then feed the long prompt
        being filled, if any, its next chunk: the running rows decode between admissions."""
        budget = self.prefill_chunk
        while self._free_rows() > 0 and budget > 0:
            seq = self._next_waiting()
            if seq is None:
                break
            if len(seq.prompt) > self.prefill_chunk:
                self._filling = _Filling(seq)
                continue
            budget -= len(seq.prompt)
            self._try_prefill(_Filling(seq), len(self.running))  # short: one chunk
        if self._filling is not None:
            filling, self._filling = self._filling, None
            self._try_prefill(filling, self.max_batch - 1)

    def _try_prefill(self, filling: _Filling, row: int) -> None:
        """_prefill; if it fails, this request fails and the running ones go on."""
        try:
            self._prefill(filling, row)
        except Exception as e:
            if self.running and self.running[-1].seq is filling.seq:
                self.running.pop()
            filling.seq.emit(("error", f"generation failed: {e}"))

    def _free_rows(self) -> int:
        return self.max_batch - len(self.running) - (self._filling is not None)

    def _next_waiting(self) -> Sequence | None:
        """The next live waiting sequence; None when there is none, or when it is a long
        prompt and another one is being filled (it waits for its turn, in order)."""
        while True:
            if self._filling is not None:
                with self.waiting.mutex:  # peek: a long prompt stays first in line
                    head = self.waiting.queue[0] if self.waiting.queue else None
                if head is None or len(head.prompt) > self.prefill_chunk:
                    return None
            try:
                idle = not self.running and self._filling is None
                seq = self.waiting.get(timeout=0.05) if idle else self.waiting.get_nowait()
            except queue.Empty:
                return None
            if not seq.cancelled:
                return seq

    def _prefill(self, filling: _Filling, row: int) -> None:
        """Feed the next chunk of filling's prompt into cache row `row`; after its last chunk,
        move the row to the end of the running rows, sample the first token, and join them.
        A prompt with more to feed is put back as the one being filled."""
        seq, model = filling.seq, self.lm.model
        device = model.tok_emb.weight.device
        if seq.cancelled or (filling.done and time.monotonic() > min(seq.deadline, self._cutoff)):
            if not seq.cancelled:  # out of time between two chunks
                seq.emit(("done", "length"))
            return
        if self._cache is None:
            self._cache = model.new_cache(self.max_batch, self._initial_columns)
        if filling.done == 0:
            self._cache.clear(row)
        take = min(self.prefill_chunk, len(seq.prompt) - filling.done)
        self._reserve(filling.done + take)
        view = self._cache.rows(row, 1)  # continues after the chunks already in
        chunk = torch.tensor([seq.prompt[filling.done : filling.done + take]], device=device)
        with self._adapters([seq.adapter]):
            logits = model(chunk, cache=view, last_only=True)[:, -1].float()  # [1, V]
        filling.done += take
        self.stats.prefill_chunks += 1
        if filling.done < len(seq.prompt):
            self._filling = filling
            return
        r = len(self.running)
        if row != r:
            self._cache.move(row, r)
        s, tok = seq.sample, self.lm.tokenizer
        skip = self.specials if seq.skip_special else None
        slot = _Slot(
            seq=seq,
            text=reply_stream(s, tok.eos_id, tok.decode, skip),
            token=-1,
            budget=s.max_new_tokens,
            sampler=Sampler(s, [seq.prompt], self.config.vocab_size, self.vocab_size, device),
        )
        self.running.append(slot)
        self.stats.prefills += 1
        if slot.budget <= 0:
            self._finish(r, "length")
        else:
            self._take(r, logits)

    def _step(self) -> None:
        """One forward pass for every running row, then each row's next token."""
        device, n = self.lm.model.tok_emb.weight.device, len(self.running)
        self._reserve(max(self._cache.lengths[:n]) + 1)
        rows = self._cache.rows(0, n)  # each writes its token at its own column
        tokens = torch.tensor([[s.token] for s in self.running], device=device)  # [n, 1]
        with self._adapters([s.seq.adapter for s in self.running]):
            logits = self.lm.model(tokens, cache=rows, last_only=True)[:, -1].float()  # [n, V]
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, n)
        # Backwards, so that retiring row r (which moves the last row into it) leaves the
        # rows still to visit where they were.
        for r in reversed(range(n)):
            self._take(r, logits[r : r + 1])

    def _adapters(self, rows: list[int]) -> AbstractContextManager:
        """Each batch row's LoRA adapter for the forward pass inside (rows[i]: row i's)."""
        return self.loras.select(rows) if self.loras is not None else nullcontext()

    def _take(self, r: int, logits: torch.Tensor) -> None:
        """Sample row r's next token from its logits [1, V]; emit text; retire it if done."""
        slot = self.running[r]
        seq = slot.seq
        if seq.cancelled:
            self._finish(r, None)
            return
        ((token, logprob, top),) = slot.sampler.pick(logits).rows()
        slot.token, seq.generated = token, seq.generated + 1
        self.stats.tokens += 1
        if logprob is not None:
            seq.emit(("logprob", (token, logprob, top)))
        piece = slot.text.push(token)
        if piece:
            seq.emit(("text", piece))
        if slot.text.stopped:
            self._finish(r, "stop")
        elif seq.generated >= slot.budget or time.monotonic() > min(seq.deadline, self._cutoff):
            if piece := slot.text.flush():
                seq.emit(("text", piece))
            self._finish(r, "length")

    def _reserve(self, columns: int) -> None:
        self._cache.grow(columns, self.context)
        self.stats.cache_columns = max(self.stats.cache_columns, self._cache.max_len)

    def _finish(self, r: int, reason: str | None) -> None:
        """Retire row r (reason None: the client left) and move the last row into its place."""
        slot = self.running[r]
        if reason is not None:
            slot.seq.emit(("done", reason))
        reason = reason or "cancelled"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        last = len(self.running) - 1
        if r != last:
            self._cache.move(last, r)
            self.running[r] = self.running[last]
        self.running.pop()


def check_cache_memory(lm: Pretrained, max_batch: int) -> None:
    """Refuse a batch whose KV cache cannot fit: max_batch rows of the whole context, keys and
    values of every layer. The cache grows as sequences do, so without this check a server
    with --max-batch 100000 starts, then fails every request once the cache is large."""
    config, weight = lm.model.config, lm.model.tok_emb.weight
    per_row = resources.kv_cache_bytes(config, 1, config.block_size, weight.dtype)
    need = per_row * max_batch
    available = resources.available_bytes(weight.device)
    if os.environ.get(resources.SKIP_ENV) or available is None or need <= available:
        return
    raise resources.ResourceError(
        f"max_batch {max_batch} needs ~{resources.gb(need)} of KV cache ({max_batch} rows x "
        f"{config.block_size} positions x {resources.gb(per_row)} per row) but "
        f"{weight.device} has {resources.gb(available)} available; use --max-batch "
        f"{max(1, available // per_row)} or less (set {resources.SKIP_ENV}=1 to try anyway)"
    )
