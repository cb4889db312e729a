"""`gptkit eval retrieval` and `gptkit eval rag`: how well an index finds what a question
needs, and how much the found text helps a model answer.

    gptkit eval retrieval --index runs/idx --data queries.jsonl      # {"query", "relevant": [ids]}
    gptkit eval rag --model M --index runs/idx --data qa.jsonl --mode retrieved -k 3
                                                   # {"question", "answers": [...], "context"?}

Retrieval is scored on documents, not chunks: a query's ranked chunks become its ranked
documents (each at its best chunk's rank). recall@k = the share of the query's relevant
documents in its top k; MRR = 1 / the rank of the first relevant one (0 if none in the top
DEPTH chunks); nDCG@10 with binary gains. Each is the mean over queries. The first mode
scored (hybrid by default) is then compared with each other one query by query
(paired_comparison): is its lead larger than the queries' own spread?

`eval rag` asks for a short answer, greedily, through the model's chat template:
closed-book (the question alone), retrieved (the top k chunks as numbered sources, the prompt
`chat/serve --retrieval` build, rag.grounded_messages) or oracle (the gold passage, the row's
`context`, as the only source). Answers are scored with SQuAD v1.1's exact match and F1
(evaluate.squad_scores) after citation marks like "[1]" are removed: the gain of retrieved
over closed-book is what the index adds, and oracle bounds it. Beside them, `contains`: the
share of answers holding a gold answer's words in order (both normalised), the lenient score
of open-domain QA for generative models, which a small model's whole-sentence answers ("The
currency of Mongolia is the tögrög.") pass and SQuAD's EM and F1 punish.

Rows may give the gold passage as `context`, or name its document by `doc_id` (oracle mode
then reads the document from --index); with `doc_id`, retrieved mode also reports the share
of questions whose gold document is among the k sources (gold_in_topk).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .config import ConfigError
from .evaluate import format_table, normalize_answer, save_results, squad_scores
from .rag import grounded_messages
from .rag_index import DENSE_WEIGHT, MODES, Hit, Index, check_dense_weight
from .taskdata import located_records

KS = (1, 5, 10)
DEPTH = 50  # chunks searched per query: enough to fill 10 distinct documents
RAG_MODES = ("closed-book", "retrieved", "oracle")
QUESTION = "{question}\nAnswer with a few words only."
CITATION = re.compile(r"\s*\[\d+\]")


def contains_answer(prediction: str, answers: list[str]) -> bool:
    """Whether a gold answer's normalised words occur, in order and whole, in the prediction's."""
    pred = f" {normalize_answer(prediction)} "
    return any(f" {gold} " in pred for a in answers if (gold := normalize_answer(a)))


def ranked_documents(hits: list[Hit]) -> list[str]:
    """The hits' document ids in rank order, each once."""
    return list(dict.fromkeys(h.doc_id for h in hits))


def query_metrics(docs: list[str], gold: set[str], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """recall@k for each of `ks`, reciprocal rank and nDCG@10 of one query's ranked document
    ids (best first, each once). A relevant id the ranking never reaches counts as missed, so
    recall@k cannot exceed min(k, |gold|) / |gold|."""
    scores = {f"recall@{k}": len(gold.intersection(docs[:k])) / len(gold) for k in ks}
    first = next((i for i, d in enumerate(docs, 1) if d in gold), None)
    scores["mrr"] = 1 / first if first else 0.0
    dcg = sum(1 / math.log2(i + 1) for i, d in enumerate(docs[:10], 1) if d in gold)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(gold), 10) + 1))
    scores["ndcg@10"] = dcg / ideal
    return scores


def per_query_metrics(
    ranked: list[list[str]], relevant: list[set[str]], ks: tuple[int, ...] = KS
) -> list[dict[str, float]]:
    """query_metrics of each query."""
    if not ranked or len(ranked) != len(relevant):
        raise ValueError(f"{len(ranked)} rankings for {len(relevant)} relevance sets")
    return [query_metrics(docs, gold, ks) for docs, gold in zip(ranked, relevant, strict=True)]


def mean_metrics(per_query: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the queries."""
    return {name: sum(q[name] for q in per_query) / len(per_query) for name in per_query[0]}


def retrieval_metrics(
    ranked: list[list[str]], relevant: list[set[str]], ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """query_metrics averaged over queries."""
    return mean_metrics(per_query_metrics(ranked, relevant, ks))


def paired_comparison(
    a: list[dict[str, float]], b: list[dict[str, float]], resamples: int = 10_000
) -> dict[str, dict[str, float]]:
    """Whether ranking a beats ranking b on the same queries, for each metric: the difference
    of the means (a - b), its 95% bootstrap interval (queries resampled), and the two-sided p
    of a paired randomization test (each query's two scores swapped at random; the test
    Smucker, Allan & Carterette (CIKM 2007) recommend for IR). With 97 queries a difference
    of one document in two hundred is noise; this says which differences are not. Seeded:
    the same inputs give the same numbers."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"a paired comparison needs two queries or more, each ranked both "
                         f"ways; got {len(a)} and {len(b)}")  # fmt: skip
    out = {}
    for name in a[0]:
        x = np.array([q[name] for q in a])  # [Q]
        y = np.array([q[name] for q in b])  # [Q]
        if np.array_equal(x, y):  # nothing to test (and no interval: every resample is 0)
            out[name] = {"difference": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}
            continue
        test = stats.permutation_test(
            (x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
            permutation_type="samples", n_resamples=resamples, rng=0,
        )  # fmt: skip
        interval = stats.bootstrap(
            (x - y,), np.mean, n_resamples=resamples, method="percentile", rng=0
        ).confidence_interval
        out[name] = {"difference": float(np.mean(x - y)), "low": float(interval.low),
                     "high": float(interval.high), "p": float(test.pvalue)}  # fmt: skip
    return out


def read_queries(path: str) -> list[tuple[str, set[str]]]:
    """(query, relevant document ids) of each row; a bad row is a one-line error naming it."""
    rows = []
    for where, row in located_records(path):
        query, relevant = row.get("query"), row.get("relevant")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError(f"{where}: no 'query' text")
        if isinstance(relevant, str | int):  # one id written bare
            relevant = [relevant]
        if not isinstance(relevant, list) or not relevant:
            raise ConfigError(f"{where}: 'relevant' must list the relevant document ids")
        rows.append((query, {str(r) for r in relevant}))
    return rows


def eval_retrieval(
    index: Index, queries: list[tuple[str, set[str]]], mode: str, dense_weight: float = DENSE_WEIGHT
) -> tuple[dict, list[dict[str, float]]]:
    """The metrics of one search mode (means, and how many relevant ids the index lacks),
    and each query's own (for paired_comparison)."""
    known = set(index.document_ids())
    missing = sum(len(gold - known) for _, gold in queries)
    k = min(DEPTH, len(index))
    hits = index.search_many([q for q, _ in queries], k, mode, dense_weight)
    per_query = per_query_metrics(
        [ranked_documents(h) for h in hits], [gold for _, gold in queries]
    )
    return {
        **mean_metrics(per_query),
        "n": len(queries),
        "unknown_relevant_ids": missing,
    }, per_query


def print_comparison(first: str, other: str, comparison: dict[str, dict[str, float]], n: int):
    print(f"{first} - {other}, paired over {n} queries "
          "(difference of means [95% bootstrap interval], randomization test p):")  # fmt: skip
    for name, c in comparison.items():
        print(f"  {name:10s} {c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]  "
              f"p={c['p']:.4f}")  # fmt: skip


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    context: str | None  # the gold passage (oracle mode)
    title: str = ""
    doc_id: str | None = None  # the gold document's id: oracle mode reads it from the index


def read_questions(path: str, limit: int = 0) -> list[Question]:
    """The QA rows; a bad row is a one-line error naming it."""
    rows = []
    for where, row in located_records(path)[: limit or None]:
        question, answers, context = row.get("question"), row.get("answers"), row.get("context")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: no 'question' text")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise ConfigError(f"{where}: 'answers' must list the gold answers")
        if context is not None and not isinstance(context, str):
            raise ConfigError(f"{where}: 'context' must be the gold passage's text")
        doc_id = row.get("doc_id")
        rows.append(Question(question, [str(a) for a in answers], context,
                             str(row.get("title") or ""),
                             None if doc_id is None else str(doc_id)))  # fmt: skip
    return rows


def gold_passages(rows: list[Question], index: Index | None) -> list[Hit]:
    """Each row's gold passage as the one source of oracle mode: its `context`, else its
    `doc_id`'s whole text rebuilt from the index's chunks (by their offsets: chunks overlap)."""
    need = {r.doc_id for r in rows if r.context is None}
    if None in need:
        raise ConfigError("--mode oracle needs each row's gold passage in 'context' or 'doc_id'")
    texts: dict[str, tuple[str, str]] = {}  # doc id -> (title, text)
    if need:
        if index is None:
            raise ConfigError("--mode oracle with 'doc_id' rows (no 'context') needs --index")
        reached: dict[str, int] = {}  # doc id -> the offset its text so far ends at
        chunks = sorted((c for c in index.chunks() if c.doc_id in need), key=lambda c: c.start)
        for c in chunks:
            title, text = texts.get(c.doc_id, (c.title, ""))
            end = reached.get(c.doc_id, 0)
            if c.end > end or not text:
                tail = c.text[max(0, end - c.start) :]  # past the overlap with what we have
                text = f"{text} {tail}" if text and c.start >= end else text + tail
                reached[c.doc_id] = c.end
            texts[c.doc_id] = (title, text)
        missing = sorted(str(d) for d in need - texts.keys())
        if missing:
            raise ConfigError(f"{index.path} has no document {missing[0]!r} (oracle 'doc_id')")
    out = []
    for r in rows:
        title, text = (r.title, r.context) if r.context is not None else texts[str(r.doc_id)]
        out.append(Hit("gold", r.doc_id or "gold", title or r.title, "", 0, len(text), text,
                       1.0, 1, None, None))  # fmt: skip
    return out


def rag_sources(
    rows: list[Question],
    mode: str,
    index: Index | None,
    k: int,
    dense_weight: float = DENSE_WEIGHT,
) -> list[list[Hit]]:
    """Each question's sources in `mode`: none (closed-book), its k best chunks (retrieved) or
    its gold passage (oracle)."""
    if mode not in RAG_MODES:
        raise ConfigError(f"--mode for eval rag is one of {', '.join(RAG_MODES)}, got {mode!r}")
    if mode == "closed-book":
        return [[] for _ in rows]
    if mode == "oracle":
        return [[g] for g in gold_passages(rows, index)]
    if index is None:
        raise ConfigError("--mode retrieved needs --index")
    # Every question gets its k best chunks (hybrid search, as serving does), with no
    # threshold: that is a server's choice of when to refuse, and would hide what is found.
    return index.search_many([r.question for r in rows], k, "hybrid", dense_weight)


def rag_messages(
    rows: list[Question],
    mode: str,
    index: Index | None,
    k: int,
    dense_weight: float = DENSE_WEIGHT,
) -> tuple[list[list[dict[str, str]]], list[list[Hit]]]:
    """Each question's chat messages in `mode` (the prompt `chat/serve --retrieval` build,
    the question alone in closed-book mode), and its sources."""
    sources = rag_sources(rows, mode, index, k, dense_weight)
    asks = [[{"role": "user", "content": QUESTION.format(question=r.question)}] for r in rows]
    if mode == "closed-book":
        return asks, sources
    return [grounded_messages(m, h) for m, h in zip(asks, sources, strict=True)], sources


def eval_rag(
    lm,
    rows: list[Question],
    mode: str,
    index: Index | None,
    k: int,
    max_new_tokens: int,
    dense_weight: float = DENSE_WEIGHT,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(EM and F1 on a 0-100 scale, n, and in retrieved mode the share of questions whose
    gold document is among the sources), and each question's answer and sources."""
    from .chat_template import chat_prompt, turn_stops

    tok = lm.tokenizer
    messages, sources = rag_messages(rows, mode, index, k, dense_weight)
    prompts = [chat_prompt(tok, m) for m in messages]
    # Batches of similar length pad little: generate shortest first, answer in row order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    batch = 8
    for start in tqdm(range(0, len(order), batch), desc=f"rag {mode}", unit="batch"):
        part = order[start : start + batch]
        texts = lm.generate(
            [prompts[i] for i in part],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop=turn_stops(tok),
        )
        for i, text in zip(part, texts, strict=True):
            answers[i] = text
    em = f1 = contained = 0.0
    out = []
    for row, answer, hits in zip(rows, answers, sources, strict=True):
        answer = CITATION.sub("", answer).strip()
        e, f = squad_scores(answer, row.answers)
        c = contains_answer(answer, row.answers)
        em, f1, contained = em + e, f1 + f, contained + c
        out.append({"question": row.question, "answer": answer, "gold": row.answers,
                    "exact_match": e, "f1": f, "contains": c, "doc_id": row.doc_id,
                    "sources": [h.doc_id for h in hits]})  # fmt: skip
    n = len(rows)
    results: dict[str, Any] = {
        "exact_match": 100 * em / n,
        "f1": 100 * f1 / n,
        "contains": 100 * contained / n,
        "n": n,
    }
    known = [a for a in out if a["doc_id"] is not None]
    if mode == "retrieved" and known:
        # Retrieved can only beat closed-book where the gold passage was found.
        found = sum(a["doc_id"] in a["sources"] for a in known)
        results[f"gold_in_top{k}"] = 100 * found / len(known)
    return results, out


def cmd_eval_rag(args: argparse.Namespace) -> None:
    if len(args.data) != 1:
        raise ConfigError(f"eval {args.task} reads one data file, got {len(args.data)}")
    data = args.data[0]
    if args.task == "retrieval":
        if args.index is None:
            raise ConfigError("eval retrieval needs --index (from gptkit index)")
        modes = (args.mode or ",".join(MODES)).split(",")
        for mode in modes:
            if mode not in MODES:
                raise ConfigError(f"unknown search mode {mode!r}; use {', '.join(MODES)}")
        if args.k is not None:
            raise ConfigError("eval retrieval scores recall@1/5/10 and MRR over the top 50: no -k")
        queries = read_queries(data)[: args.limit or None]
        index = Index.open(args.index, device=args.device)
        scored = {m: eval_retrieval(index, queries, m, args.dense_weight) for m in modes}
        results = {m: summary for m, (summary, _) in scored.items()}
        names = [n for n in results[modes[0]] if n != "n"]
        print(f"retrieval: {data} ({len(queries)} queries, {index.summary()})")
        print(f"{'mode':8s} " + " ".join(f"{n:>10s}" for n in names))
        for mode, r in results.items():
            print(f"{mode:8s} " + " ".join(f"{r[n]:10.4f}" for n in names))
        # The first mode (hybrid by default) against each other one, query by query (a
        # bootstrap needs two queries at least).
        first, comparisons = modes[0], {}
        for other in modes[1:] if len(queries) > 1 else ():
            comparison = paired_comparison(scored[first][1], scored[other][1])
            comparisons[f"{first} - {other}"] = comparison
            print_comparison(first, other, comparison, len(queries))
        if args.out:
            save_results({"task": "retrieval", "index": str(args.index), **results,
                          "comparisons": comparisons}, args.out)  # fmt: skip
        return
    from .api import load

    mode = args.mode or "retrieved"
    if not args.model:
        raise ConfigError("eval rag needs --model")
    if mode not in RAG_MODES:  # checked before the model loads, as is everything below
        raise ConfigError(f"--mode for eval rag is one of {', '.join(RAG_MODES)}, got {mode!r}")
    if mode == "retrieved" and not args.index:
        raise ConfigError("--mode retrieved needs --index")
    k = 3 if args.k is None else args.k
    if k < 1:
        raise ConfigError(f"-k (sources per question) must be at least 1, got {k}")
    check_dense_weight(args.dense_weight)
    rows = read_questions(data, args.limit)
    # The index serves retrieved mode, and oracle rows that name their gold document by id.
    wanted = mode == "retrieved" or (mode == "oracle" and any(r.context is None for r in rows))
    index = Index.open(args.index, device=args.device) if args.index and wanted else None
    if mode == "oracle":
        gold_passages(rows, index)  # a gold passage missing fails here, not after loading
    lm = load(args.model, device=args.device, adapter=args.adapter, quantize=args.quantize)
    new_tokens = args.max_new_tokens or 64
    results, answers = eval_rag(lm, rows, mode, index, k, new_tokens, args.dense_weight)
    shown = f", k={k}" if mode == "retrieved" else ""
    print(format_table(results, title=f"rag ({mode}{shown}): {data}"))
    if args.out:
        save_results({"task": "rag", "mode": mode, "model": args.model, **results}, args.out)
        Path(args.out).with_suffix(".answers.jsonl").write_text(
            "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
        )
        print(f"saved to {args.out}")
