"""`gptkit eval retrieval` and `gptkit eval rag`: the metrics on cases worked by hand, and
both commands end to end on a small real index."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_chat_lm

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.evaluate import squad_scores
from gptkit.rag_eval import (
    Question,
    contains_answer,
    gold_passages,
    paired_comparison,
    per_query_metrics,
    rag_messages,
    ranked_documents,
    retrieval_metrics,
)

pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install '.[rag]'")


def test_retrieval_metrics_by_hand():
    ranked = [["a", "x", "b"], ["x", "y", "z"], ["c"]]
    relevant = [{"a", "b"}, {"q"}, {"c"}]
    m = retrieval_metrics(ranked, relevant)
    assert m["recall@1"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["recall@5"] == pytest.approx((2 / 2 + 0 + 1) / 3)
    assert m["mrr"] == pytest.approx((1 + 0 + 1) / 3)
    # query 1: gains at ranks 1 and 3 over the ideal ranks 1 and 2
    first = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((first + 0 + 1) / 3)
    assert set(retrieval_metrics(ranked, relevant, ks=(2,))) == {"recall@2", "mrr", "ndcg@10"}
    assert retrieval_metrics(ranked, relevant, ks=(2,))["recall@2"] == pytest.approx(1 / 6 + 1 / 3)


def test_recall_is_capped_by_more_relevant_documents_than_k():
    # 4 relevant, all ranked first: recall@1 can only be 1/4; nDCG is perfect.
    m = retrieval_metrics([["a", "b", "c", "d", "x"]], [{"a", "b", "c", "d"}])
    assert m["recall@1"] == 0.25 and m["recall@5"] == 1.0 and m["ndcg@10"] == pytest.approx(1.0)


def test_ranked_documents_keep_each_documents_best_rank():
    from gptkit.rag_index import Hit

    hits = [Hit(f"{d}#{i}", d, "", "", 0, 0, "", 0.0, r, None, None)
            for r, (d, i) in enumerate([("a", 0), ("b", 0), ("a", 1), ("c", 0)], 1)]  # fmt: skip
    assert ranked_documents(hits) == ["a", "b", "c"]
    # a's second chunk does not take a rank: c is the 3rd document, not the 4th
    assert retrieval_metrics([ranked_documents(hits)], [{"c"}], ks=(3,))["recall@3"] == 1.0


def test_paired_comparison_separates_a_real_gain_from_noise():
    relevant = [{f"d{i}"} for i in range(60)]
    # a ranks every query's document first; b ranks it second on 40 queries, first on 20
    a = per_query_metrics([[f"d{i}", "x"] for i in range(60)], relevant)
    b = per_query_metrics([["x", f"d{i}"] if i < 40 else [f"d{i}"] for i in range(60)], relevant)
    better = paired_comparison(a, b, resamples=2000)
    assert better["recall@1"]["difference"] == pytest.approx(40 / 60)
    assert better["recall@1"]["p"] < 0.01 and better["recall@1"]["low"] > 0
    assert better["recall@5"] == {"difference": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}
    assert paired_comparison(b, a, resamples=2000)["mrr"]["high"] < 0  # the sign follows a - b
    # c wins on 10 queries and loses on 10: no difference to find
    c = per_query_metrics([["x", f"d{i}"] if i >= 50 else [f"d{i}"] for i in range(60)], relevant)
    d = per_query_metrics([["x", f"d{i}"] if i < 10 else [f"d{i}"] for i in range(60)], relevant)
    tie = paired_comparison(c, d, resamples=2000)
    assert tie["recall@1"]["difference"] == 0 and tie["recall@1"]["p"] > 0.5
    assert tie["recall@1"]["low"] < 0 < tie["recall@1"]["high"]
    assert paired_comparison(c, d, resamples=2000) == tie  # seeded
    with pytest.raises(ValueError, match="two queries or more"):
        paired_comparison(a[:1], b[:1])


@pytest.mark.parametrize(
    "prediction, answers, em, f1",
    [
        ("The Eiffel Tower!", ["Eiffel Tower"], 1.0, 1.0),  # articles and punctuation go
        ("in Paris France", ["Paris"], 0.0, 0.5),  # P 1/3, R 1
        ("Denver Broncos", ["Carolina Panthers", "Denver Broncos"], 1.0, 1.0),  # best gold
        ("", ["anything"], 0.0, 0.0),
    ],
)
def test_squad_scores(prediction, answers, em, f1):
    assert squad_scores(prediction, answers) == (em, pytest.approx(f1))


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("The currency of Mongolia is the tögrög.", ["tögrög"], True),
        ("It was the Eiffel Tower, in Paris.", ["Eiffel Tower"], True),
        ("Six Grammys", ["six", "Lady Gaga"], True),
        ("Sixteen", ["six"], False),  # whole words only
        ("Tower Eiffel", ["Eiffel Tower"], False),  # in order
        ("the", ["the"], False),  # a gold answer that normalises to nothing matches nothing
    ],
)
def test_contains_answer(prediction, answers, expected):
    assert contains_answer(prediction, answers) is expected


def test_rag_prompts_of_each_mode():
    rows = [Question("Where is the tower?", ["Paris"], "The tower stands in Paris.", "Tower")]
    closed = rag_messages(rows, "closed-book", None, 3)[0][0]
    assert [m["role"] for m in closed] == ["user"] and "Where is the tower?" in closed[0]["content"]
    oracle = rag_messages(rows, "oracle", None, 3)[0][0]
    assert (
        oracle[0]["role"] == "system"
        and "[1] Tower\nThe tower stands in Paris." in oracle[0]["content"]
    )
    with pytest.raises(ValueError, match="needs --index"):
        rag_messages(rows, "retrieved", None, 3)
    with pytest.raises(ValueError, match="needs each row's gold passage"):
        rag_messages([Question("q", ["a"], None)], "oracle", None, 3)
    with pytest.raises(ValueError, match="'doc_id' rows .* needs --index"):
        rag_messages([Question("q", ["a"], None, doc_id="d")], "oracle", None, 3)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from test_rag_index import write_docs

    root = tmp_path_factory.mktemp("rag-eval")
    assert main(["index", str(write_docs(root / "docs")), "--out", str(root / "idx")]) == 0
    # One long document cut into overlapping chunks: oracle rows that give only its id.
    long = root / "long" / "guide.jsonl"
    long.parent.mkdir()
    long.write_text(json.dumps({"id": "guide", "title": "Guide", "text": LONG}) + "\n")
    argv = ["index", str(long), "--out", str(root / "idx-small"), "--chunk-tokens", "12",
            "--overlap", "4"]  # fmt: skip
    assert main(argv) == 0
    return root


LONG = " ".join(
    f"Step {n}: press the button marked {chr(65 + n)} and wait for the green light."
    for n in range(8)
)


def test_oracle_rebuilds_a_documents_text_from_its_overlapping_chunks(small_index):
    from gptkit.rag_index import Index

    index = Index.open(small_index / "idx-small")
    chunks = [c for c in index.chunks() if c.doc_id == "guide"]
    assert len(chunks) > 3 and chunks[1].start < chunks[0].end  # cut, with overlap
    [gold] = gold_passages([Question("q", ["a"], None, doc_id="guide")], index)
    assert gold.text == LONG and gold.title == "Guide" and gold.doc_id == "guide"
    with pytest.raises(ValueError, match="has no document 'nope'"):
        gold_passages([Question("q", ["a"], None, doc_id="nope")], index)


def test_eval_retrieval_cli(small_index, capsys):
    queries = small_index / "queries.jsonl"
    rows = [
        {"query": "SWIFT fee", "relevant": ["wire"]},
        {"query": "when are you open on the weekend", "relevant": ["hours", "nope"]},
    ]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = small_index / "retrieval.json"
    argv = ["eval", "retrieval", "--index", str(small_index / "idx"), "--data", str(queries)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "recall@5" in printed and all(mode in printed for mode in ("hybrid", "dense", "bm25"))
    saved = json.loads(out.read_text())
    assert saved["dense"]["recall@5"] == pytest.approx(0.75)  # "nope" is in no document
    assert saved["dense"]["unknown_relevant_ids"] == 1 and saved["dense"]["n"] == 2
    assert "hybrid - dense, paired over 2 queries" in printed
    assert set(saved["comparisons"]) == {"hybrid - dense", "hybrid - bm25"}
    assert set(saved["comparisons"]["hybrid - bm25"]["mrr"]) == {"difference", "low", "high", "p"}
    queries.write_text(json.dumps(rows[0]) + "\n")  # one query: scores, nothing to compare
    assert main(argv) == 0
    assert "recall@5" in (printed := capsys.readouterr().out) and "paired" not in printed

    queries.write_text('{"query": "x", "relevant": ["wire"]}\n\n{"query": "x"}\n')
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "queries.jsonl record 2 (line 3): 'relevant' must list the relevant document ids"
    )
    assert len(err.splitlines()) == 1


def test_eval_rag_cli_scores_every_mode(small_index, capsys):
    lm = tiny_chat_lm(block_size=1024)
    save_checkpoint(small_index / "model", lm.model, lm.tokenizer)
    qa = small_index / "qa.jsonl"
    # Row 1 names its gold document (oracle reads it from the index), row 2 gives its passage.
    rows = [
        {"question": "What is the SWIFT fee?", "answers": ["25 dollars"], "doc_id": "wire"},
        {"question": "When do branches open?", "answers": "9am", "context": "At 9am."},
    ]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids = {"pin", "dispute", "wire", "savings", "hours"}
    for mode in ("closed-book", "retrieved", "oracle"):
        out = small_index / f"{mode}.json"
        argv = ["eval", "rag", "--model", str(small_index / "model"), "--data", str(qa),
                "--index", str(small_index / "idx"), "--mode", mode, "-k", "2",
                "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert "exact_match" in printed and f"rag ({mode}" in printed
        saved = json.loads(out.read_text())
        assert saved["n"] == 2 and 0 <= saved["f1"] <= 100 and saved["mode"] == mode
        answers = [json.loads(line) for line in out.with_suffix(".answers.jsonl").open()]
        assert [a["gold"] for a in answers] == [["25 dollars"], ["9am"]]
        assert all(isinstance(a["answer"], str) and 0 <= a["f1"] <= 1 for a in answers)
        assert 0 <= saved["contains"] <= 100 and "contains" in printed
        sources = [a["sources"] for a in answers]
        if mode == "closed-book":
            assert sources == [[], []] and "gold_in_top2" not in saved
        elif mode == "retrieved":
            assert all(len(s) == 2 and set(s) <= ids for s in sources)
            assert saved["gold_in_top2"] == 100.0  # the SWIFT question finds the wire page
        else:
            assert sources == [["wire"], ["gold"]]
    from gptkit.rag_index import Index

    # --dense-weight 0 retrieves in BM25's order
    bm25 = Index.open(small_index / "idx")
    retrieved = [*argv[:-2], "--mode", "retrieved", "--dense-weight", "0", "--out", str(out)]
    assert main(retrieved) == 0
    capsys.readouterr()
    answers = [json.loads(line) for line in out.with_suffix(".answers.jsonl").open()]
    for row, answer in zip(rows, answers, strict=True):
        assert answer["sources"][0] == bm25.search(row["question"], k=1, mode="bm25")[0].doc_id
    assert main([*retrieved[:-2], "--dense-weight", "2"]) == 2
    assert "the dense weight is between 0 and 1, got 2.0" in capsys.readouterr().err
    assert main([*argv[:-2], "--mode", "open-book"]) == 2
    assert "closed-book, retrieved, oracle" in capsys.readouterr().err
    qa.write_text(json.dumps({"question": "q", "answers": ["a"], "doc_id": "nope"}) + "\n")
    assert main([*argv[:-2], "--mode", "oracle"]) == 2
    assert "has no document 'nope'" in capsys.readouterr().err
    qa.write_text(json.dumps({"question": "q", "answers": []}) + "\n")
    assert main(argv) == 2
    assert "qa.jsonl record 1 (line 1): 'answers' must list" in capsys.readouterr().err
