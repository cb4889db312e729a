"""Text generation on token ids: prefill, then decode one token at a time with a KV cache.

- `complete`: batched prompts of any lengths (left-padded), every sampling option of
  SampleConfig (see sampling.py), `num_return_sequences`, end tokens and stop strings (see
  stopping.py), a seed, log-probabilities; beam search when `num_beams > 1`.
- `generate`: the same, returning only the new token ids.
- `stream`: the same decoding for one prompt, yielding each token as it is chosen.

Greedy and beam results are token-identical to `transformers.generate` on the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..model import GPT, ContextLengthError
from .beam import beam_search
from .sampling import Picked, SampleConfig, Sampler
from .stopping import Decode, TextStream


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout), then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def context_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """How many tokens a prompt of `prompt_tokens` may get: the request, capped so every
    position fits the context. The one place this is computed; every entry point asks it."""
    if prompt_tokens > context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context}; "
            "shorten the prompt"
        )
    # The last generated token is never fed back, so it needs no position of its own.
    return min(max_new_tokens, context - prompt_tokens + 1)


def prompt_room(max_new_tokens: int, context: int) -> int:
    """The longest prompt that still leaves room for max_new_tokens (the inverse of
    context_budget): chat and evaluation cut history or prompts to it."""
    room = context - max_new_tokens + 1
    if room < 1:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context of "
            f"{context}; ask for fewer"
        )
    return room


def _budget(model: GPT, prompts: list[list[int]], max_new_tokens: int) -> int:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS/EOS token)")
    longest = max(len(p) for p in prompts)
    return context_budget(longest, max_new_tokens, model.context)


def new_sampler(model: GPT, prompts: list[list[int]], sample: SampleConfig, vocab_size=None):
    """A Sampler for these rows; vocab_size: the tokenizer's (see `complete`)."""
    device = model.tok_emb.weight.device
    return Sampler(sample, prompts, model.config.vocab_size, vocab_size, device)


@torch.inference_mode()
def decode_steps(
    model: GPT, prompts: list[list[int]], sampler: Sampler, max_new_tokens: int
) -> Iterator[Picked]:
    """Yield every prompt's next token (with log-probabilities when asked), once per step; no
    end-token handling here.

    Prompts of different lengths are left-padded; the cache is told each row's padding, so its
    key mask hides it and its position ids restart at 0 where each prompt begins: every row
    computes what it would alone.
    """
    device = model.tok_emb.weight.device
    max_new = _budget(model, prompts, max_new_tokens)
    if max_new <= 0:
        return
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    pad = [L - n for n in lengths]
    cache = model.new_cache(len(prompts), L + max_new - 1, pad=pad)
    idx = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, pad[i] :] = torch.tensor(p, device=device)

    with eval_mode(model):
        logits = model(idx, cache=cache, last_only=True)
        for step in range(max_new):
            picked = sampler.pick(logits[:, -1])
            yield picked
            if step == max_new - 1:
                return
            logits = model(picked.tokens[:, None], cache=cache, last_only=True)


@dataclass
class Completion:
    """One generated sequence."""

    ids: list[int] = field(default_factory=list)  # new token ids (an end token included)
    text: str = ""  # the reply (needs a decode function): cut at a stop string, no end token
    finish_reason: str = "length"  # "stop": an end token or stop string; "length": the budget
    logprobs: list[float] = field(default_factory=list)  # each token's, when asked
    top_logprobs: list[dict[int, float]] = field(default_factory=list)  # the k best, when asked

    def record(self, token: int, logprob: float | None, top: dict[int, float]) -> None:
        """Add one token (one of Picked.rows()); its log-probabilities when they were asked."""
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.top_logprobs.append(top)


def reply_stream(
    sample: SampleConfig,
    eos_id: int | None,
    decode: Decode | None,
    skip: dict[int, str] | None = None,
) -> TextStream:
    """The TextStream that ends a reply under these options (see stopping.py)."""
    if sample.stop and decode is None:
        raise ValueError("stop strings need a decode function to read the generated text")
    return TextStream(decode or (lambda ids: ""), sample.stop, _end_ids(sample, eos_id), skip)


def _end_ids(sample: SampleConfig, eos_id: int | None) -> set[int]:
    """The tokens that end a reply: EOS and sample.stop_ids."""
    return {*sample.stop_ids, *([] if eos_id is None else [eos_id])}


def complete(
    model: GPT,
    prompts: list[list[int]],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
    skip: dict[int, str] | None = None,
) -> list[Completion]:
    """`num_return_sequences` completions per prompt, prompt-major.

    A row ends at an end token (eos_id or sample.stop_ids; kept in `ids`, not in `text`) or
    once its text completes one of sample.stop (which needs `decode`). vocab_size: the
    tokenizer's, when the model's embedding has more rows (vocabularies padded for speed): ids
    past it have no text and are never chosen. skip: special tokens left out of the text.
    """
    if sample.num_beams > 1:
        return [
            _finished(Completion(), ids, reply_stream(sample, eos_id, decode, skip))
            for p in prompts
            for ids in _beams(model, p, sample, eos_id, decode, vocab_size)
        ]
    rows = [p for p in prompts for _ in range(sample.num_return_sequences)]
    out = [Completion() for _ in rows]
    streams = [reply_stream(sample, eos_id, decode, skip) for _ in rows]
    pieces: list[list[str]] = [[] for _ in rows]
    sampler = new_sampler(model, rows, sample, vocab_size)
    for picked in decode_steps(model, rows, sampler, sample.max_new_tokens):
        for i, (stream_, row) in enumerate(zip(streams, picked.rows(), strict=True)):
            if stream_.stopped:
                continue
            out[i].record(*row)
            pieces[i].append(stream_.push(row[0]))
            if stream_.stopped:
                out[i].finish_reason = "stop"
        if all(s.stopped for s in streams):
            break
    for c, stream_, row in zip(out, streams, pieces, strict=True):
        row.append(stream_.flush())
        c.text = "".join(row)
    return out


@torch.inference_mode()
def _beams(model, prompt, sample, eos_id, decode, vocab_size) -> list[list[int]]:
    """beam_search's token ids for one prompt (num_return_sequences of them)."""
    max_new = _budget(model, [prompt], sample.max_new_tokens)
    if max_new <= 0:
        return [[] for _ in range(sample.num_return_sequences)]
    if sample.stop and decode is None:
        raise ValueError("stop strings need a decode function to read the generated text")
    sampler = new_sampler(model, [prompt] * sample.num_beams, sample, vocab_size)
    with eval_mode(model):
        return beam_search(
            model, prompt, sample, max_new, sampler, _end_ids(sample, eos_id), decode
        )


def settle(c: Completion, picks: Iterator[Picked], text: TextStream) -> Completion:
    """c with one sequence's tokens (Picked, one row each) until `text` ends the reply, and
    its text and finish reason (speculative decoding's counterpart of complete's loop)."""
    pieces = []
    for picked in picks:
        (row,) = picked.rows()
        c.record(*row)
        pieces.append(text.push(row[0]))
        if text.stopped:
            c.finish_reason = "stop"
            break
    pieces.append(text.flush())
    c.text = "".join(pieces)
    return c


def _finished(c: Completion, ids: list[int], text: TextStream) -> Completion:
    """c with the token ids of a finished sequence, its text and finish reason."""
    pieces = []
    for t in ids:
        c.ids.append(t)
        pieces.append(text.push(t))
        if text.stopped:
            c.finish_reason = "stop"
            break
    pieces.append(text.flush())
    c.text = "".join(pieces)
    return c


def generate(
    model: GPT,
    prompts: list[list[int]],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, `num_return_sequences` rows per prompt (see `complete`)."""
    decode = decode if sample.stop else None  # no text is wanted, only where stops lie
    return [c.ids for c in complete(model, prompts, sample, eos_id, decode, vocab_size)]


def stream(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield one prompt's new tokens as they are chosen (sampling or greedy; not beams);
    the arguments as for `complete`."""
    if sample.num_beams > 1 or sample.num_return_sequences > 1:
        raise ValueError("streaming produces one sequence: use num_beams=1, num_return_sequences=1")
    text = reply_stream(sample, eos_id, decode)
    sampler = new_sampler(model, [prompt], sample, vocab_size)
    for picked in decode_steps(model, [prompt], sampler, sample.max_new_tokens):
        t = int(picked.tokens[0])
        yield t
        text.push(t)
        if text.stopped:
            return
