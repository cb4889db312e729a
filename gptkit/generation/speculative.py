"""Speculative decoding: exactly the tokens of plain decoding, from fewer passes of the model.

A cheap drafter guesses the next k tokens; the model checks them all in ONE forward pass (the
newest token plus the k guesses, through its KV cache), keeps the guesses it agrees with up to
the first it does not, and adds one token of its own. A pass so yields between 1 and k + 1
tokens. Decoding one sequence is mostly bound by reading the weights, so a pass over k + 1
tokens can cost little more than a pass over one, and then every accepted guess is nearly free.
(Not everywhere: on the 2-core AMD EPYC of docs/GENERATION.md a pass over 4 tokens costs
1.1-1.4 passes over one, but 5 cost 1.5-2 and 9 about 2.5, so k = 3 pays and k >= 4 loses.)

Two drafters:
- `PromptLookup` copies from the text so far (prompt lookup decoding, Saxena 2023): it finds
  the latest earlier occurrence of the last few tokens and proposes what followed it. No
  second model; it pays where a reply quotes its prompt: summaries, RAG answers, code edits.
- `DraftModel`: a small model that shares the tokenizer proposes k tokens, with its own cache.

What is accepted keeps the output exactly that of plain decoding (decode.py):
- greedy: a guess is kept while it is the argmax of the processed logits, so the tokens are
  those of `decode.generate` (up to the rounding of a several-token pass, which could only
  matter where two logits tie to the last bit);
- sampling: the rejection scheme of Leviathan et al. 2023 and Chen et al. 2023. A guess x drawn
  from the drafter's q is kept with probability min(1, p(x) / q(x)); at the first refusal the
  token is drawn from normalize(max(p - q, 0)) instead, so every token is distributed as p,
  the Sampler's distribution with every option of SampleConfig. Prompt lookup's q is a point
  mass on its guess. The random draws are not plain sampling's, so a seed gives another (as
  likely) text than it gives without speculation.

The penalties depend on the tokens so far, so p at a guessed position is computed with the
Sampler in the state after the tokens accepted before it, as one token per step would have.

One sequence at a time (batch size 1); api.LM decodes several prompts one after another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..model import GPT
from .decode import Completion, _budget, eval_mode, new_sampler, reply_stream, settle
from .sampling import Picked, SampleConfig, Sampler
from .stopping import Decode

MAX_NGRAM = 3  # prompt lookup matches the last 3 tokens, else 2, else 1


@dataclass
class Draft:
    """A drafter's guesses and, for a draft model that samples, the distributions they were
    drawn from."""

    tokens: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # [k, V]; None: each guess is certain (a point mass)


class Drafter(Protocol):
    def propose(self, ids: list[int], k: int, sampler: Sampler) -> Draft:
        """Up to k guesses of the tokens after ids (the prompt and the output so far);
        sampler: the model's, in its state after ids (a drafter may fork it, not change it)."""
        ...


class PromptLookup:
    """Guesses by copying: the latest earlier occurrence of the last n tokens (n from
    max_ngram down to 1), and the k tokens that followed it.

    The n-grams are indexed as the sequence grows (it only ever grows), so a guess costs a
    dictionary look-up, not a scan of the prompt.
    """

    def __init__(self, max_ngram: int = MAX_NGRAM):
        # n -> {n-gram: where its latest occurrence that some token follows starts}
        self.starts: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(1, max_ngram + 1)
        }
        self.indexed = 0  # the length of the sequence indexed so far

    def propose(self, ids: list[int], k: int, sampler: Sampler) -> Draft:
        self._index(ids)
        for n in sorted(self.starts, reverse=True):
            start = self.starts[n].get(tuple(ids[-n:])) if n < len(ids) else None
            if start is not None:
                return Draft(copy_on(ids, start + n, k))
        return Draft()

    def _index(self, ids: list[int]) -> None:
        # An n-gram starting at s has a token after it when s + n < len(ids); the tail itself
        # (s = len(ids) - n) does not, so it is never its own match.
        for n, starts in self.starts.items():
            for s in range(max(self.indexed - n, 0), len(ids) - n):
                starts[tuple(ids[s : s + n])] = s
        self.indexed = len(ids)


def copy_on(ids: list[int], source: int, k: int) -> list[int]:
    """k tokens copied from ids[source:]. Where ids run out, the copy goes on reading what it
    has copied, so text that repeats with period len(ids) - source keeps repeating."""
    copied: list[int] = []
    for i in range(source, source + k):
        copied.append(ids[i] if i < len(ids) else copied[i - len(ids)])
    return copied


class DraftModel:
    """Guesses with a small model that shares the tokenizer: k tokens one at a time, through
    its own KV cache; the argmax when greedy, else drawn from its distribution under the same
    sampling options (a draft that samples as the model does is accepted more often).

    max_len: the positions the model's cache holds; device: the model's (the draft's may be
    another).
    """

    def __init__(self, model: GPT, max_len: int, device: torch.device):
        self.model, self.device = model, device
        self.cache = model.new_cache(1, min(max_len, model.context))
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int, sampler: Sampler) -> Draft:
        # Feeding ids and k - 1 guesses must fit the draft's own context, which may be shorter.
        k = min(k, self.cache.max_len - len(ids) + 1)
        if k <= 0:
            return Draft()
        # Keep the cached keys of the tokens that are still the sequence's (the rejected
        # guesses' are not), but feed at least the last token: its logits are not kept.
        keep = min(common_prefix(self.cached, ids), len(ids) - 1)
        self.cache.truncate(keep)
        self.cached, feed = ids[:keep], ids[keep:]
        fork = sampler.fork()  # penalties count the guesses; the model's sampler must not
        tokens, qs = [], []
        draft_device = self.model.tok_emb.weight.device
        with eval_mode(self.model):
            for _ in range(k):
                x = torch.tensor([feed], device=draft_device)  # [1, T]
                logits = self.model(x, cache=self.cache, last_only=True)[:, -1]  # [1, V']
                self.cached += feed
                q = fork.distribution(fit_vocab(logits.to(self.device), sampler.vocab))  # [1, V]
                if sampler.sample.greedy:
                    token = int(q.argmax())
                else:
                    token = int(torch.multinomial(q, 1, generator=fork.generator))
                fork.advance(torch.tensor([token], device=self.device))
                tokens.append(token)
                qs.append(q)
                feed = [token]  # the last guess is never fed: the model may not keep it
        return Draft(tokens, None if sampler.sample.greedy else torch.cat(qs))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft logits [N, V'] as logits over the model's V ids. Both embeddings hold the shared
    tokenizer's ids and may pad past them to sizes of their own; padded ids are no token (the
    sampler masks them), so the extra columns are cut and missing ones are -inf."""
    if logits.shape[-1] >= vocab:
        return logits[:, :vocab]
    return F.pad(logits, (0, vocab - logits.shape[-1]), value=float("-inf"))


@dataclass
class SpeculationStats:
    """What speculation did for one sequence."""

    passes: int = 0  # forward passes of the model, the prompt's included
    drafted: int = 0  # guesses the model checked
    accepted: int = 0  # ... and kept

    @property
    def acceptance(self) -> float:
        """The fraction of the checked guesses that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each pass settled, on average: the accepted guesses plus one per pass."""
        return (self.accepted + self.passes) / self.passes if self.passes else 0.0


def drafter_for(
    model: GPT, prompt: list[int], sample: SampleConfig, draft: GPT | None
) -> tuple[Drafter | None, int]:
    """(the drafter the options ask for, guesses per pass): prompt lookup when
    sample.prompt_lookup > 0, else the draft model if there is one; (None, 0) for neither."""
    if sample.prompt_lookup > 0:
        return PromptLookup(), sample.prompt_lookup
    if draft is not None and sample.draft_tokens > 0:
        # The draft's cache holds no more than the model's (see speculative_steps).
        max_len = len(prompt) + _budget(model, [prompt], sample.max_new_tokens) - 1
        device = model.tok_emb.weight.device
        return DraftModel(draft, max(max_len, 1), device), sample.draft_tokens
    return None, 0


def speculates(sample: SampleConfig, draft: GPT | None = None) -> bool:
    """Whether these options (and this draft model) decode speculatively."""
    return sample.prompt_lookup > 0 or (draft is not None and sample.draft_tokens > 0)


@torch.inference_mode()
def speculative_steps(
    model: GPT,
    prompt: list[int],
    sampler: Sampler,
    max_new_tokens: int,
    drafter: Drafter | None,
    k: int,
    stats: SpeculationStats | None = None,
) -> Iterator[Picked]:
    """Yield the prompt's next tokens one Picked at a time, as decode.decode_steps does for one
    row, but settling up to k + 1 per pass of the model; no end-token handling here."""
    stats = stats if stats is not None else SpeculationStats()
    device = model.tok_emb.weight.device
    max_new = _budget(model, [prompt], max_new_tokens)  # the plain path's budget
    if max_new <= 0:
        return
    cache = model.new_cache(1, len(prompt) + max_new - 1)  # the last token is never fed
    out: list[int] = []
    feed = list(prompt)  # tokens the cache lacks: the prompt, then each pass's newest token
    with eval_mode(model):
        while len(out) < max_new:
            # A pass settles up to len(draft) + 1 tokens, all within the budget.
            room = min(k, max_new - len(out) - 1) if drafter is not None else 0
            draft = drafter.propose(prompt + out, room, sampler) if room > 0 else Draft()
            guesses = len(draft.tokens)
            x = torch.tensor([feed + draft.tokens], device=device)  # [1, T]
            if len(feed) == 1:  # a check: every row's logits (cpu_step's native pass on a CPU)
                logits = model(x, cache=cache)[0]  # [guesses + 1, V]
            else:  # the prompt: the logits after its last token and after each guess only
                logits = model.head(model.features(x, cache=cache)[0, -guesses - 1 :])
            picks = verify(logits, draft, sampler)
            stats.passes += 1
            stats.drafted += guesses
            stats.accepted += len(picks) - 1
            cache.truncate(cache.length - (guesses - (len(picks) - 1)))  # the refused guesses
            for picked in picks:
                out.append(int(picked.tokens[0]))
                yield picked
            feed = out[-1:]


def verify(logits: torch.Tensor, draft: Draft, sampler: Sampler) -> list[Picked]:
    """The tokens one pass settles, recorded in `sampler`: the guesses the model accepts, then
    one of its own (the replacement of the first refused guess, or one after them all).

    logits [k + 1, V]: the model's after the first j guesses, j = 0..k, from one product with
    the head: it is a large matrix (28M of SmolLM2-135M's weights), and a product with a few
    rows streams it once, as one row does.
    """
    picks = []
    for j in range(len(draft.tokens) + 1):
        row = logits[j : j + 1]  # [1, V]
        p = sampler.distribution(row)[0]  # [V], in the state after the tokens before j
        if j == len(draft.tokens):
            token = draw(p, sampler)
        else:
            q = None if draft.q is None else draft.q[j]
            token = judge(p, draft.tokens[j], q, sampler)
        picks.append(commit(row, token, sampler))
        if j == len(draft.tokens) or token != draft.tokens[j]:
            return picks
    raise AssertionError("unreachable: the last row always settles a token")


def draw(p: torch.Tensor, sampler: Sampler) -> int:
    """A token from p [V], as `choose` draws it: the argmax when greedy."""
    if sampler.sample.greedy:
        return int(p.argmax())
    return int(torch.multinomial(p, 1, generator=sampler.generator))


def judge(p: torch.Tensor, guess: int, q: torch.Tensor | None, sampler: Sampler) -> int:
    """The token at a guessed position: the guess if accepted, else its replacement.

    p [V]: the model's distribution there; q [V]: the drafter's, None for a point mass on the
    guess. Greedy keeps the guess if it is the argmax. Sampling keeps it with probability
    min(1, p / q) and otherwise draws from normalize(max(p - q, 0)), which never holds the
    guess; together the token is distributed exactly as p.
    """
    if sampler.sample.greedy:
        return int(p.argmax())
    if q is None:
        q = F.one_hot(torch.tensor(guess, device=p.device), p.shape[0]).to(p.dtype)
    u = float(torch.rand(1, generator=sampler.generator, device=p.device))
    if u * float(q[guess]) < float(p[guess]):
        return guess
    residual = (p - q).clamp(min=0)  # [V]
    if float(residual.sum()) <= 0:  # p == q up to rounding: a refusal had probability 0
        return guess
    return int(torch.multinomial(residual, 1, generator=sampler.generator))


def commit(row: torch.Tensor, token: int, sampler: Sampler) -> Picked:
    """token as `Sampler.pick` would return it from logits row [1, V], and recorded."""
    picked = Picked(torch.tensor([token], device=row.device))
    if sampler.sample.logprobs is not None:
        picked = sampler.with_logprobs(picked, sampler.mask(row.float()))
    sampler.advance(picked.tokens)
    return picked


@dataclass
class Speculated(Completion):
    """A Completion with what speculation did to make it."""

    stats: SpeculationStats = field(default_factory=SpeculationStats)


def speculative_complete(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
    skip: dict[int, str] | None = None,
    *,
    draft: GPT | None = None,
) -> Speculated:
    """One completion of one prompt, as decode.complete makes it (the same end rules, text,
    finish reason and log-probabilities), decoded speculatively: prompt lookup when
    sample.prompt_lookup > 0, else the draft model."""
    out = Speculated()
    steps = _speculation(model, prompt, sample, vocab_size, draft, out.stats)
    return settle(out, steps, reply_stream(sample, eos_id, decode, skip))


def speculative_stream(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    eos_id: int | None = None,
    decode: Decode | None = None,
    vocab_size: int | None = None,
    *,
    draft: GPT | None = None,
    stats: SpeculationStats | None = None,
) -> Iterator[int]:
    """Yield one prompt's new tokens as they are settled, as decode.stream does; stats, when
    given, is filled in as they are."""
    text = reply_stream(sample, eos_id, decode)
    for picked in _speculation(model, prompt, sample, vocab_size, draft, stats):
        t = int(picked.tokens[0])
        yield t
        text.push(t)
        if text.stopped:
            return


def _speculation(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    vocab_size: int | None,
    draft: GPT | None,
    stats: SpeculationStats | None,
) -> Iterator[Picked]:
    """speculative_steps for one prompt with the drafter the options ask for."""
    if sample.num_beams > 1 or sample.num_return_sequences > 1:
        raise ValueError(
            "speculative decoding makes one sequence: num_beams=1, num_return_sequences=1"
        )
    sampler = new_sampler(model, [prompt], sample, vocab_size)
    drafter, k = drafter_for(model, prompt, sample, draft)
    return speculative_steps(model, prompt, sampler, sample.max_new_tokens, drafter, k, stats)
