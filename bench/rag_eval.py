"""The retrieval assistant measured on real data, for docs/RESULTS.md:

1. banking-kb (../shared/data/banking-kb): a bank's 698 support documents, indexed as
   shipped; the 97 customer scenarios of tasks.json are the queries (each scenario's
   `user_scenario.instructions`, less the sentence every one of them opens with), and the
   documents each names in `required_documents` are its relevant ones.
   `gptkit eval retrieval`: recall@1/5/10, MRR, nDCG@10 for dense, BM25 and hybrid search.
2. SQuAD v1.1 dev (../shared/data/squad-dev): all 2,067 paragraphs indexed, one document each
   (id "Title/n"); a fixed subset of 500 questions (random.Random(0).sample of the 10,570),
   each with its paragraph as the one relevant document. `gptkit eval retrieval` as above,
   then `gptkit eval rag` with SmolLM2-135M-Instruct: closed-book, retrieved (top 3) and
   oracle (the gold paragraph), SQuAD exact match and F1. Retrieval is also scored on as many
   other questions (random.Random(1).sample of the rest), the tuning set: hybrid's weight was
   chosen on it, so the fixed 500 and the bank show whether the choice holds.

Every step is the documented command, run as a subprocess and printed; everything is written
under --out (runs/rag: the inputs built from ../shared/data, the indexes, each command's saved
results and per-question answers; nothing is copied into the repo). Last, a summary: the
issue's tables, whether hybrid beats dense and BM25 on each metric (by the paired test `eval
retrieval` prints: a difference with p >= 0.05 is a tie), and whether retrieved F1 is 20
points above closed-book. `--smoke` cuts each set to a few rows (tests). The full run
takes about 40 minutes on 2 idle cores, most of it generating the 3 x 500 answers.

A scenario's query is its whole instruction text: on these 97, keeping only the lines that
fewer than 3 scenarios share, only the customer's quoted lines, or only the situation, goal
and opening paragraphs found fewer of the required documents (hybrid recall@10 0.326, 0.299,
0.232 against 0.325 for the whole text, with MRR 0.643, 0.580, 0.442 against 0.666).

    .venv/bin/python bench/rag_eval.py [--questions 500] [--smoke]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BANK = SHARED / "banking-kb"
SQUAD = SHARED / "squad-dev" / "squaddev_v1.1.json"
PREAMBLE = (
    "You are playing the role of a customer contacting a customer service representative agent."  # noqa: E501
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def bank(out: Path, smoke: bool) -> tuple[Path, Path]:
    """(the documents to index, the queries)."""
    tasks = json.loads((BANK / "tasks.json").read_text())
    queries = [
        {"query": t["user_scenario"]["instructions"].replace(PREAMBLE, "").strip(),
         "relevant": t["required_documents"]}
        for t in tasks if t["required_documents"]
    ]  # fmt: skip
    if not smoke:
        return BANK / "documents.json.gz", write_jsonl(out / "bank-queries.jsonl", queries)
    queries = queries[:3]
    with gzip.open(BANK / "documents.json.gz", "rt") as f:
        docs = json.load(f)
    needed = {d for q in queries for d in q["relevant"]}
    docs = [d for d in docs if d["id"] in needed] + [d for d in docs if d["id"] not in needed][:10]
    return write_jsonl(out / "bank-docs.jsonl", docs), write_jsonl(
        out / "bank-queries.jsonl", queries
    )


def squad_questions(questions: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(every paragraph as a document, every question, the fixed subset of `questions`)."""
    docs, qas = [], []
    for article in json.loads(SQUAD.read_text())["data"]:
        title = article["title"].replace("_", " ")
        for n, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}/{n}"
            docs.append({"id": doc_id, "title": title, "text": paragraph["context"]})
            for qa in paragraph["qas"]:
                row = {"question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
                qas.append(
                    {**row, "context": paragraph["context"], "title": title, "doc_id": doc_id}
                )
    return docs, qas, random.Random(0).sample(qas, questions)


def squad(out: Path, questions: int, smoke: bool) -> tuple[Path, Path, Path, Path]:
    """(paragraphs, retrieval queries, QA rows) of the fixed question subset, and retrieval
    queries of as many other questions (random.Random(1)): the set hybrid search was tuned on."""
    docs, qas, subset = squad_questions(questions)
    chosen = {id(q) for q in subset}
    rest = [q for q in qas if id(q) not in chosen]
    tuning = random.Random(1).sample(rest, questions)
    if smoke:
        subset = subset[:3]
        kept = {q["doc_id"] for q in subset}
        docs = [d for d in docs if d["id"] in kept] + [d for d in docs if d["id"] not in kept][:12]
        tuning = [q for q in rest if q["doc_id"] in kept][:3]

    def queries(rows: list[dict]) -> list[dict]:
        return [{"query": q["question"], "relevant": [q["doc_id"]]} for q in rows]

    return (
        write_jsonl(out / "squad-docs.jsonl", docs),
        write_jsonl(out / "squad-queries.jsonl", queries(subset)),
        write_jsonl(out / "squad-qa.jsonl", subset),
        write_jsonl(out / "squad-tuning-queries.jsonl", queries(tuning)),
    )


def gptkit(*args: str) -> str:
    """Run a documented gptkit command, print it and its output's end, return its stdout."""
    command = [sys.executable, "-m", "gptkit", *args]
    print("$ gptkit " + shlex.join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        print(done.stderr[-2000:])
        raise SystemExit(f"failed with status {done.returncode}")
    print(done.stdout.rstrip() + f"\n  ({time.perf_counter() - start:.0f} s)\n", flush=True)
    return done.stdout


def summary(out: Path) -> None:
    """The issue's numbers from the commands' saved results, and whether each target is met."""

    def load(name: str) -> dict:
        return json.loads((out / name).read_text())

    print("## Summary")
    for name, ks in (("banking-kb", (5, 10)), ("squad", (1, 5)), ("squad-tuning", (1, 5))):
        results = load(f"{name}-retrieval.json")
        print(f"\n{name} retrieval (n={results['hybrid']['n']})")
        print("| mode | " + " | ".join(f"recall@{k}" for k in ks) + " | MRR | nDCG@10 |")
        print("|---" * (len(ks) + 3) + "|")
        metrics = [*(f"recall@{k}" for k in ks), "mrr", "ndcg@10"]
        for mode in ("dense", "bm25", "hybrid"):
            print(f"| {mode} | " + " | ".join(f"{results[mode][m]:.3f}" for m in metrics) + " |")
        for m in metrics:  # a difference counts where the paired test says it is not noise
            verdicts = []
            for other in ("dense", "bm25"):
                c = results["comparisons"][f"hybrid - {other}"][m]
                verdict = "ties with"
                if c["p"] < 0.05:
                    verdict = "beats" if c["difference"] > 0 else "is beaten by"
                verdicts.append(f"{verdict} {other} {c['difference']:+.3f} p={c['p']:.3f}")
            print(f"  {m}: hybrid " + "; ".join(verdicts))
    rag = {mode: load(f"squad-{mode}.json") for mode in ("closed-book", "retrieved", "oracle")}
    print(f"\nSQuAD QA, smollm2-135m-instruct (n={rag['oracle']['n']})")
    print("| mode | EM | F1 | contains |\n|---|---|---|---|")
    for mode, r in rag.items():
        print(f"| {mode} | {r['exact_match']:.1f} | {r['f1']:.1f} | {r['contains']:.1f} |")
    found = rag["retrieved"].get("gold_in_top3")
    if found is not None:
        print(f"  the gold paragraph is among the 3 retrieved sources for {found:.1f}%")
    gain = rag["retrieved"]["f1"] - rag["closed-book"]["f1"]
    verdict = "met" if gain >= 20 else "NOT met"
    print(f"  retrieved F1 - closed-book F1 = {gain:+.1f} (target +20: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=500, help="SQuAD questions")
    parser.add_argument("--smoke", action="store_true", help="a few rows of each set (tests)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rag")
    args = parser.parse_args()
    out = args.out.resolve()

    def rel(path: Path) -> str:  # the shorter spelling, for the printed commands
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    start = time.perf_counter()
    docs, queries = bank(out, args.smoke)
    bank_idx = rel(out / "bank-idx")
    gptkit("index", rel(docs), "--out", bank_idx, "--text-field", "content", "--overwrite")
    gptkit("eval", "retrieval", "--index", bank_idx, "--data", rel(queries),
           "--out", rel(out / "banking-kb-retrieval.json"))  # fmt: skip

    docs, queries, qa, tuning = squad(out, args.questions, args.smoke)
    squad_idx = rel(out / "squad-idx")
    gptkit("index", rel(docs), "--out", squad_idx, "--overwrite")
    for name, data in (("squad", queries), ("squad-tuning", tuning)):
        gptkit("eval", "retrieval", "--index", squad_idx, "--data", rel(data),
               "--out", rel(out / f"{name}-retrieval.json"))  # fmt: skip
    tokens = "8" if args.smoke else "24"
    for mode in ("closed-book", "retrieved", "oracle"):
        gptkit("eval", "rag", "--model", "smollm2-135m-instruct", "--index", squad_idx,
               "--data", rel(qa), "--mode", mode, "-k", "3", "--max-new-tokens", tokens,
               "--out", rel(out / f"squad-{mode}.json"))  # fmt: skip
    summary(out)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
