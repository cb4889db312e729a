"""The retrieval index: reading and chunking documents, building and searching (dense, BM25,
hybrid) with the real all-MiniLM-L6-v2, updates that re-embed nothing old, and damaged files
refused in one line."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_chat_lm

from gptkit.cli import main
from gptkit.rag_docs import Document, DocumentError, chunk_document, read_documents

pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install '.[rag]'")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking-kb"

# Five short documents of distinct subjects: each query below has one right answer.
DOCS = [
    {"id": "pin", "title": "Resetting your card PIN",
     "text": "Forgot your PIN? Open the app, choose Cards, then Reset PIN. A new PIN works at "
             "once at every cash machine."},
    {"id": "dispute", "title": "Disputing a transaction",
     "text": "If a charge on your statement is wrong, file a dispute within 60 days. We refund "
             "the amount while the merchant answers."},
    {"id": "wire", "title": "International wire transfers",
     "text": "Send money abroad with a SWIFT transfer. The fee is 25 dollars and funds arrive in "
             "two to four business days."},
    {"id": "savings", "title": "High-yield savings",
     "text": "Our savings account pays 4.1 percent APY with no minimum balance and no monthly "
             "fee."},
    {"id": "hours", "title": "Branch opening hours",
     "text": "Branches open 9am to 5pm on weekdays and 9am to noon on Saturdays."},
]  # fmt: skip
QUERIES = {
    "I can't remember the code for my debit card": "pin",
    "a payment I never made shows up on my bill": "dispute",
    "SWIFT fee": "wire",
    "what interest rate do I get on money I put aside?": "savings",
    "when are you open on the weekend": "hours",
}


@pytest.fixture(scope="module")
def embedder():
    from gptkit.embed import load_embedder

    return load_embedder("minilm")


@pytest.mark.parametrize("faster", [True, False])
def test_the_sentence_embedder_multiplies_through_onednn_where_it_is_faster(faster, monkeypatch):
    # where this machine measured oneDNN faster, BERT's linear layers go through it, and the
    # vectors are sentence-transformers' own up to float rounding
    import torch
    from sentence_transformers import SentenceTransformer

    from gptkit import embed
    from gptkit.onednn import OneDNNLinear

    monkeypatch.setattr(embed, "onednn_is_faster", lambda: faster)
    ours = embed.SentenceEmbedder()
    kinds = {type(m) for m in ours.model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == ({OneDNNLinear} if faster else {torch.nn.Linear})
    texts = list(QUERIES)
    plain = SentenceTransformer(str(embed.model_dir(embed.DEFAULT)), device="cpu")
    expected = plain.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(ours.encode(texts), expected, atol=1e-5)


def write_docs(folder: Path, docs=DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture()
def index(tmp_path, embedder):
    from gptkit.rag_index import build_index

    return build_index([write_docs(tmp_path / "docs")], tmp_path / "idx", embedder)


# --- documents and chunks ------------------------------------------------------------------


def test_read_documents_of_every_format(tmp_path):
    (tmp_path / "a.md").write_text("intro\n\n## Fees and limits\n\nNo fees.")
    (tmp_path / "b.txt").write_text("plain text")
    (tmp_path / "c.html").write_text(
        "<html><head><title>Card  help</title><script>var x = 'hidden';</script></head>"
        "<body><p>Call us.</p><style>p {}</style><p>Any time.</p></body></html>"
    )
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        json.dump([{"id": 7, "title": "T", "content": "from content"}], f)
    (tmp_path / "e.jsonl").write_text('{"text": "row one"}\n\n{"text": "row two", "id": "x"}\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "tasks.json").write_text('[{"id": 1, "question": "not a document"}]')
    docs, skipped = read_documents([tmp_path])
    by_id = {d.id: d for d in docs}
    assert sorted(p.name for p in skipped) == ["image.png", "tasks.json"]
    with pytest.raises(DocumentError, match="no text in field 'content'"):
        read_documents([tmp_path / "tasks.json"])  # named: refused, not skipped
    assert by_id["a.md"].title == "Fees and limits" and by_id["b.txt"].title == "b"
    page = by_id["c.html"]
    assert page.title == "Card help" and "hidden" not in page.text and "p {}" not in page.text
    assert "Call us." in page.text and "Any time." in page.text
    assert by_id["7"].text == "from content" and by_id["7"].title == "T"
    assert by_id["e.jsonl:1"].text == "row one" and by_id["x"].text == "row two"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"text": "ok"}\n{"text": \n', r"a\.jsonl:2: not JSON"),
        ("b.jsonl", '{"body": "no text field"}\n', r"b\.jsonl:1: no text in field 'content'"),
        ("c.json", "[1, 2]", r"c\.json\[1\]: a document must be a JSON object"),
        ("d.txt", b"\xff\xfe bad", r"d\.txt is not UTF-8"),
        ("e.pdf", b"%PDF", r"cannot index \.pdf files"),
    ],
)
def test_unreadable_documents_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DocumentError, match=message):
        read_documents([path])


def test_duplicate_document_ids_are_refused(tmp_path):
    write_docs(tmp_path / "one")
    write_docs(tmp_path / "two")
    with pytest.raises(DocumentError, match="document id 'pin' appears twice"):
        read_documents([tmp_path / "one", tmp_path / "two"])


def test_chunks_cut_between_words_within_size_and_overlap(embedder):
    words = " ".join(f"word{i} unbelievably-long{i}" for i in range(300))
    doc = Document("d", "t", "src", "  " + words + "\n")
    chunks = chunk_document(doc, embedder.count_tokens, size=50, overlap=10)
    assert len(chunks) > 5
    for chunk in chunks:
        assert chunk.text == doc.text[chunk.start : chunk.end]
        assert not doc.text[chunk.start - 1].strip() and not doc.text[chunk.end].strip()
        assert sum(embedder.count_tokens(chunk.text.split())) <= 50
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start < a.end  # consecutive chunks overlap
        shared = sum(embedder.count_tokens(doc.text[b.start : a.end].split()))
        assert 0 < shared <= 10
    assert chunks[0].start == 2 and chunks[-1].end == len(doc.text) - 1  # all the text
    assert [c.id for c in chunks[:2]] == ["d#0", "d#1"]


def test_a_word_longer_than_a_chunk_stands_alone():
    doc = Document("d", "", "", "a " + "x" * 50 + " b")
    chunks = chunk_document(doc, lambda ws: [len(w) for w in ws], size=10, overlap=2)
    assert [c.text for c in chunks] == ["a", "x" * 50, "b"]


# --- search --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, within", [("dense", 1), ("hybrid", 2)])
def test_semantic_queries_find_their_document(index, mode, within):
    """Dense search ranks the paraphrased document first. Hybrid keeps it in the top 2: a
    document that BM25 also ranks (on a shared word such as "money") can pass it."""
    for query, doc_id in QUERIES.items():
        hits = index.search(query, k=2, mode=mode)
        assert doc_id in [h.doc_id for h in hits[:within]], (query, [h.doc_id for h in hits])
        assert all(h.dense is not None and -1 <= h.dense <= 1 for h in hits)
        assert [h.rank for h in hits] == [1, 2]


def test_bm25_matches_words_and_ignores_unknown_ones(index):
    hits = index.search("SWIFT transfer fee", k=3, mode="bm25")
    assert hits[0].doc_id == "wire" and hits[0].bm25 > 0 and hits[0].dense is None
    assert index.search("zzzqqq", k=3, mode="bm25") == []
    with pytest.raises(ValueError, match="query is empty"):
        index.search("  ", k=3)
    assert index.search("the of and", k=3, mode="bm25") == []  # stop words only


def test_hybrid_fuses_both_scores(index):
    """A fused score is w * dense + (1 - w) * bm25, each list's scores scaled to [0, 1] over
    the chunks it returned; w = 1 is dense search's order, w = 0 BM25's."""
    from gptkit.rag_index import DENSE_WEIGHT, FUSION_DEPTH

    depth = min(FUSION_DEPTH, len(index))
    dense = {h.id: h.score for h in index.search("SWIFT fee", k=depth, mode="dense")}
    bm25 = {h.id: h.score for h in index.search("SWIFT fee", k=depth, mode="bm25")}
    assert len(dense) > len(bm25) > 1  # BM25 returns only chunks holding a query word

    def scaled(scores, chunk):
        low, high = min(scores.values()), max(scores.values())
        return (scores[chunk] - low) / (high - low) if chunk in scores else 0.0

    hybrid = index.search("SWIFT fee", k=depth, mode="hybrid")
    assert len(hybrid) == len(dense)
    for hit in hybrid:
        expected = DENSE_WEIGHT * scaled(dense, hit.id) + (1 - DENSE_WEIGHT) * scaled(bm25, hit.id)
        assert hit.score == pytest.approx(expected) and 0 <= hit.score <= 1
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    for weight, alone in ((1.0, dense), (0.0, bm25)):
        hits = index.search("SWIFT fee", k=depth, mode="hybrid", dense_weight=weight)
        scored = [h.id for h in hits if h.score > 0]  # a list's last chunk is scaled to 0
        assert scored == list(alone)[: len(scored)] and len(scored) == len(alone) - 1
    with pytest.raises(ValueError, match="dense weight is between 0 and 1"):
        index.search("SWIFT fee", dense_weight=1.5)


def test_search_cli_prints_ranked_chunks_and_json(index, capsys):
    assert main(["search", str(index.path), "SWIFT fee", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"1\. \d\.\d{4}  wire  International wire transfers", lines[0])
    assert main(["search", str(index.path), "SWIFT fee", "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["doc_id"] == "wire" and hit["text"] == DOCS[2]["text"] and hit["rank"] == 1


# --- updates -------------------------------------------------------------------------------


def test_add_embeds_only_new_chunks_and_delete_removes(index, tmp_path, monkeypatch):
    from gptkit.rag_index import IndexFileError, add_documents, delete_documents

    before = index.vectors()
    loan = {"id": "loan", "title": "Car loans", "text": "Auto loans from 5.9 percent, 60 months."}
    new = write_docs(tmp_path / "more", [loan])
    embedder = index.embedder()
    encoded: list[str] = []
    real = embedder.encode
    monkeypatch.setattr(
        embedder, "encode", lambda texts, **kw: encoded.extend(texts) or real(texts)
    )
    grown = add_documents(index.path, [new], embedder=embedder)
    assert len(encoded) == 1 and "Auto loans" in encoded[0]  # the old chunks were not re-embedded
    assert len(grown) == len(index) + 1
    np.testing.assert_array_equal(grown.vectors()[: len(index)], before)
    assert grown.search("borrow money to buy a car", k=1)[0].doc_id == "loan"
    with pytest.raises(IndexFileError, match="already in"):
        add_documents(index.path, [new], embedder=embedder)

    shrunk = delete_documents(index.path, ["loan", "pin"])
    assert sorted(shrunk.document_ids()) == ["dispute", "hours", "savings", "wire"]
    assert all(h.doc_id != "pin" for h in shrunk.search("reset my PIN", k=4))
    with pytest.raises(IndexFileError, match="no document 'nope'"):
        delete_documents(index.path, ["nope"])


def test_index_cli_builds_adds_deletes(tmp_path, capsys, monkeypatch):
    docs = write_docs(tmp_path / "docs", DOCS[:3])
    more = write_docs(tmp_path / "more", DOCS[3:])
    out = tmp_path / "idx"
    assert main(["index", str(docs), "--out", str(out)]) == 0
    assert "3 documents, 3 chunks, exact vectors of 384 (minilm)" in capsys.readouterr().out
    assert main(["index", str(docs), "--out", str(out)]) == 2  # exists: never overwritten
    assert "pass --overwrite" in capsys.readouterr().err
    import gptkit.rag_index

    devices = []  # --add loads the recorded embedder on --device, as a build does
    real = gptkit.rag_index.load_embedder

    def load(spec, device, dtype):
        devices.append(device)
        return real(spec, device, dtype)

    monkeypatch.setattr(gptkit.rag_index, "load_embedder", load)
    assert main(["index", str(more), "--out", str(out), "--add", "--device", "cpu"]) == 0
    assert "5 documents" in capsys.readouterr().out and devices == ["cpu"]
    assert main(["index", "--out", str(out), "--delete", "wire", "hours"]) == 0
    assert "3 documents, 3 chunks" in capsys.readouterr().out
    # --dtype bfloat16 embeds in bfloat16 (building and adding); float32 queries still find
    half = tmp_path / "half"
    assert main(["index", str(docs), "--out", str(half), "--dtype", "bfloat16"]) == 0
    assert main(["index", str(more), "--out", str(half), "--add", "--dtype", "bfloat16"]) == 0
    assert "5 documents" in capsys.readouterr().out
    from gptkit.rag_index import Index

    index = Index.open(half)
    for query, doc in QUERIES.items():
        assert index.search(query, k=1, mode="dense")[0].doc_id == doc


# --- damage and mismatches -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("vectors.faiss", lambda p: p.write_bytes(p.read_bytes()[:-100]), "is cut or altered"),
        ("chunks.sqlite", lambda p: _flip_last_byte(p), "was altered"),
        ("bm25/vocab.index.json", lambda p: p.unlink(), "is missing"),
        ("index.json", lambda p: p.write_text("{not json"), "is damaged"),
        ("index.json", lambda p: p.unlink(), "is not a gptkit index"),
    ],
)
def test_a_damaged_index_is_refused_naming_the_file(index, capsys, name, damage, message):
    damage(index.path / name)
    assert main(["search", str(index.path), "fee"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and name in err


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_different_query_embedder_is_refused(index):

    from gptkit.embed import ModelEmbedder
    from gptkit.rag_index import Index, IndexFileError

    with pytest.raises(IndexFileError, match="vectors of different models cannot be compared"):
        Index.open(index.path, embedder=ModelEmbedder(tiny_chat_lm()))


def test_a_failed_update_leaves_the_index_whole(index, tmp_path, monkeypatch):
    import bm25s

    from gptkit.rag_index import Index, delete_documents

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bm25s.BM25, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        delete_documents(index.path, ["pin"])
    assert len(Index.open(index.path)) == len(DOCS)  # still whole, still the old one
    assert not list(index.path.parent.glob(".idx.tmp-*"))


# --- a model's own embeddings ---------------------------------------------------------------


def test_lm_embed_is_unit_length_and_ignores_padding():

    lm = tiny_chat_lm()
    texts = ["hello there", "how are you? I am fine, thanks. hello there, how are you?"]
    batch = lm.embed(texts)
    assert batch.shape == (2, lm.config.n_embd)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-5)
    alone = lm.embed(texts[0])  # no padding beside a longer text
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/banking-kb is not here")
def test_banking_knowledge_base_indexes_and_answers(tmp_path, embedder):
    """A slice of the real knowledge base: its own titles, reworded, find their documents."""
    from gptkit.rag_index import build_index

    with gzip.open(SHARED / "documents.json.gz") as f:
        docs = json.load(f)[:40]
    path = write_docs(tmp_path / "kb", docs)
    index = build_index([path], tmp_path / "idx", embedder, text_field="content")
    assert len(index.document_ids()) == 40 and len(index) >= 40
    found = 0
    for doc in docs:
        hits = index.search(doc["title"].lower(), k=5)
        found += doc["id"] in {h.doc_id for h in hits}
    assert found >= 36  # a title finds its own document in the top 5 nearly always


def test_finetune_sft_puts_retrieved_sources_in_each_prompt(index, tmp_path):
    """retrieval=INDEX renders each training conversation as serve --retrieval prompts it."""
    from gptkit.finetune import ExampleTask
    from gptkit.rag import grounded_messages
    from gptkit.train_config import FinetuneConfig

    rows = [{"prompt": q, "response": f"See [1] ({doc})."} for q, doc in QUERIES.items()]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = FinetuneConfig(
        init_from="tiny", data=str(data), val_data=str(data), retrieval=str(index.path),
        retrieval_k=2,
    )  # fmt: skip
    task = ExampleTask(config, tiny_chat_lm())
    for (query, doc_id), chat in zip(QUERIES.items(), task.records["train"], strict=True):
        hits = index.search(query, k=2)
        assert chat == grounded_messages([chat[1], chat[2]], hits)  # the same prompt as serving
        assert chat[0]["role"] == "system" and "[2] " in chat[0]["content"]
        assert doc_id in {h.doc_id for h in hits}
    config.objective = "classify"
    with pytest.raises(ValueError, match="for sft data only"):
        config.validate()


def test_a_follow_up_keeps_its_sources_and_a_change_of_subject_finds_none(index):
    """The query joins the turn before (follow-ups need it), but the last turn must still
    reach half the threshold alone, so an off-topic question is not carried past it."""
    from gptkit.rag import Retriever

    retriever = Retriever(index)
    before = [
        {"role": "user", "content": "I can't remember the code for my debit card"},
        {"role": "assistant", "content": "Reset it in the app [1]."},
    ]
    for follow_up in ("and how do I reset it?", "does the new one work at cash machines?"):
        hits = retriever.retrieve([*before, {"role": "user", "content": follow_up}])
        assert [h.doc_id for h in hits] == ["pin"]
    for off_topic in ("What is the capital of France?", "Who won the 1998 World Cup?"):
        turn = {"role": "user", "content": off_topic}
        assert index.search(retriever.query([*before, turn]), k=1)[0].dense >= 0.3  # joined
        assert retriever.retrieve([*before, turn]) == []


def test_a_query_longer_than_the_embedder_reads_is_embedded_whole(index):
    """A customer's story of 300+ tokens with the question last: the embedder alone would keep
    only the story's start; the windows' mean keeps the question."""
    story = "Yesterday I walked my dog along the river and we watched the ducks. " * 30
    query = story + "Anyway: I forgot the secret code of my card, how do I reset my PIN?"
    embedder = index.embedder()
    assert sum(embedder.count_tokens(query.split())) > embedder.max_tokens
    assert index.search(query, k=1, mode="dense")[0].doc_id == "pin"
    cut = embedder.encode([query])[0]  # what the model alone makes of it: the story
    assert index.similarities(query, [index.search(query, k=1, mode="dense")[0]])[0] > float(
        index.vectors()[0] @ cut
    )


def test_queries_from_many_threads_are_embedded_together_each_getting_its_own(index):
    """Server threads searching at once: queries that wait while the embedder is busy go in
    one batch, and each thread gets its own query's hits (those of a search alone)."""
    from concurrent.futures import ThreadPoolExecutor

    embedder = index.embedder()
    calls: list[int] = []
    real = embedder.encode

    def counted(texts, *args, **kwargs):
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    alone = {q: index.search(q, k=1, mode="dense")[0].doc_id for q in QUERIES}
    queries = list(QUERIES) * 8  # 40 searches
    embedder.encode = counted
    try:
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda q: index.search(q, k=1, mode="dense")[0].doc_id, queries))
    finally:
        del embedder.encode
    assert found == [alone[q] for q in queries] == [QUERIES[q] for q in queries]
    assert sum(calls) == len(queries) and len(calls) < len(queries)  # some were batched


def test_an_embedder_error_reaches_every_request_of_its_batch():
    from gptkit.embed import Embedder, SharedEncoder

    class Failing(Embedder):
        def encode(self, texts, batch_size=32, progress=False):
            raise RuntimeError("out of memory")

    shared = SharedEncoder(Failing())
    with pytest.raises(RuntimeError, match="out of memory"):
        shared.encode(["a question"])
    assert shared._waiting == []  # nothing is left queued for the next caller
