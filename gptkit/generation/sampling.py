"""Choosing the next token: the sampling options (SampleConfig) and the one logits-processor
chain (`Sampler`) that `generate`, `stream`, beam search, speculative decoding and the serving
engine all use, so every entry point takes the same options and means the same by them.

The chain, in order (Hugging Face's definitions, OpenAI's for the penalties and logit_bias):

1. ids past the tokenizer's vocabulary are masked (padded embedding rows have no text);
2. logit_bias is added (OpenAI);
3. frequency and presence penalties subtract count * f + (count > 0) * p (OpenAI);
4. the repetition penalty shrinks every seen token's logit (CTRL's, as transformers applies it);
5. greedy takes the argmax; otherwise temperature, top-k, top-p and min-p, then a draw.

Log-probabilities, when asked for, are the model's own (log-softmax after step 1 only), as
vLLM reports them by default: they say how likely the model found each token, whatever the
request did to sample it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, is_int, is_real

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass
class SampleConfig:
    """Decoding options. temperature=0 means greedy; num_beams>1 means beam search."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off; keep tokens with p >= min_p * p(most likely token)
    repetition_penalty: float = 1.0  # 1.0: off (HF/CTRL definition)
    frequency_penalty: float = 0.0  # OpenAI's: logit -= f * times generated
    presence_penalty: float = 0.0  # OpenAI's: logit -= p once a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    num_return_sequences: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = logprob / length**length_penalty
    stop: list[str] = field(default_factory=list)  # the reply ends before any of these
    stop_ids: list[int] = field(default_factory=list)  # ... or at any of these tokens (as EOS)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: each token's and its k best alternatives'
    # Speculative decoding (speculative.py): the same output from fewer passes of the model.
    # api.LM's complete / generate / stream speculate; batched decoding (decode.complete, the
    # serving engine) ignores these, which changes its speed only.
    prompt_lookup: int = 0  # > 0: draft this many tokens per step by prompt lookup
    draft_tokens: int = 4  # tokens a draft model (LM.draft) proposes per step; 0: do not use it

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ConfigError("num_beams and num_return_sequences must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                f"num_return_sequences={self.num_return_sequences} cannot exceed "
                f"num_beams={self.num_beams} in beam search"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be in [-2**63, 2**64) or None, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if self.logprobs is not None and self.num_beams > 1:
            raise ConfigError("beam search scores whole beams; logprobs needs num_beams=1")
        if self.prompt_lookup < 0 or self.draft_tokens < 0:
            raise ConfigError("prompt_lookup and draft_tokens must be >= 0 (0 = off)")
        if self.prompt_lookup > 0 and (self.num_beams > 1 or self.num_return_sequences > 1):
            raise ConfigError(
                "prompt_lookup speculates one sequence: use num_beams=1, num_return_sequences=1"
            )

    def _check_types(self) -> None:
        """Values from flags, TOML or JSON can be of any type: ints where counts are meant,
        finite numbers for the rest (NaN compares false with every bound), non-empty stops."""
        for name in (
            "max_new_tokens",
            "top_k",
            "num_return_sequences",
            "num_beams",
            "prompt_lookup",
            "draft_tokens",
        ):
            if not is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
            "length_penalty",
        ):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        for name in ("seed", "logprobs"):
            value = getattr(self, name)
            if value is not None and not is_int(value):
                raise ConfigError(f"{name} must be an integer or None, got {value!r}")
        if not isinstance(self.stop, list | tuple) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_ids, list | tuple) or not all(
            is_int(t) and t >= 0 for t in self.stop_ids
        ):
            raise ConfigError(f"stop_ids must be a list of token ids, got {self.stop_ids!r}")
        self.stop_ids = list(self.stop_ids)
        if not isinstance(self.logit_bias, dict) or not all(
            is_int(t) and t >= 0 and is_real(b) and math.isfinite(b)
            for t, b in self.logit_bias.items()
        ):
            raise ConfigError(
                f"logit_bias must map token ids to finite numbers, got {self.logit_bias!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether the OpenAI penalties need per-row token counts."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float):
    """CTRL's penalty as HF applies it: seen tokens' scores shrink toward "less likely".

    scores [N, V] float; seen [N, V] bool (token already in the prompt or the output).
    """
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def filter_logits(
    logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0
) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k, outside the top-p nucleus, and below min_p
    times the most likely token's probability. logits [N, V]."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p  # the low tail holding at most 1 - top_p of the mass
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        floor = min_p * probs.amax(dim=-1, keepdim=True)  # [N, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))  # the top token always stays
    return logits


def probabilities(logits: torch.Tensor, sample: SampleConfig) -> torch.Tensor:
    """Step 5 when sampling: the distribution [N, V] a token is drawn from, given processed
    logits [N, V] (float32): temperature, then top-k, top-p and min-p, then softmax."""
    # Shift the best logit to 0 before scaling: with a tiny temperature (or a tiny repetition
    # penalty) the scaled logits would overflow to inf, and softmax of inf - inf is NaN. The
    # shift changes no probability; after it every scaled logit is <= 0 and the best one is 0.
    big = torch.finfo(logits.dtype).max
    logits = logits.clamp(max=big)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    temperature = max(sample.temperature, torch.finfo(logits.dtype).tiny)
    logits = filter_logits(logits / temperature, sample.top_k, sample.top_p, sample.min_p)
    return logits.softmax(dim=-1)


def choose(logits: torch.Tensor, sample: SampleConfig, generator) -> torch.Tensor:
    """The next token [N] from processed logits [N, V] (float32): argmax, or a draw."""
    if sample.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, sample), 1, generator=generator).squeeze(1)


@dataclass
class Picked:
    """One step's choice for N rows; the log-probabilities only when the options ask."""

    tokens: torch.Tensor  # [N]
    logprobs: torch.Tensor | None = None  # [N]: each chosen token's
    top_ids: torch.Tensor | None = None  # [N, k]: the k most likely tokens
    top_logprobs: torch.Tensor | None = None  # [N, k]

    def rows(self) -> list[tuple[int, float | None, dict[int, float]]]:
        """(token, its log-probability, {id: log-probability} of the top k) per row, read off
        the tensors once per step (None and {} where not asked for)."""
        tokens = self.tokens.tolist()
        logprobs = self.logprobs.tolist() if self.logprobs is not None else [None] * len(tokens)
        if self.top_ids is None:
            return [(t, lp, {}) for t, lp in zip(tokens, logprobs, strict=True)]
        tops = [
            dict(zip(ids, lps, strict=True))
            for ids, lps in zip(self.top_ids.tolist(), self.top_logprobs.tolist(), strict=True)
        ]
        return list(zip(tokens, logprobs, tops, strict=True))


class Sampler:
    """The sampling state of N rows that share one SampleConfig: the tokens each row has seen
    (repetition penalty) and generated (OpenAI penalties), and the seeded generator.

    vocab: the model's output size; usable: the tokenizer's, when smaller (see step 1 above).
    """

    def __init__(
        self,
        sample: SampleConfig,
        prompts: list[list[int]],
        vocab: int,
        usable: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.sample, self.vocab = sample, vocab
        self.usable = usable if usable is not None and usable < vocab else None
        self.seen = None  # [N, V] bool
        if sample.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for i, row in enumerate(prompts):
                self.seen[i, torch.tensor(row, dtype=torch.long, device=device)] = True
        self.counts = None  # [N, V] float: times each token was generated
        if sample.penalised:
            self.counts = torch.zeros(len(prompts), vocab, device=device)
        self.bias = None  # [V]
        if sample.logit_bias:
            ids = [t for t in sample.logit_bias if t < vocab]
            self.bias = torch.zeros(vocab, device=device)
            self.bias[torch.tensor(ids, dtype=torch.long, device=device)] = torch.tensor(
                [float(sample.logit_bias[t]) for t in ids], device=device
            )
        self.generator = None
        if sample.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sample.seed)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Step 1: logits [N, V] with the ids past the usable vocabulary at -inf."""
        if self.usable is None:
            return logits
        logits = logits.clone()  # it may be a view of the model's output, or an expanded one
        logits[:, self.usable :] = float("-inf")
        return logits

    def penalise(self, scores: torch.Tensor) -> torch.Tensor:
        """Steps 2-4 on scores [N, V] (logits, or log-probabilities in beam search)."""
        s = self.sample
        if self.bias is not None:
            scores = scores + self.bias
        if self.counts is not None:
            scores = (
                scores - s.frequency_penalty * self.counts - s.presence_penalty * (self.counts > 0)
            )
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, s.repetition_penalty)
        return scores

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities [N, V] that `pick` chooses from, given logits [N, V]: the whole
        chain, in this state. Greedy puts all the mass on the argmax. Nothing is recorded."""
        scores = self.penalise(self.mask(logits.float()))
        if self.sample.greedy:
            best = scores.argmax(dim=-1, keepdim=True)  # [N, 1]
            return torch.zeros_like(scores).scatter_(1, best, 1.0)
        return probabilities(scores, self.sample)

    def pick(self, logits: torch.Tensor) -> Picked:
        """Choose each row's next token from logits [N, V] and record it (see `advance`)."""
        logits = self.mask(logits.float())
        picked = Picked(choose(self.penalise(logits), self.sample, self.generator))
        if self.sample.logprobs is not None:
            picked = self.with_logprobs(picked, logits)
        self.advance(picked.tokens)
        return picked

    def with_logprobs(self, picked: Picked, logits: torch.Tensor) -> Picked:
        """picked with the model's log-probabilities of its tokens (and the top k) added."""
        logprobs = logits.log_softmax(dim=-1)  # [N, V]
        picked.logprobs = logprobs.gather(1, picked.tokens[:, None])[:, 0]
        if self.sample.logprobs:
            picked.top_logprobs, picked.top_ids = logprobs.topk(self.sample.logprobs, dim=-1)
        return picked

    def advance(self, tokens: torch.Tensor) -> None:
        """Record each row's new token [N] for the penalties."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def fork(self) -> Sampler:
        """A copy whose recorded tokens move on without changing this one's (a draft model
        proposes tokens with it); it shares the generator, so draws stay one seeded stream."""
        twin = copy.copy(self)
        twin.seen = None if self.seen is None else self.seen.clone()
        twin.counts = None if self.counts is None else self.counts.clone()
        return twin

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` [N'] (beam search keeps some beams and copies others)."""
        if self.seen is not None:
            self.seen = self.seen[index]
        if self.counts is not None:
            self.counts = self.counts[index]
