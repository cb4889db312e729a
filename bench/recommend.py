"""Recommendation on MovieLens-100K (../shared/data/movielens-100k): a SmolLM2-135M-Instruct ranker
from `gptkit finetune rank` (LoRA) against most-popular and implicit-feedback matrix
factorisation (the `implicit` library's ALS), all on the same questions, for docs/RESULTS.md.

Protocol (He et al. 2017): each user's last interaction is the target, ranked among 99 items the
user never touched (seeded per user, recsys.cases); HR@10 and NDCG@10. The text model reads the
user's 10 most recent titles, then the candidate's title, year and genres. It is scored on a
seeded sample of --users users (100 candidates a user cost it seconds on a CPU); the baselines
are scored on the same sample and on every user. The combination is the one the source material
suggests, text score with the MF score: per user, each scorer's candidate scores are
standardised and averaged with equal weights (fixed beforehand, not tuned on the test targets).
--popular trains and scores with each candidate's text also saying how many users had it
(counted in what each split lets a model see): the popularity signal, given to the text model.
--dtype bfloat16 trains (dtype=bfloat16) and scores (precision.compute) with bfloat16 matmuls
under autocast: several times the steps in the same time on a CPU with AVX-512-BF16 or AMX.

    .venv/bin/python bench/recommend.py [--steps 150] [--users 200] [--popular]
        [--dtype float32|bfloat16] [--checkpoint DIR] [--smoke]

--checkpoint scores a ranker this bench trained before (its --popular must match) instead of
training one; --users 0 scores every user. Besides the table it prints paired tests over the
sampled users (the text ranker against most-popular and ALS, the combination against ALS) and
writes each user's target rank per scorer, and the text model's scores, to OUT/ranks.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # implicit's advice for its ALS

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy.stats import binomtest, wilcoxon  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit import load, machine, precision  # noqa: E402
from gptkit.checkpoint import is_checkpoint  # noqa: E402
from gptkit.cli_rank import trained_settings  # noqa: E402
from gptkit.config import DTYPES  # noqa: E402
from gptkit.predict import batched_logits  # noqa: E402
from gptkit.recommend import rank_example, score_candidates  # noqa: E402
from gptkit.recsys import (  # noqa: E402
    candidate_text,
    cases,
    context_text,
    ndcg_gain,
    popularity,
    rank_of_target,
    ranking_metrics,
    read_interactions,
)

DATA = ROOT.parent / "shared" / "data" / "movielens-100k"


def finetune(
    out: Path, steps: int, batch: int, per_user: int, val_batches: int, popular: bool, dtype: str
) -> Path:
    """The documented command, run as a subprocess; the checkpoint it writes."""
    args = [
        "finetune", "rank", "--model", "smollm2-135m-instruct", "--data", str(DATA),
        "peft.method=lora", "peft.r=16", "peft.alpha=32", "lr=1e-3", f"max_steps={steps}",
        f"batch_size={batch}", "warmup_steps=10", "rank_negatives=4",
        f"rank_per_user={per_user}", f"eval_batches={val_batches}", "eval_every=0",
        f"out_dir={out}", f"dtype={dtype}", "--overwrite",
        *(["rank_popular=true"] if popular else []),
    ]  # fmt: skip
    print("$ gptkit " + shlex.join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True)
    print("\n".join((done.stdout + done.stderr).strip().splitlines()[-2:]))
    if done.returncode:
        raise SystemExit(f"failed with status {done.returncode}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return out / "checkpoint"


def als_scores(data, questions, factors: int, seed: int) -> list[list[float]]:
    """implicit's ALS on every user's items before their test target (binary confidence)."""
    import implicit

    users = {u: n for n, u in enumerate(data.histories)}
    items = {i: n for n, i in enumerate(data.items)}
    rows, cols = [], []
    for user, history in data.histories.items():
        for item in set(history[:-1]):
            rows.append(users[user])
            cols.append(items[item])
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(users), len(items)))
    model = implicit.als.AlternatingLeastSquares(
        factors=factors, regularization=0.05, iterations=20, random_state=seed
    )
    model.fit(matrix, show_progress=False)
    return [
        (model.item_factors[[items[i] for i in q.candidates]] @ model.user_factors[users[q.user]])
        .astype(float)
        .tolist()
        for q in questions
    ]


def whole_text_seconds(lm, data, questions, seen) -> float:
    """Seconds to score the questions' candidates as whole texts (each with its history),
    as batched classification does: what the shared history saves."""
    rows = []
    for q in questions:
        context = context_text([data.history_text(i) for i in q.history[-10:]])
        for item in q.candidates:
            text = candidate_text(data.candidate_text(item, seen))
            rows.append(rank_example(lm.tokenizer, context, text, 0, lm.config.block_size))
    start = time.perf_counter()
    for _ in batched_logits(lm.model, rows, lm.tokenizer.pad_id or 0, 32):
        pass
    return time.perf_counter() - start


def standardised(scores: list[float]) -> np.ndarray:
    x = np.asarray(scores, dtype=float)
    return (x - x.mean()) / (x.std() or 1.0)


def paired(a: list[int], b: list[int], k: int = 10) -> str:
    """How sure it is that scorer a ranks the targets differently from scorer b, on the same
    users and candidates: the users only one of them hits at k (McNemar's exact test, a
    two-sided binomial test on those users) and each user's NDCG@k difference (Wilcoxon's
    signed-rank test; users with none left out)."""
    won = sum(x < k <= y for x, y in zip(a, b, strict=True))
    lost = sum(y < k <= x for x, y in zip(a, b, strict=True))
    p_hits = binomtest(won, won + lost).pvalue if won + lost else 1.0
    diffs = [ndcg_gain(x, k) - ndcg_gain(y, k) for x, y in zip(a, b, strict=True)]
    p_gain = wilcoxon(diffs).pvalue if any(diffs) else 1.0
    return (
        f"HR@{k} won on {won} users, lost on {lost} (McNemar exact p = {p_hits:.2g}); "
        f"NDCG@{k} higher for {sum(d > 0 for d in diffs)}, lower for "
        f"{sum(d < 0 for d in diffs)} (Wilcoxon p = {p_gain:.2g})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    parser.add_argument("--users", type=int, default=200, help="users the text model ranks for")
    parser.add_argument("--per-user", type=int, default=20, help="training positions per user")
    parser.add_argument("--factors", type=int, default=64, help="ALS factors")
    parser.add_argument(
        "--popular", action="store_true", help="candidates say how many users had them"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="train and score in")
    parser.add_argument(
        "--smoke", action="store_true", help="1 step, 1 user of 40 candidates, no timing (tests)"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="score this trained ranker instead of training one"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recommend")
    args = parser.parse_args()
    steps, batch, per_user, users, val_batches = (
        (1, 1, 1, 1, 1) if args.smoke else (args.steps, 16, args.per_user, args.users, 8)
    )
    load1 = os.getloadavg()[0]
    print(f"machine: {machine.cpu().describe()}; load {load1:.1f}", flush=True)
    data = read_interactions(DATA)
    print(f"MovieLens-100K: {len(data.histories)} users, {len(data.items)} items")
    out = args.out.resolve() / "model"
    if args.checkpoint and not is_checkpoint(args.checkpoint):
        raise SystemExit(f"{args.checkpoint} is not a gptkit checkpoint: give a ranker's "
                         "out_dir/checkpoint (from gptkit finetune rank)")  # fmt: skip
    if args.checkpoint and trained_settings(str(args.checkpoint))[1] != args.popular:
        raise SystemExit(f"{args.checkpoint} was trained {'without' if args.popular else 'with'} "
                         "rank_popular: match --popular to it")  # fmt: skip
    checkpoint = args.checkpoint or finetune(
        out, steps, batch, per_user, val_batches, args.popular, args.dtype
    )
    lm = load(str(checkpoint), device="cpu")
    # smoke: the sampled user's target among 39 negatives, not 99 (the text model scores each
    # candidate; 40 are still two batches of score_candidates)
    negatives = 39 if args.smoke else 99
    every, sample = cases(data, "test"), cases(data, "test", negatives, users=users)
    counts = popularity(data, "test")
    seen = counts if args.popular else None
    start = time.perf_counter()
    text = []
    with precision.compute(args.dtype, "cpu"):
        for q in sample:
            context = context_text([data.history_text(i) for i in q.history[-10:]])
            texts = [candidate_text(data.candidate_text(i, seen)) for i in q.candidates]
            text.append(score_candidates(lm.model, lm.tokenizer, context, texts).tolist())
    seconds = time.perf_counter() - start
    timed = sample[:3]  # scored again as whole texts, for the shared history's speed-up
    with precision.compute(args.dtype, "cpu"):
        whole = 0.0 if args.smoke else whole_text_seconds(lm, data, timed, seen)  # smoke: no timing
    shared = seconds / len(sample) * len(timed)
    scorers = {
        "most-popular": lambda qs: [[counts[i] for i in q.candidates] for q in qs],
        "ALS (implicit)": lambda qs: als_scores(data, qs, args.factors, 0),
    }
    rows = []
    for name, scorer in scorers.items():
        rows.append((name, "all", ranking_metrics([rank_of_target(s) for s in scorer(every)])))
    mf = scorers["ALS (implicit)"](sample)
    combined = [(standardised(t) + standardised(m)).tolist() for t, m in zip(text, mf, strict=True)]
    ranks = {  # each sampled user's target rank, per scorer
        name: [rank_of_target(s) for s in scores]
        for name, scores in (
            ("most-popular", scorers["most-popular"](sample)),
            ("ALS (implicit)", mf),
            ("gptkit SmolLM2 LoRA", text),
            ("gptkit + ALS", combined),
        )
    }
    rows += [(name, "sample", ranking_metrics(r)) for name, r in ranks.items()]
    print(f"\nthe text model ranked {len(sample)} users' candidates in {seconds:.0f} s")
    if whole:
        print(
            f"{len(timed)} users' candidates: {shared:.1f} s after a shared history (the mean "
            f"rate), {whole:.1f} s as whole texts: {whole / shared:.1f}x"
        )
    print("\n| scorer | users | HR@10 | NDCG@10 |\n|---|---|---|---|")
    for name, which, m in rows:
        n = len(every) if which == "all" else len(sample)
        print(f"| {name} | {n} | {100 * m['hr@10']:.1f} | {100 * m['ndcg@10']:.1f} |")
    print(f"\npaired over the {len(sample)} users:")
    for a, b in (
        ("gptkit SmolLM2 LoRA", "most-popular"),
        ("gptkit SmolLM2 LoRA", "ALS (implicit)"),
        ("gptkit + ALS", "ALS (implicit)"),
    ):
        print(f"  {a} vs {b}: {paired(ranks[a], ranks[b])}")
    summary = {name + f" ({which})": m for name, which, m in rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(args.out / "ranks.jsonl", "w") as f:  # per user, for other comparisons later
        for i, q in enumerate(sample):
            row = {"user": q.user, "ranks": {n: r[i] for n, r in ranks.items()}, "text": text[i]}
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
