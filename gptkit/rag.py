"""Retrieval-augmented prompting, shared by `gptkit chat --retrieval`, `gptkit serve
--retrieval` and `gptkit eval rag`: find sources for a conversation's last user turn, number
them in a system message, and ask the model to answer from them and cite them as [1], [2].

    retriever = Retriever(Index.open("runs/idx"), RetrievalConfig(k=3))
    hits = retriever.retrieve(messages)            # [] when no chunk is relevant enough
    prompt_messages = grounded_messages(messages, hits)

A chunk counts as a source only if its cosine similarity to the query reaches `min_score`:
with nothing relevant, the caller answers `no_answer` instead of letting the model invent.
The query is the last user turn plus the `history` user turns before it, so a follow-up
("and for a savings account?") still finds what the conversation is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError
from .rag_index import DENSE_WEIGHT, MODES, Hit, Index, check_dense_weight

INSTRUCTION = (
    "Answer the user's question using only the numbered sources below. Cite the sources you "
    "use by their numbers in square brackets, like [1] or [2]. If the sources do not contain "
    "the answer, say that you do not know."
)


@dataclass
class RetrievalConfig:
    k: int = 3  # sources put in the prompt
    mode: str = "hybrid"  # dense | bm25 | hybrid (rag_index.py)
    dense_weight: float = DENSE_WEIGHT  # hybrid's weight on dense scores (1 - it on BM25's)
    # The least cosine similarity (query to chunk) that counts as relevant. all-MiniLM-L6-v2
    # scores unrelated text around 0.0-0.2 and a passage that answers a question 0.4-0.8.
    min_score: float = 0.3
    history: int = 1  # earlier user turns joined to the query
    no_answer: str = "I could not find that in the documents."

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"the number of sources must be at least 1, got {self.k}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown retrieval mode {self.mode!r}; use {', '.join(MODES)}")
        check_dense_weight(self.dense_weight)
        if not -1.0 <= self.min_score <= 1.0:
            raise ConfigError(f"min_score is a cosine similarity in [-1, 1], got {self.min_score}")
        if self.history < 0:
            raise ConfigError(f"history must be 0 or more, got {self.history}")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # OpenAI's content parts: keep the text ones
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class Retriever:
    """Sources for a conversation from one index."""

    def __init__(self, index: Index, config: RetrievalConfig | None = None):
        self.index, self.config = index, config or RetrievalConfig()

    def query(self, messages: list[dict[str, Any]]) -> str:
        turns = [_text(m) for m in messages if m.get("role") == "user"]
        return "\n".join(turns[-(self.config.history + 1) :])

    def retrieve(self, messages: list[dict[str, Any]]) -> list[Hit]:
        """The relevant chunks for the conversation's last user turn, best first."""
        query = self.query(messages)
        if not query.strip():
            return []
        c = self.config
        least = c.min_score
        hits = self.index.search(query, k=c.k, mode=c.mode, dense_weight=c.dense_weight)
        # BM25-only search has no cosine to judge by: its hits all count.
        hits = [h for h in hits if h.dense is None or h.dense >= least]
        last = _text(next(m for m in reversed(messages) if m.get("role") == "user"))
        if hits and hits[0].dense is not None and last != query:
            # The earlier turns in the query carry a change of subject past the threshold
            # ("Who won the 1998 World Cup?" after a card question: 0.09 alone, 0.54 joined),
            # so the last turn must also reach half of it alone. Follow-ups do ("And how long
            # does that take?": 0.31 alone), since they share the conversation's words.
            alone = self.index.similarities(last, hits)
            hits = [h for h, s in zip(hits, alone, strict=True) if s >= least / 2]
        return hits


def source_block(hits: list[Hit]) -> str:
    """The numbered sources as the prompt shows them."""
    return "\n\n".join(
        f"[{n}] {h.title}\n{h.text}" if h.title else f"[{n}] {h.text}"
        for n, h in enumerate(hits, 1)
    )


def grounded_messages(messages: list[dict[str, Any]], hits: list[Hit]) -> list[dict[str, Any]]:
    """The conversation with the sources in its system message (one system message: chat
    templates expect at most one, first); a system prompt the conversation has comes first."""
    grounding = f"{INSTRUCTION}\n\nSources:\n\n{source_block(hits)}"
    if messages and messages[0].get("role") == "system":
        own, messages = _text(messages[0]), messages[1:]
        grounding = f"{own}\n\n{grounding}"
    return [{"role": "system", "content": grounding}, *messages]


def source_cards(hits: list[Hit]) -> list[dict[str, Any]]:
    """The sources as HTTP responses and the chat page show them; `index` is the number the
    reply cites. `source` is the file's name only: where the server keeps its documents is
    not the clients' business."""
    return [
        {
            "index": n,
            "id": h.id,
            "doc_id": h.doc_id,
            "title": h.title,
            "source": Path(h.source).name,
            "text": h.text,
            "score": h.dense if h.dense is not None else h.score,
        }
        for n, h in enumerate(hits, 1)
    ]
