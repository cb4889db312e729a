"""Text generation on token ids: prefill, then decode one token at a time with a KV cache.

- `generate`: batched prompts of any lengths (left-padded), greedy / temperature / top-k /
  top-p / repetition penalty, `num_return_sequences`, EOS and stop strings, a seed; beam search
  when `num_beams > 1`.
- `stream`: the same decoding for one prompt, yielding each token as it is chosen.

The samplers follow Hugging Face's definitions (repetition penalty, then temperature, top-k,
top-p), and beam search follows transformers' scoring (2 * num_beams candidates per step,
hypotheses finish on EOS or at max length with score / generated_len ** length_penalty), so
greedy and beam results are token-identical to `transformers.generate` on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .config import SampleConfig
from .model import GPT, ContextLengthError

Decode = Callable[[list[int]], str]


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float):
    """CTRL's penalty as HF applies it: seen tokens' scores shrink toward "less likely".

    scores [N, V] float; seen [N, V] bool (token already in the prompt or the output).
    """
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus. logits [N, V]."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p  # the low tail holding at most 1 - top_p of the mass
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def pick_next(logits, seen, sample: SampleConfig, generator) -> torch.Tensor:
    """Choose the next token [N] from logits [N, V] (float32)."""
    if sample.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sample.repetition_penalty)
    if sample.greedy:
        return logits.argmax(dim=-1)
    # Shift the best logit to 0 before scaling: with a tiny temperature (or a tiny repetition
    # penalty) the scaled logits would overflow to inf, and softmax of inf - inf is NaN. The
    # shift changes no probability; after it every scaled logit is <= 0 and the best one is 0.
    big = torch.finfo(logits.dtype).max
    logits = logits.clamp(max=big)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    temperature = max(sample.temperature, torch.finfo(logits.dtype).tiny)
    logits = filter_logits(logits / temperature, sample.top_k, sample.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout), then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _budget(model: GPT, prompts: list[list[int]], max_new_tokens: int) -> int:
    """How many tokens we may generate: requested, capped so every position fits the context."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS/EOS token)")
    longest, context = max(len(p) for p in prompts), model.config.block_size
    if longest > context:
        raise ContextLengthError(
            f"the prompt has {longest} tokens but the model's context is {context}; "
            "shorten the prompt"
        )
    # The last generated token is never fed back, so it needs no position of its own.
    return min(max_new_tokens, context - longest + 1)


def _seen_mask(rows: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        seen[i, torch.tensor(row, device=device)] = True
    return seen


def _usable(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """logits [N, V] with the ids at or past vocab_size masked out."""
    if vocab_size is None or vocab_size >= logits.size(-1):
        return logits
    logits = logits.clone()  # it may be a view of the model's output, or an expanded one
    logits[:, vocab_size:] = float("-inf")
    return logits


@torch.inference_mode()
def decode_steps(
    model: GPT, prompts: list[list[int]], sample: SampleConfig, vocab_size: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, [N], once per step (no EOS handling here).
    Ids at or past vocab_size are never chosen (see `generate`).

    Prompts of different lengths are left-padded: a key mask hides the padding and position ids
    restart at 0 where each prompt begins, so every row computes what it would alone.
    """
    device = model.tok_emb.weight.device
    max_new = _budget(model, prompts, sample.max_new_tokens)
    if max_new <= 0:
        return
    N, lengths = len(prompts), torch.tensor([len(p) for p in prompts], device=device)
    L = int(lengths.max())
    pad = L - lengths  # [N]
    cache = model.new_cache(N, L + max_new - 1)
    idx = torch.zeros(N, L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, L - len(p) :] = torch.tensor(p, device=device)
    key_mask = None
    if bool(pad.any()):
        key_mask = torch.arange(cache.max_len, device=device)[None, :] >= pad[:, None]  # [N, S]
    positions = (torch.arange(L, device=device)[None, :] - pad[:, None]).clamp(min=0)  # [N, L]
    seen = None
    if sample.repetition_penalty != 1.0:
        seen = _seen_mask(prompts, model.config.vocab_size, device)
    generator = None
    if sample.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sample.seed)

    with eval_mode(model):
        logits = model(idx, cache=cache, positions=positions, key_mask=key_mask, last_only=True)
        for step in range(max_new):
            token = pick_next(_usable(logits[:, -1].float(), vocab_size), seen, sample, generator)
            yield token
            if step == max_new - 1:
                return
            if seen is not None:
                seen[torch.arange(N, device=device), token] = True
            positions = (lengths + step)[:, None]  # [N, 1]
            logits = model(
                token[:, None], cache=cache, positions=positions, key_mask=key_mask, last_only=True
            )


def _stop_check(sample: SampleConfig, decode: Decode | None) -> Callable[[list[int]], bool]:
    """A function telling whether a row's new tokens just completed one of sample.stop.

    Checked after every token, so a stop string can only be completed by the newest token and
    lies within the last few: a character is at most 4 bytes and a byte-level token at least
    one, so the last 4 * len(stop) + 1 tokens hold it. Decoding only that tail keeps the check
    constant-time per token instead of re-decoding the whole output.
    """
    if not sample.stop:
        return lambda ids: False
    if decode is None:
        raise ValueError("stop strings need a decode function to read the generated text")
    window = 4 * max(len(s) for s in sample.stop) + 1
    return lambda ids: any(s in decode(ids[-window:]) for s in sample.stop)


def generate(
    model: GPT,
    prompts: list[list[int]],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, `num_return_sequences` rows per prompt, prompt-major.

    A row ends at EOS (included in its output) or once its decoded text contains one of
    sample.stop (which needs `decode`); the caller trims the text at the stop string.
    vocab_size: the tokenizer's, when the model's embedding has more rows (vocabularies
    padded for speed): ids past it have no text and are never chosen.
    """
    hits_stop = _stop_check(sample, decode)
    if sample.num_beams > 1:
        return [
            ids
            for p in prompts
            for ids in beam_search(model, p, sample, eos_id, decode, vocab_size)
        ]
    rows = [p for p in prompts for _ in range(sample.num_return_sequences)]
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for tokens in decode_steps(model, rows, sample, vocab_size):
        for i, t in enumerate(tokens.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            done[i] = t == eos_id or hits_stop(out[i])
        if all(done):
            break
    return out


def stream(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
) -> Iterator[int]:
    """Yield one prompt's new tokens as they are chosen (sampling or greedy; not beams);
    vocab_size as for `generate`."""
    if sample.num_beams > 1 or sample.num_return_sequences > 1:
        raise ValueError("streaming produces one sequence: use num_beams=1, num_return_sequences=1")
    hits_stop = _stop_check(sample, decode)
    out: list[int] = []
    for tokens in decode_steps(model, [prompt], sample, vocab_size):
        t = int(tokens[0])
        out.append(t)
        yield t
        if t == eos_id or hits_stop(out):
            return


@torch.inference_mode()
def beam_search(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """The `num_return_sequences` best beams for one prompt, best first (HF's scoring);
    vocab_size as for `generate`."""
    max_new = _budget(model, [prompt], sample.max_new_tokens)
    if max_new <= 0:
        return [[] for _ in range(sample.num_return_sequences)]
    with eval_mode(model):
        return _beam_search(model, prompt, sample, max_new, eos_id, decode, vocab_size)


def _beam_search(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    max_new: int,
    eos_id: int | None,
    decode: Decode | None,
    vocab_size: int | None,
) -> list[list[int]]:
    nb, device = sample.num_beams, model.tok_emb.weight.device
    hits_stop = _stop_check(sample, decode)
    cache = model.new_cache(1, len(prompt) + max_new - 1)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    cache.reorder(torch.zeros(nb, dtype=torch.long, device=device))  # nb copies of the prefill
    logits = logits.expand(nb, -1, -1)
    beams: list[list[int]] = [[] for _ in range(nb)]
    # Only beam 0 is live at first, so the first step picks nb distinct tokens.
    scores = torch.full((nb,), -1e9, device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []  # (length-normalised score, tokens)
    seen = None
    if sample.repetition_penalty != 1.0:
        seen = _seen_mask([prompt] * nb, model.config.vocab_size, device)

    for step in range(max_new):
        gen_len = step + 1
        logprobs = _usable(logits[:, -1].float(), vocab_size).log_softmax(dim=-1)  # [nb, V]
        if seen is not None:
            logprobs = apply_repetition_penalty(logprobs, seen, sample.repetition_penalty)
        V = logprobs.size(-1)
        total = (logprobs + scores[:, None]).view(-1)  # [nb * V]
        top_scores, top_idx = torch.topk(total, 2 * nb)
        next_beams, next_scores, parents = [], [], []
        for rank, (score, flat) in enumerate(
            zip(top_scores.tolist(), top_idx.tolist(), strict=True)
        ):
            parent, token = divmod(flat, V)
            seq = beams[parent] + [token]
            ends = token == eos_id or gen_len == max_new or hits_stop(seq)
            if ends:
                if rank < nb:  # only the top nb candidates may become hypotheses
                    finished.append((score / gen_len**sample.length_penalty, seq))
            elif len(next_beams) < nb:
                next_beams.append(seq)
                next_scores.append(score)
                parents.append(parent)
        finished = sorted(finished, key=lambda h: -h[0])[:nb]
        if len(next_beams) < nb or gen_len == max_new:
            break
        # transformers' default early stop: once nb hypotheses exist, stop when the best
        # running beam, normalised at the current length, cannot beat the worst of them.
        best_running = next_scores[0] / gen_len**sample.length_penalty
        if len(finished) == nb and best_running <= finished[-1][0]:
            break
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        index = torch.tensor(parents, device=device)
        cache.reorder(index)
        token = torch.tensor([b[-1] for b in beams], device=device)
        if seen is not None:
            seen = seen[index]
            seen[torch.arange(nb, device=device), token] = True
        positions = torch.full((nb, 1), len(prompt) + step, device=device)
        logits = model(token[:, None], cache=cache, positions=positions, last_only=True)
    return [seq for _, seq in finished[: sample.num_return_sequences]]
