"""A retrieval index: document chunks, their embeddings in FAISS, a BM25 index beside them,
and the chunk text with its metadata in SQLite.

    index = build_index([Path("docs/")], Path("runs/idx"), load_embedder("minilm"))
    index = Index.open("runs/idx")
    index.search("how do I dispute a charge?", k=5, mode="hybrid")  # -> [Hit, ...]

Modes: "dense" ranks by cosine similarity of embeddings (FAISS, exact below HNSW_FROM chunks,
HNSW above); "bm25" by BM25 over stemmed words (bm25s); "hybrid" (the default) fuses the two:
dense finds paraphrases, BM25 finds rare exact words (names, codes, amounts). The fusion is a
convex combination of scores, each list's scaled to [0, 1] over the chunks it returned
(min-max; Weaviate's "relative score fusion"): score = w * dense + (1 - w) * bm25, w =
DENSE_WEIGHT unless the caller gives one. Bruch et al. (2023, "An Analysis of Fusion Functions
for Hybrid Retrieval") found it beats reciprocal-rank fusion, which throws the score gaps away;
on SQuAD it did here too (docs/RESULTS.md: recall@1 0.786 against RRF's 0.728).

The directory (every file written to a temporary directory and renamed into place, as
checkpoints are, so a crash leaves the previous index whole):

    index.json      the manifest: format, embedder identity, chunking settings, counts, and
                    each file's size and SHA-256 (a cut or altered file is refused on open)
    vectors.faiss   FAISS index; row i is the chunk at position i
    chunks.sqlite   tables `documents(id, title, source)` and `chunks(pos, id, doc_id, title,
                    source, start, end, text)`: query them with any SQLite client
    bm25/           bm25s's arrays and vocabulary, document i = chunk position i

`add_documents` and `delete_documents` embed only the new chunks and rewrite the rest from
what the index holds (vectors are read back from FAISS, never recomputed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_dir import fsync_tree, resolve_directory, staging_dir, swap_in
from .config import ConfigError
from .embed import Embedder, SharedEncoder, load_embedder
from .rag_docs import Chunk, Document, check_chunking, chunk_document, read_documents

FORMAT, VERSION = "gptkit-index", 1
MANIFEST, VECTORS, CHUNKS, BM25 = "index.json", "vectors.faiss", "chunks.sqlite", "bm25"
HNSW_FROM = 50_000  # chunks; below it exact search takes a few milliseconds a query
FUSION_DEPTH = 50  # hybrid search fuses each list's best max(k, FUSION_DEPTH) chunks
# Hybrid's weight on dense scores. Chosen on SQuAD questions other than the 500 that
# bench/rag_eval.py tests on (its tuning set, which it also scores): 0.4 and 0.5 were best
# there (0.3-0.7 tried); on the bank's scenarios, long stories where dense search is the
# stronger, 0.5 did better than 0.4. Tune it for your data with
# `gptkit eval retrieval --dense-weight W` (RETRIEVAL.md).
DENSE_WEIGHT = 0.5
MODES = ("hybrid", "dense", "bm25")


def check_dense_weight(weight: float) -> None:
    """A one-line ConfigError unless `weight` is a hybrid weight (0 to 1)."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"the dense weight is between 0 and 1, got {weight}")


SETTINGS = ("embedder", "chunk_tokens", "overlap", "text_field")  # what --add reuses


class IndexFileError(ConfigError):
    """An index that is missing, damaged, or used with the wrong embedder: one line."""


@dataclass(frozen=True)
class Hit:
    id: str  # the chunk's id, f"{doc_id}#{n}"
    doc_id: str
    title: str
    source: str
    start: int
    end: int
    text: str
    score: float  # the ranking's own: cosine (dense), BM25 score, or fused score in [0, 1]
    rank: int  # from 1
    dense: float | None  # the chunk's cosine similarity to the query (not in bm25 mode)
    bm25: float | None  # its BM25 score, where BM25 ranked it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _imports():
    try:
        import bm25s
        import faiss
        import Stemmer
    except ImportError as e:
        raise IndexFileError(f"indexes need {e.name}: pip install 'gptkit[rag]'") from None
    return faiss, bm25s, Stemmer.Stemmer("english")


def _bm25_tokens(texts: list[str], ids: bool):
    _, bm25s, stemmer = _imports()
    return bm25s.tokenize(
        texts, stopwords="en", stemmer=stemmer, return_ids=ids, show_progress=False
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(
    out: Path,
    chunks: list[Chunk],
    vectors: np.ndarray,  # [N, dim], row i for chunks[i]
    documents: list[Document],
    manifest: dict[str, Any],
) -> None:
    """Write the whole index to a staging directory, then swap it in for `out`."""
    faiss, bm25s, _ = _imports()
    if not chunks:
        raise IndexFileError("the documents hold no text to index")
    tmp = staging_dir(out)
    try:
        dim = vectors.shape[1]
        if len(chunks) >= HNSW_FROM:
            vector_index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            vector_index = faiss.IndexFlatIP(dim)
        vector_index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(vector_index, str(tmp / VECTORS))

        db = sqlite3.connect(tmp / CHUNKS)
        with db:
            db.execute("CREATE TABLE documents (id TEXT PRIMARY KEY, title TEXT, source TEXT)")
            db.execute(
                "CREATE TABLE chunks (pos INTEGER PRIMARY KEY, id TEXT UNIQUE, doc_id TEXT, "
                "title TEXT, source TEXT, start INTEGER, end INTEGER, text TEXT)"
            )
            db.executemany(
                "INSERT INTO documents VALUES (?, ?, ?)",
                [(d.id, d.title, d.source) for d in documents],
            )
            db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, c.id, c.doc_id, c.title, c.source, c.start, c.end, c.text)
                 for i, c in enumerate(chunks)],
            )  # fmt: skip
        db.close()

        bm25 = bm25s.BM25()
        bm25.index(_bm25_tokens([c.embedded_text() for c in chunks], ids=True), show_progress=False)
        bm25.save(str(tmp / BM25))

        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **manifest,
            "documents": len(documents),
            "chunks": len(chunks),
            "vectors": "hnsw" if len(chunks) >= HNSW_FROM else "exact",
            "files": {
                p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, out)


def _chunks(documents: list[Document], embedder: Embedder, size: int, overlap: int):
    chunks: list[Chunk] = []
    for doc in documents:
        chunks += chunk_document(doc, embedder.count_tokens, size, overlap)
    return chunks


def build_index(
    sources: list[Path],
    out: Path,
    embedder: Embedder,
    chunk_tokens: int = 200,
    overlap: int = 40,
    text_field: str | None = None,
    overwrite: bool = False,
) -> Index:
    """Read, chunk and embed every document under `sources` into a new index at `out`."""
    out = Path(out)
    check_chunking(chunk_tokens, overlap, embedder.max_tokens)
    if out.exists() and not overwrite:
        raise IndexFileError(f"{out} exists; pass --overwrite to replace it, or --add to add to it")
    documents, skipped = read_documents(sources, text_field)
    chunks = _chunks(documents, embedder, chunk_tokens, overlap)
    vectors = embedder.encode([c.embedded_text() for c in chunks], progress=True)
    settings = {"chunk_tokens": chunk_tokens, "overlap": overlap, "text_field": text_field}
    _write(out, chunks, vectors, documents, {"embedder": embedder.identity, **settings})
    index = Index.open(out, embedder)
    index.skipped = skipped
    return index


def add_documents(
    path: Path,
    sources: list[Path],
    text_field: str | None = None,
    embedder: Embedder | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> Index:
    """The index at `path` with the documents under `sources` added (only they are embedded;
    device and dtype: where and in what the recorded embedder computes, when `embedder` is
    not given)."""
    index = Index.open(path, embedder, device=device, dtype=dtype)
    settings = index.manifest
    documents, skipped = read_documents(sources, text_field or settings.get("text_field"))
    clash = sorted({d.id for d in documents} & set(index.document_ids()))
    if clash:
        raise IndexFileError(
            f"{len(clash)} document(s) are already in {path} (e.g. {clash[0]!r}); "
            "delete them first (--delete ID) to replace them"
        )
    embedder = index.embedder()
    new = _chunks(documents, embedder, settings["chunk_tokens"], settings["overlap"])
    vectors = np.concatenate([index.vectors(), embedder.encode([c.embedded_text() for c in new])])
    _write(
        Path(path),
        index.chunks() + new,
        vectors,
        index.documents() + documents,
        {k: settings[k] for k in SETTINGS},
    )
    index = Index.open(path, embedder)
    index.skipped = skipped
    return index


def delete_documents(path: Path, doc_ids: list[str]) -> Index:
    """The index at `path` without these documents (nothing is embedded again)."""
    index = Index.open(path)
    missing = sorted(set(doc_ids) - set(index.document_ids()))
    if missing:
        raise IndexFileError(f"no document {missing[0]!r} in {path} ({len(missing)} not found)")
    gone = set(doc_ids)
    chunks = index.chunks()
    keep = [i for i, c in enumerate(chunks) if c.doc_id not in gone]
    settings = index.manifest
    _write(
        Path(path),
        [chunks[i] for i in keep],
        index.vectors()[keep],
        [d for d in index.documents() if d.id not in gone],
        {k: settings[k] for k in SETTINGS},
    )
    return Index.open(path)


class Index:
    """An index directory opened for search; its files are checked against the manifest."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        embedder: Embedder | None,
        device,
        dtype: str = "float32",
    ):
        faiss, bm25s, _ = _imports()
        self.path, self.manifest, self._embedder, self._device = path, manifest, embedder, device
        self._dtype = dtype  # what the recorded embedder computes in, once it is loaded
        self._shared = SharedEncoder(embedder) if embedder is not None else None
        self.identity: dict[str, Any] = manifest["embedder"]
        self._vectors = faiss.read_index(str(path / VECTORS))
        if manifest["vectors"] == "hnsw":
            self._vectors.hnsw.efSearch = 128  # recall over speed: exact below HNSW_FROM
        self._bm25 = bm25s.BM25.load(str(path / BM25))
        db = sqlite3.connect(f"file:{path / CHUNKS}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT * FROM chunks ORDER BY pos").fetchall()
            docs = db.execute("SELECT id, title, source FROM documents").fetchall()
        finally:
            db.close()
        self._chunks = [Chunk(*row[1:]) for row in rows]
        self._positions = {c.id: pos for pos, c in enumerate(self._chunks)}
        self._documents = docs
        self._lock = threading.Lock()  # loads the embedder once (server threads)
        self.skipped: list[Path] = []  # files of folders that build/add passed over
        if len(self._chunks) != self._vectors.ntotal:
            raise IndexFileError(
                f"{path}: {len(self._chunks)} chunks but {self._vectors.ntotal} vectors; "
                "rebuild it with gptkit index"
            )

    @classmethod
    def open(
        cls,
        path: str | Path,
        embedder: Embedder | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ) -> Index:
        """The index at `path`, checked whole. `embedder` (else the recorded one, loaded at the
        first dense query, computing in `dtype`) must be the one the index was built with."""
        given = Path(path)
        path = resolve_directory(given)  # a crash between swap_in's renames left a backup
        if path is None:
            raise IndexFileError(f"no index at {given}; build one with gptkit index DOCS --out")
        manifest = _check_files(path)
        if embedder is not None and embedder.identity != manifest["embedder"]:
            raise IndexFileError(
                f"{given} was built with the embedder {manifest['embedder']}, not "
                f"{embedder.identity}: vectors of different models cannot be compared"
            )
        return cls(path, manifest, embedder, device, dtype)

    def __len__(self) -> int:
        return len(self._chunks)

    def summary(self) -> str:
        m = self.manifest
        return (
            f"{m['documents']} documents, {m['chunks']} chunks, {m['vectors']} vectors of "
            f"{self.identity['dim']} ({self.identity['name']})"
        )

    def embedder(self) -> Embedder:
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    loaded = load_embedder(self.identity["name"], self._device, self._dtype)
                    self._shared = SharedEncoder(loaded)  # before other threads see it
                    self._embedder = loaded
            if self._embedder.identity != self.identity:
                raise IndexFileError(
                    f"{self.path}: the embedder {self.identity['name']!r} now loads as "
                    f"{self._embedder.identity}, not the {self.identity} the index was built with"
                )
        return self._embedder

    def chunks(self) -> list[Chunk]:
        return list(self._chunks)

    def documents(self) -> list[Document]:
        """The documents' ids, titles and sources (their text lives in the chunks)."""
        return [Document(i, t, s, "") for i, t, s in self._documents]

    def document_ids(self) -> list[str]:
        return [row[0] for row in self._documents]

    def vectors(self) -> np.ndarray:
        return self._vectors.reconstruct_n(0, self._vectors.ntotal)  # [N, dim]

    def embed(self, texts: list[str]) -> np.ndarray:
        """Query vectors [N, dim]. A text longer than the embedder reads (a customer's whole
        story) is cut into windows that it does read, and their vectors are averaged: the
        embedder would keep only its start, and the question often comes last (on banking-kb's
        scenarios, dense recall@10 rose from 0.26 to 0.33)."""
        embedder = self.embedder()
        size = embedder.max_tokens - 8  # room for the special tokens and tokenizer drift
        owners, parts = [], []
        for i, text in enumerate(texts):
            pieces = [text]
            if sum(embedder.count_tokens(text.split())) > size:
                doc = Document("query", "", "", text)
                pieces = [c.text for c in chunk_document(doc, embedder.count_tokens, size, 0)]
            owners += [i] * len(pieces)
            parts += pieces
        vectors = self._shared.encode(parts)  # [P, dim], batched with other threads' queries
        if len(parts) == len(texts):
            return vectors
        mean = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        np.add.at(mean, owners, vectors)
        return mean / np.linalg.norm(mean, axis=1, keepdims=True)

    def search(
        self, query: str, k: int = 5, mode: str = "hybrid", dense_weight: float = DENSE_WEIGHT
    ) -> list[Hit]:
        return self.search_many([query], k, mode, dense_weight)[0]

    def search_many(
        self,
        queries: list[str],
        k: int = 5,
        mode: str = "hybrid",
        dense_weight: float = DENSE_WEIGHT,
    ) -> list[list[Hit]]:
        """The k best chunks for each query, best first. dense_weight: hybrid's weight on the
        dense scores (1 - it on BM25's)."""
        if mode not in MODES:
            raise ConfigError(f"unknown search mode {mode!r}; use one of {', '.join(MODES)}")
        check_dense_weight(dense_weight)
        if not all(q.strip() for q in queries):
            raise ConfigError("a search query is empty; give some words to search for")
        n = len(self._chunks)
        depth = min(n, k if mode != "hybrid" else max(k, FUSION_DEPTH))  # fusion looks deeper
        q = self.embed(queries) if mode != "bm25" else None  # [Q, dim]
        dense = self._dense(q, depth) if q is not None else [{} for _ in queries]
        bm25 = self._bm25_ranks(queries, depth) if mode != "dense" else [{} for _ in queries]
        out = []
        for i in range(len(queries)):
            if mode == "dense":
                ranked = sorted(dense[i].items(), key=lambda kv: -kv[1])
            elif mode == "bm25":
                ranked = sorted(bm25[i].items(), key=lambda kv: -kv[1])
            else:
                ranked = sorted(
                    fuse(dense[i], bm25[i], dense_weight).items(), key=lambda kv: -kv[1]
                )
            hits = []
            for rank, (pos, score) in enumerate(ranked[:k], 1):
                c = self._chunks[pos]
                cosine = dense[i].get(pos) if q is None or pos in dense[i] else self._cos(q[i], pos)
                hits.append(Hit(c.id, c.doc_id, c.title, c.source, c.start, c.end, c.text,
                                float(score), rank, cosine, bm25[i].get(pos)))  # fmt: skip
            out.append(hits)
        return out

    def similarities(self, text: str, hits: list[Hit]) -> list[float]:
        """The cosine similarity of `text` to each hit's chunk."""
        q = self.embed([text])[0]  # [dim]
        return [self._cos(q, self._positions[h.id]) for h in hits]

    def _cos(self, query: np.ndarray, pos: int) -> float:
        return float(self._vectors.reconstruct(pos) @ query)

    def _dense(self, q: np.ndarray, depth: int) -> list[dict[int, float]]:
        scores, rows = self._vectors.search(q, depth)  # [Q, depth] each
        return [
            {int(p): float(s) for p, s in zip(r, sc, strict=True) if p >= 0}
            for r, sc in zip(rows, scores, strict=True)
        ]

    def _bm25_ranks(self, queries: list[str], depth: int) -> list[dict[int, float]]:
        out = []
        for tokens in _bm25_tokens(queries, ids=False):
            if not tokens:  # only stop words: BM25 has nothing to match
                out.append({})
                continue
            rows, scores = self._bm25.retrieve([tokens], k=depth, show_progress=False, n_threads=1)
            out.append({int(p): float(s) for p, s in zip(rows[0], scores[0], strict=True) if s > 0})
        return out


def fuse(dense: dict[int, float], bm25: dict[int, float], dense_weight: float) -> dict[int, float]:
    """Hybrid scores {chunk position: score in [0, 1]} of two result lists {position: score}:
    each list min-max scaled over the chunks it returned (its best 1, its last 0; a list of
    equal scores all 1), then weighted; a chunk one list did not return gets 0 from it."""

    def scaled(scores: dict[int, float]) -> dict[int, float]:
        if not scores:
            return {}
        low, high = min(scores.values()), max(scores.values())
        return {p: (s - low) / (high - low) if high > low else 1.0 for p, s in scores.items()}

    d, b = scaled(dense), scaled(bm25)
    return {
        p: dense_weight * d.get(p, 0.0) + (1 - dense_weight) * b.get(p, 0.0) for p in d.keys() | b
    }


def _check_files(path: Path) -> dict[str, Any]:
    """The manifest, once every file it lists has its recorded size and SHA-256."""
    rebuild = "rebuild it with gptkit index"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise IndexFileError(f"{path} is not a gptkit index (no {MANIFEST})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IndexFileError(f"{path / MANIFEST} is damaged (not JSON); {rebuild}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFileError(f"{path / MANIFEST} is not a gptkit index manifest")
    if manifest.get("version") != VERSION:
        raise IndexFileError(f"{path} is index format version {manifest.get('version')}; this "
                             f"gptkit reads version {VERSION}: {rebuild}")  # fmt: skip
    for name, want in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise IndexFileError(f"{file} is missing; {rebuild}")
        if file.stat().st_size != want["bytes"]:
            raise IndexFileError(f"{file} is cut or altered ({file.stat().st_size} bytes, "
                                 f"expected {want['bytes']}); {rebuild}")  # fmt: skip
        if _sha256(file) != want["sha256"]:
            raise IndexFileError(f"{file} was altered (SHA-256 differs); {rebuild}")
    return manifest
