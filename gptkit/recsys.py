"""Recommendation from behaviour text: what a user watched (bought, read) becomes a sentence, and
a classifier learns P(the user picks this candidate next) from the user's real next choices
against items sampled from the catalogue (`gptkit finetune rank`). Candidates are then ranked by
that probability (`lm.score_candidates`, `gptkit recommend`, `gptkit eval rank`).

Data: RecBole's atomic files, a folder holding NAME.inter (user_id, item_id, timestamp columns)
and NAME.item (item_id, then the item's text fields: title, year, genres, ...), tab separated
with typed headers (`item_id:token`). `gptkit recommend --items` also takes a plain TSV of
id<TAB>text lines.

Split (He et al. 2017, "Neural Collaborative Filtering"): each user's interactions in time
order; the last is the test target, the one before it the validation target, and training
learns from the rest. A target is ranked against `negatives` items the user never touched,
drawn with a seed per user, so every scorer ranks the same candidates.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError

HISTORY_INTRO = "Watched, oldest first: "
CANDIDATE_INTRO = "\nNext: "  # starts with a newline: pre-tokenizers split there, so the
# context and the candidate tokenize alone exactly as they do together


@dataclass(frozen=True)
class Interactions:
    """Items by id (their text fields) and each user's item ids in time order."""

    items: dict[str, list[str]]
    histories: dict[str, list[str]]

    def candidate_text(self, item: str, seen: Counter | None = None) -> str:
        """All of an item's fields: 'Toy Story | 1995 | Animation Children's Comedy'; given
        `seen` (popularity's counts), also how many users had it: '... | 452 users'."""
        text = " | ".join(f for f in self.items[item] if f)
        return text if seen is None else f"{text} | {seen[item]} users"

    def history_text(self, item: str) -> str:
        """An item as the history shows it: its first field (the title), to keep it short."""
        return self.items[item][0]

    def names(self) -> dict[str, str]:
        """{a name, lowercased: the item's id} for every way a user may name an item: its
        title, its title with the next field in brackets ('Star Wars (1977)', as MovieLens
        writes titles) and its id; a title wins over another item's id."""
        named = {item.lower(): item for item in self.items}
        for item, fields in reversed(self.items.items()):  # the first item keeps a shared title
            named[fields[0].lower()] = item
            if len(fields) > 1 and fields[1]:
                named[f"{fields[0]} ({fields[1]})".lower()] = item
        return named


def context_text(history: Sequence[str]) -> str:
    """The text a candidate is judged after: the history's items, oldest first."""
    return HISTORY_INTRO + "; ".join(history)


def candidate_text(text: str) -> str:
    return CANDIDATE_INTRO + text


# -- reading -------------------------------------------------------------------------------


def _atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    """A RecBole atomic file: (column names without their types, rows)."""
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not all(":" in name for name in rows[0]):
        raise ConfigError(
            f"{path}: not a RecBole atomic file (a header of typed columns such as "
            "'item_id:token' comes first)"
        )
    return [name.split(":", 1)[0] for name in rows[0]], [r for r in rows[1:] if r]


def _files(data: str | Path) -> tuple[Path, Path]:
    """The .inter and .item files of a folder (or of an .inter file and its neighbour)."""
    path = Path(data)
    folder = path if path.is_dir() else path.parent
    inter = [path] if path.suffix == ".inter" else sorted(folder.glob("*.inter"))
    if not path.exists() or len(inter) != 1:
        raise ConfigError(
            f"{data}: expected a folder with one RecBole .inter file and its .item file "
            "(e.g. ../shared/data/movielens-100k)"
        )
    item = inter[0].with_suffix(".item")
    if not item.is_file():
        raise ConfigError(f"{inter[0]}: its item file {item.name} is missing")
    return inter[0], item


def read_items(path: str | Path) -> dict[str, list[str]]:
    """{item id: its text fields} from a RecBole .item file or an id<TAB>text TSV."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such items file")
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if first.split("\t", 1)[0].endswith(":token"):
        names, rows = _atomic(path)
        key = names.index("item_id") if "item_id" in names else 0
        items = {r[key]: [v for i, v in enumerate(r) if i != key] for r in rows}
    else:
        with path.open(encoding="utf-8", errors="replace") as f:
            pairs = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
        bad = next((n for n, p in enumerate(pairs, 1) if len(p) != 2 or not p[1].strip()), None)
        if bad is not None:
            raise ConfigError(f"{path}: line {bad} is not 'id<TAB>text'")
        items = {k: [v.strip()] for k, v in pairs}
    if not items:
        raise ConfigError(f"{path}: no items")
    return items


def read_interactions(data: str | Path) -> Interactions:
    """A RecBole folder's items and each user's items in time order (ties: file order)."""
    inter, item_file = _files(data)
    names, rows = _atomic(inter)
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in names]
    if missing:
        raise ConfigError(f"{inter}: no {', '.join(missing)} column (has {', '.join(names)})")
    u, i, t = (names.index(c) for c in ("user_id", "item_id", "timestamp"))
    items = read_items(item_file)
    events: dict[str, list[tuple[float, int, str]]] = {}
    for n, row in enumerate(rows):
        if row[i] not in items:
            raise ConfigError(f"{inter}: row {n + 2} names item {row[i]!r}, not in {item_file}")
        events.setdefault(row[u], []).append((float(row[t]), n, row[i]))
    histories = {user: [item for *_, item in sorted(e)] for user, e in events.items()}
    return Interactions(items, histories)


# -- the split, negatives and training records ----------------------------------------------


@dataclass(frozen=True)
class Case:
    """One ranking question: given the history, where does the target come among candidates
    (the target first, then the sampled negatives)?"""

    user: str
    history: list[str]
    candidates: list[str]


def _negatives(data: Interactions, user: str, seed: int, stream: int):
    """A draw(n) of n items the user never touched (without replacement within a draw), from a
    seeded stream of the user's own: stream 0 for evaluation, 1 for training, so training does
    not see the very items a user's candidates are ranked against (it may meet some by chance)."""
    seen = set(data.histories[user])
    pool = [item for item in data.items if item not in seen]
    rng = np.random.default_rng([seed, zlib.crc32(user.encode()), stream])

    def draw(n: int) -> list[str]:
        if n > len(pool):
            raise ConfigError(f"user {user} has only {len(pool)} unseen items; ask for fewer")
        return [pool[k] for k in rng.choice(len(pool), size=n, replace=False)]

    return draw


def cases(
    data: Interactions,
    split: str = "test",
    negatives: int | None = 99,
    seed: int = 0,
    users: int = 0,
) -> list[Case]:
    """The leave-last-out question of each user with at least 3 interactions: "test" ranks the
    last item after all the others, "val" the one before it, among `negatives` sampled unseen
    items (None: every item the user never touched). users > 0: a seeded sample."""
    back = {"test": 1, "val": 2}[split]
    names = sorted((u for u, h in data.histories.items() if len(h) >= 3), key=_user_order)
    if users:
        pick = np.random.default_rng(seed).choice(len(names), min(users, len(names)), False)
        names = [names[k] for k in sorted(pick)]
    out = []
    for user in names:
        h = data.histories[user]
        target = h[-back]
        if negatives is None:
            touched = set(h)
            others = [i for i in data.items if i not in touched]
        else:
            others = _negatives(data, user, seed, 0)(negatives)
        out.append(Case(user, h[:-back], [target, *others]))
    return out


def _user_order(user: str) -> tuple[int, str]:
    return (int(user), user) if user.isdigit() else (0, user)


def train_records(
    data: Interactions,
    negatives: int,
    history: int,
    per_user: int,
    seed: int,
    popular: bool = False,
) -> list[tuple[str, str, str]]:
    """(context, candidate, "yes"/"no") for each training position of each user: the items
    before the validation target, each after up to `history` items before it (per_user > 0:
    only each user's last per_user positions), with `negatives` unseen items as "no".
    popular: each candidate's text says how many users had it (in what training sees)."""
    seen = popularity(data, "val") if popular else None
    records = []
    for user in sorted(data.histories, key=_user_order):
        h = data.histories[user][:-2]
        positions = range(1, len(h))
        if per_user:
            positions = positions[-per_user:]
        draw = _negatives(data, user, seed, 1)
        for t in positions:
            context = context_text([data.history_text(i) for i in h[max(0, t - history) : t]])
            records.append((context, candidate_text(data.candidate_text(h[t], seen)), "yes"))
            for item in draw(negatives):
                records.append((context, candidate_text(data.candidate_text(item, seen)), "no"))
    if not records:
        raise ConfigError("no user has the 4 interactions a training position needs")
    return records


# -- scores and metrics --------------------------------------------------------------------


def rank_of_target(scores: Sequence[float]) -> int:
    """Where the target (scores[0]) comes, from 0: every candidate scoring at least as high
    is counted before it, so a scorer gains nothing from ties (a constant one ranks last)."""
    return sum(1 for s in scores[1:] if s >= scores[0])


def ndcg_gain(rank: int, k: int = 10) -> float:
    """One case's NDCG@k: 1 / log2(rank + 2) when the target is among the first k, else 0."""
    return 1 / math.log2(rank + 2) if rank < k else 0.0


def ranking_metrics(ranks: Sequence[int], k: int = 10) -> dict[str, float]:
    """HR@k (the target among the first k) and NDCG@k (the mean of `ndcg_gain`)."""
    if not ranks:
        raise ConfigError("no ranking cases to score")
    hits = [r < k for r in ranks]
    gains = [ndcg_gain(r, k) for r in ranks]
    return {f"hr@{k}": sum(hits) / len(ranks), f"ndcg@{k}": sum(gains) / len(ranks)}


def popularity(data: Interactions, split: str = "test") -> Counter:
    """Interactions per item over what the split lets a model see (each user's items before
    the split's target; "all": every interaction, for recommending)."""
    back = {"all": 0, "test": 1, "val": 2}[split]
    return Counter(item for h in data.histories.values() for item in h[: len(h) - back])
