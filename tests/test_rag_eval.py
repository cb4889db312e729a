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
from gptkit.rag_eval import Question, rag_messages, ranked_documents, retrieval_metrics

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


def test_ranked_documents_keep_each_documents_best_rank():
    from gptkit.rag_index import Hit

    hits = [Hit(f"{d}#{i}", d, "", "", 0, 0, "", 0.0, r, None, None)
            for r, (d, i) in enumerate([("a", 0), ("b", 0), ("a", 1), ("c", 0)], 1)]  # fmt: skip
    assert ranked_documents(hits) == ["a", "b", "c"]


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


def test_rag_prompts_of_each_mode():
    rows = [Question("Where is the tower?", ["Paris"], "The tower stands in Paris.", "Tower")]
    closed = rag_messages(rows, "closed-book", None, 3)[0]
    assert [m["role"] for m in closed] == ["user"] and "Where is the tower?" in closed[0]["content"]
    oracle = rag_messages(rows, "oracle", None, 3)[0]
    assert (
        oracle[0]["role"] == "system"
        and "[1] Tower\nThe tower stands in Paris." in oracle[0]["content"]
    )
    with pytest.raises(ValueError, match="needs --index"):
        rag_messages(rows, "retrieved", None, 3)
    with pytest.raises(ValueError, match="needs each row's gold passage"):
        rag_messages([Question("q", ["a"], None)], "oracle", None, 3)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    from test_rag_index import write_docs

    root = tmp_path_factory.mktemp("rag-eval")
    assert main(["index", str(write_docs(root / "docs")), "--out", str(root / "idx")]) == 0
    return root


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

    queries.write_text('{"query": "x"}\n')
    assert main(argv) == 2
    assert "row 1: 'relevant' must list" in capsys.readouterr().err


def test_eval_rag_cli_scores_every_mode(small_index, capsys):
    lm = tiny_chat_lm(block_size=1024)
    save_checkpoint(small_index / "model", lm.model, lm.tokenizer)
    qa = small_index / "qa.jsonl"
    rows = [
        {
            "question": "What is the SWIFT fee?",
            "answers": ["25 dollars"],
            "context": "The fee is 25 dollars.",
        },
        {"question": "When do branches open?", "answers": "9am", "context": "At 9am."},
    ]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for mode in ("closed-book", "retrieved", "oracle"):
        out = small_index / f"{mode}.json"
        argv = ["eval", "rag", "--model", str(small_index / "model"), "--data", str(qa),
                "--index", str(small_index / "idx"), "--mode", mode, "-k", "2",
                "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        assert "exact_match" in capsys.readouterr().out
        saved = json.loads(out.read_text())
        assert saved["n"] == 2 and 0 <= saved["f1"] <= 100 and saved["mode"] == mode
        answers = [json.loads(line) for line in out.with_suffix(".answers.jsonl").open()]
        assert [a["gold"] for a in answers] == [["25 dollars"], ["9am"]]
    assert main([*argv[:-2], "--mode", "open-book"]) == 2
    assert "closed-book, retrieved, oracle" in capsys.readouterr().err
