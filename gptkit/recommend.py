"""Ranking candidates with a model from `gptkit finetune rank`: a classifier of the labels no/yes
read at the end of "history, then candidate"; a candidate's score is P(yes).

Every candidate of a question shares the history, so it is run once: its keys and values fill
a KV cache, copied to one row per candidate, and only the candidates' own tokens run after it
(3.5x less time than scoring each whole text, for 100 candidates of MovieLens:
bench/recommend.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .config import ConfigError
from .examples import IGNORE, Example
from .generation import eval_mode
from .model import GPT
from .recsys import (
    Interactions,
    candidate_text,
    cases,
    context_text,
    popularity,
    rank_of_target,
    ranking_metrics,
)
from .tokenizer import Tokenizer

RANK_LABELS = ("no", "yes")


def rank_example(
    tokenizer: Tokenizer, context: str, candidate: str, label: int, block_size: int
) -> Example:
    """The context's tokens (its most recent ones, if too long), the candidate's, then EOS;
    the label (an index into RANK_LABELS) is the target at EOS. Context and candidate are
    tokenized apart, as score_candidates reads them."""
    tail = tokenizer.encode(candidate) + _end(tokenizer)
    room = block_size - len(tail)
    if room < 1:
        raise ConfigError(f"the candidate {candidate!r} does not fit the context")
    ids = tokenizer.encode(context)[-room:] + tail
    return Example(ids, [IGNORE] * (len(ids) - 1) + [label])


def _end(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def needs_ranker(model: GPT, what: str) -> int:
    """The index of "yes" among the model's labels, or a one-line error."""
    c = model.config
    if c.head != "classify" or sorted(c.labels) != sorted(RANK_LABELS):
        raise ConfigError(
            f"{what} needs a model from `gptkit finetune rank` (a classifier of the labels "
            f"no/yes); this one has a {c.head} head" + (f" of {c.labels}" if c.labels else "")
        )
    return c.labels.index("yes")


def score_candidates(
    model: GPT,
    tokenizer: Tokenizer,
    context: str,
    candidates: Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """P(yes) [N] of each candidate text after the context (both as recsys renders them).
    Candidates run in batches of similar lengths, each after its own copy of the history's
    cache (a prefill of the history per batch: cheap beside the padding it saves)."""
    yes = needs_ranker(model, "ranking candidates")
    tails = [tokenizer.encode(c) + _end(tokenizer) for c in candidates]
    if not tails:
        return torch.empty(0)
    longest = max(len(t) for t in tails)
    room = model.context - longest
    if room < 1:
        raise ConfigError(f"a candidate of {longest} tokens does not fit the context")
    head = tokenizer.encode(context)[-room:]
    device, pad = model.tok_emb.weight.device, tokenizer.pad_id or 0
    order = sorted(range(len(tails)), key=lambda i: len(tails[i]))  # chunks of like lengths
    out = torch.empty(len(tails))
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = len(tails[rows[-1]])
            cache = model.new_cache(1, len(head) + width)
            model.features(torch.tensor([head], device=device), cache=cache)
            cache.reorder(torch.zeros(len(rows), dtype=torch.long, device=device))
            x = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
            for b, i in enumerate(rows):
                x[b, : len(tails[i])] = torch.tensor(tails[i])
            h = model.features(x.to(device), cache=cache)  # [B, T, C]
            # Right padding follows each candidate's last token, so it cannot change it.
            last = h[torch.arange(len(rows)), torch.tensor([len(tails[i]) - 1 for i in rows])]
            out[rows] = model.head(last).float().softmax(-1)[:, yes].cpu()  # [B]
    return out


def evaluate_rank(
    model: GPT,
    tokenizer: Tokenizer,
    data: Interactions,
    split: str = "test",
    negatives: int | None = 99,
    users: int = 0,
    history: int = 10,
    k: int = 10,
    seed: int = 0,
    progress: bool = True,
    popular: bool = False,
) -> dict[str, Any]:
    """HR@k and NDCG@k of the model and of most-popular on the same questions (recsys.cases),
    with each user's target rank under both."""
    questions = cases(data, split, negatives, seed, users)
    counts, users = popularity(data, split), [c.user for c in questions]
    seen = counts if popular else None  # a ranker trained with rank_popular=true reads them
    ranks: dict[str, list[int]] = {"model": [], "most_popular": []}
    for case in tqdm(questions, desc="ranking", unit="user", disable=not progress):
        context = context_text([data.history_text(i) for i in case.history[-history:]])
        texts = [candidate_text(data.candidate_text(i, seen)) for i in case.candidates]
        scores = score_candidates(model, tokenizer, context, texts)
        ranks["model"].append(rank_of_target(scores.tolist()))
        ranks["most_popular"].append(rank_of_target([counts[i] for i in case.candidates]))
    return {
        "split": split,
        "users": len(questions),
        "candidates": "all unseen" if negatives is None else negatives + 1,
        **{name: ranking_metrics(r, k) for name, r in ranks.items()},
        "ranks": {
            name: dict(zip([c.user for c in questions], r, strict=True))
            for name, r in ranks.items()
        },
    }
