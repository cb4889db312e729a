"""`gptkit eval retrieval` and `gptkit eval rag`: how well an index finds what a question
needs, and how much the found text helps a model answer.

    gptkit eval retrieval --index runs/idx --data queries.jsonl      # {"query", "relevant": [ids]}
    gptkit eval rag --model M --index runs/idx --data qa.jsonl --mode retrieved -k 3
                                                   # {"question", "answers": [...], "context"?}

Retrieval is scored on documents, not chunks: a query's ranked chunks become its ranked
documents (each at its best chunk's rank). recall@k = the share of the query's relevant
documents in its top k; MRR = 1 / the rank of the first relevant one (0 if none in the top
DEPTH chunks); nDCG@10 with binary gains. Each is the mean over queries.

`eval rag` asks for a short answer, greedily, through the model's chat template:
closed-book (the question alone), retrieved (the top k chunks as numbered sources, the prompt
`chat/serve --retrieval` build, rag.grounded_messages) or oracle (the gold passage, the row's
`context`, as the only source). Answers are scored with SQuAD v1.1's exact match and F1
(evaluate.squad_scores) after citation marks like "[1]" are removed: the gain of retrieved
over closed-book is what the index adds, and oracle bounds it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import ConfigError
from .evaluate import format_table, save_results, squad_scores
from .rag import grounded_messages
from .rag_index import MODES, Hit, Index
from .taskdata import read_records

KS = (1, 5, 10)
DEPTH = 50  # chunks searched per query: enough to fill 10 distinct documents
RAG_MODES = ("closed-book", "retrieved", "oracle")
QUESTION = "{question}\nAnswer with a few words only."
CITATION = re.compile(r"\s*\[\d+\]")


def ranked_documents(hits: list[Hit]) -> list[str]:
    """The hits' document ids in rank order, each once."""
    return list(dict.fromkeys(h.doc_id for h in hits))


def retrieval_metrics(ranked: list[list[str]], relevant: list[set[str]]) -> dict[str, float]:
    """recall@1/5/10, MRR and nDCG@10 of ranked document ids, averaged over queries."""
    n = len(ranked)
    totals = dict.fromkeys([*(f"recall@{k}" for k in KS), "mrr", "ndcg@10"], 0.0)
    for docs, gold in zip(ranked, relevant, strict=True):
        for k in KS:
            totals[f"recall@{k}"] += len(gold.intersection(docs[:k])) / len(gold)
        first = next((i for i, d in enumerate(docs, 1) if d in gold), None)
        totals["mrr"] += 1 / first if first else 0.0
        dcg = sum(1 / math.log2(i + 1) for i, d in enumerate(docs[:10], 1) if d in gold)
        ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(gold), 10) + 1))
        totals["ndcg@10"] += dcg / ideal
    return {name: value / n for name, value in totals.items()}


def read_queries(path: str) -> list[tuple[str, set[str]]]:
    rows = []
    for n, row in enumerate(read_records(Path(path)), 1):
        query, relevant = row.get("query"), row.get("relevant")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError(f"{path} row {n}: no 'query' text")
        if not isinstance(relevant, list) or not relevant:
            raise ConfigError(f"{path} row {n}: 'relevant' must list the relevant document ids")
        rows.append((query, {str(r) for r in relevant}))
    if not rows:
        raise ConfigError(f"{path}: no queries")
    return rows


def eval_retrieval(index: Index, queries: list[tuple[str, set[str]]], mode: str) -> dict:
    """The metrics of one search mode, and how many relevant ids the index lacks."""
    known = set(index.document_ids())
    missing = sum(len(gold - known) for _, gold in queries)
    hits = index.search_many([q for q, _ in queries], k=min(DEPTH, len(index)), mode=mode)
    ranked = [ranked_documents(h) for h in hits]
    metrics = retrieval_metrics(ranked, [gold for _, gold in queries])
    return {**metrics, "n": len(queries), "unknown_relevant_ids": missing}


@dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    context: str | None  # the gold passage (oracle mode)
    title: str = ""


def read_questions(path: str, limit: int = 0) -> list[Question]:
    rows = []
    for n, row in enumerate(read_records(Path(path))[: limit or None], 1):
        question, answers = row.get("question"), row.get("answers")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{path} row {n}: no 'question' text")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise ConfigError(f"{path} row {n}: 'answers' must list the gold answers")
        rows.append(Question(question, [str(a) for a in answers], row.get("context"),
                             str(row.get("title") or "")))  # fmt: skip
    if not rows:
        raise ConfigError(f"{path}: no questions")
    return rows


def rag_messages(
    rows: list[Question], mode: str, index: Index | None, k: int
) -> list[list[dict[str, str]]]:
    """Each question's chat messages in `mode`."""
    if mode not in RAG_MODES:
        raise ConfigError(f"--mode for eval rag is one of {', '.join(RAG_MODES)}, got {mode!r}")
    asks = [[{"role": "user", "content": QUESTION.format(question=r.question)}] for r in rows]
    if mode == "closed-book":
        return asks
    if mode == "oracle":
        if any(r.context is None for r in rows):
            raise ConfigError("--mode oracle needs each row's gold passage in 'context'")
        gold = [Hit("gold", "gold", r.title, "", 0, 0, r.context, 1.0, 1, None, None) for r in rows]
        return [grounded_messages(m, [g]) for m, g in zip(asks, gold, strict=True)]
    if index is None:
        raise ConfigError("--mode retrieved needs --index")
    # Every question gets its k best chunks (hybrid search, as serving does), with no
    # threshold: that is a server's choice of when to refuse, and would hide what is found.
    hits = index.search_many([r.question for r in rows], k=k, mode="hybrid")
    return [grounded_messages(m, h) for m, h in zip(asks, hits, strict=True)]


def eval_rag(
    lm, rows: list[Question], mode: str, index: Index | None, k: int, max_new_tokens: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(EM, F1 on a 0-100 scale, n), and each question's answer."""
    from .chat_template import CHATML, render, turn_stops

    tok = lm.tokenizer
    names = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    template = tok.chat_template or CHATML
    prompts = [
        render(m, template, add_generation_prompt=True, **names)
        for m in rag_messages(rows, mode, index, k)
    ]
    answers: list[str] = []
    batch = 8
    for start in tqdm(range(0, len(prompts), batch), desc=f"rag {mode}", unit="batch"):
        answers += lm.generate(
            prompts[start : start + batch],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop=turn_stops(tok),
        )
    em = f1 = 0.0
    out = []
    for row, answer in zip(rows, answers, strict=True):
        answer = CITATION.sub("", answer).strip()
        e, f = squad_scores(answer, row.answers)
        em, f1 = em + e, f1 + f
        out.append({"question": row.question, "answer": answer, "gold": row.answers,
                    "exact_match": e, "f1": f})  # fmt: skip
    n = len(rows)
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "n": n}, out


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
        queries = read_queries(data)[: args.limit or None]
        index = Index.open(args.index, device=args.device)
        results = {mode: eval_retrieval(index, queries, mode) for mode in modes}
        names = [n for n in results[modes[0]] if n != "n"]
        print(f"retrieval: {data} ({len(queries)} queries, {index.summary()})")
        print(f"{'mode':8s} " + " ".join(f"{n:>10s}" for n in names))
        for mode, r in results.items():
            print(f"{mode:8s} " + " ".join(f"{r[n]:10.4f}" for n in names))
        if args.out:
            save_results({"task": "retrieval", "index": str(args.index), **results}, args.out)
        return
    from .api import load

    mode = args.mode or "retrieved"
    if not args.model:
        raise ConfigError("eval rag needs --model")
    rows = read_questions(data, args.limit)
    k = args.k or 3
    index = (
        Index.open(args.index, device=args.device) if args.index and mode == "retrieved" else None
    )
    lm = load(args.model, device=args.device, adapter=args.adapter, quantize=args.quantize)
    results, answers = eval_rag(lm, rows, mode, index, k, args.max_new_tokens)
    print(format_table(results, title=f"rag ({mode}{f', k={k}' if index else ''}): {data}"))
    if args.out:
        save_results({"task": "rag", "mode": mode, "model": args.model, **results}, args.out)
        Path(args.out).with_suffix(".answers.jsonl").write_text(
            "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
        )
        print(f"saved to {args.out}")
