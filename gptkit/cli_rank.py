"""`gptkit eval rank` and `gptkit recommend` (recommend.py ranks; recsys.py reads the data)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import precision
from .api import load
from .checkpoint import is_checkpoint, read_meta
from .cli_flags import checked_device, dtype_flag, quantize_flag
from .config import ConfigError
from .recommend import evaluate_rank, score_candidates
from .recsys import (
    Interactions,
    candidate_text,
    context_text,
    popularity,
    read_interactions,
    read_items,
)


def trained_settings(model: str) -> tuple[int, bool]:
    """(rank_history, rank_popular) of the checkpoint's `finetune rank` run, so histories and
    candidates are shown as in training; the defaults (10, False) for any other model."""
    if is_checkpoint(model):
        settings = read_meta(model).get("train", {}).get("config", {})
        if settings.get("objective") == "rank":
            return int(settings.get("rank_history", 10)), bool(settings.get("rank_popular"))
    return 10, False


def cmd_eval_rank(args: argparse.Namespace) -> None:
    for name in ("users", "negatives", "history"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "users" else 1):
            raise ConfigError(f"--{name} must be at least {0 if name == 'users' else 1}")
    if args.full and args.negatives:
        raise ConfigError("--full ranks against every unseen item: leave out --negatives")
    data = read_interactions(args.data[0])
    device = checked_device(args)
    lm = load(args.model, adapter=args.adapter, device=device, quantize=args.quantize)
    k = args.k or 10
    negatives = None if args.full else args.negatives or 99
    history, popular = trained_settings(args.model)
    with precision.compute(args.dtype, device):
        result = evaluate_rank(
            lm.model, lm.tokenizer, data, args.split, negatives, args.users or 0,
            args.history or history, k, popular=popular,
        )  # fmt: skip
    print(f"rank: {args.data[0]} ({result['split']}, {result['users']} users, "
          f"{result['candidates']} candidates each)")  # fmt: skip
    print(f"{'scorer':<14}{f'HR@{k}':>8}{f'NDCG@{k}':>10}")
    for name in ("model", "most_popular"):
        m = result[name]
        print(f"{name:<14}{m[f'hr@{k}']:>8.4f}{m[f'ndcg@{k}']:>10.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def cmd_recommend(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    history = [h.strip() for h in args.history.split(";") if h.strip()]
    if not history:
        raise ConfigError("--history is empty: give the items the user liked, split by ';'")
    items = read_items(args.items)
    _, popular = trained_settings(args.model)
    seen = None
    if popular:  # trained on candidates that say how many users had them: count them
        if args.data is None:
            raise ConfigError(
                f"{args.model} was trained with rank_popular=true: give --data, the interactions "
                "to count each item's users in"
            )
        seen = popularity(read_interactions(args.data), "all")
    data = Interactions(items, {})
    # An item the catalogue has is read as training showed it (its title) and left out of
    # the ranking; any other text is read as it is.
    names = data.names()
    pairs = [(h, names.get(h.lower())) for h in history]  # (text, its item id or None)
    found = {item for _, item in pairs if item is not None}
    unknown = [h for h, item in pairs if item is None]
    if unknown:
        print(
            f"gptkit: note: --history {', '.join(map(repr, unknown))} names no item of "
            f"{args.items}: read as text, nothing left out for it",
            file=sys.stderr,
        )
    history = [h if item is None else data.history_text(item) for h, item in pairs]
    ids = [i for i in items if args.keep_history or i not in found]
    device = checked_device(args)
    lm = load(args.model, device=device, quantize=args.quantize)
    texts = [candidate_text(data.candidate_text(i, seen)) for i in ids]
    with precision.compute(args.dtype, device):
        scores = score_candidates(lm.model, lm.tokenizer, context_text(history), texts)
    best = scores.argsort(descending=True)[: args.k].tolist()
    rows = [
        {"item": ids[b], "text": data.candidate_text(ids[b]), "score": float(scores[b])}
        for b in best
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    for n, row in enumerate(rows, 1):
        print(f"{n:>3}  {row['score']:.4f}  {row['item']:>6}  {row['text']}")


def add_recommend_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recommend", help="rank a catalogue's items for a history (finetune rank)")
    p.add_argument("--model", required=True, help="a model from `gptkit finetune rank`")
    p.add_argument("--history", required=True, help="the items the user liked, split by ';'")
    p.add_argument("--items", required=True, type=Path, help="RecBole .item file, or id<TAB>text")
    p.add_argument("-k", type=int, default=10, help="how many to show")
    p.add_argument("--data", help="interactions (RecBole folder): a rank_popular=true model counts")
    p.add_argument("--keep-history", action="store_true", help="also rank the history's items")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--device", default=None)
    dtype_flag(p)
    quantize_flag(p, classifier=True)
    p.set_defaults(func=cmd_recommend)
