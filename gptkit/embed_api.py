"""`gptkit serve`'s POST /v1/embeddings in OpenAI's shape, and the worker thread it shares with
the retrieval of a `--retrieval` server (both are the embedder's work).

    {"model": "minilm", "input": ["how do I close my account?", "card fees"]}
    -> {"object": "list", "model": "minilm",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, ...]}, ...],
        "usage": {"prompt_tokens": 12, "total_tokens": 12}}

The embedding model is the index's embedder when the server retrieves (`--retrieval INDEX`:
the vectors a client gets are comparable with the index's), else `--embedder SPEC`
(embed.load_embedder), else the served model itself, its last hidden states mean-pooled
(embed.ModelEmbedder). Vectors have length 1, so a dot product is the cosine.
`"encoding_format": "base64"` sends each vector's little-endian float32 bytes, as OpenAI does.

The embedder runs on one worker thread, a request's inputs as one call; at most max_queue
requests wait for it (more: 503, as the other routes do). A text longer than the embedder
reads is refused (400), as OpenAI refuses one, rather than silently cut. When the served
model embeds, its forward passes on the worker run beside the engine's decoding steps: they
share the weights only (no cache, no mode change on a model already in eval mode), except
with LoRA adapters served side by side, which select rows on the model itself: then the
model refuses to embed, and --embedder names another.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .embed import Embedder
from .protocol import EmbeddingRequest
from .serve_guard import APIError, overloaded

T = TypeVar("T")


class Worker:
    """One thread for a route's model work, and at most `limit` requests waiting for it."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.pool: ThreadPoolExecutor | None = None  # runs while the app does (start/close)
        self.waiting = 0  # requests queued or running; counted on the event loop, no lock

    async def run(self, what: str, work: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.limit:
            raise overloaded(f"{self.waiting} {what} requests are waiting; retry shortly")
        if self.pool is None:
            raise overloaded("the server is shutting down")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        finally:
            self.waiting -= 1

    def start(self) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def embedding_model_id(embedder: Embedder) -> str:
    """The model name clients send for `embedder`: its spec, without a directory's path."""
    return Path(embedder.name.rstrip("/")).name or embedder.name


class EmbeddingServer:
    """Answers /v1/embeddings with `embedder`, served as the model `model`. `refusal`: why
    this server cannot embed (400 with it), when it cannot."""

    def __init__(self, embedder: Embedder, model: str, worker: Worker, refusal: str | None = None):
        self.embedder, self.model, self.worker, self.refusal = embedder, model, worker, refusal

    def card(self) -> dict[str, Any]:
        """GET /v1/models' entry for an embedder that is not the served model itself."""
        return {
            "id": self.model,
            "object": "model",
            "created": 0,
            "owned_by": "gptkit",
            "task": "embed",
            "dimensions": self.embedder.dim,
            "context_length": self.embedder.max_tokens,
        }

    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        if body.model != self.model:
            raise APIError(
                404,
                f"the model {body.model!r} does not embed here; this server's embedding "
                f"model is {self.model!r}",
                param="model",
                code="model_not_found",
            )
        if self.refusal:
            raise APIError(400, self.refusal, param="model", code="model_not_supported")
        dim = self.embedder.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(
                400,
                f"dimensions is {body.dimensions} but {self.model!r} makes vectors of {dim} "
                "and cannot shorten them; send no dimensions",
                param="dimensions",
            )
        listed = isinstance(body.input, list)
        vectors, counts = await self.worker.run("embedding", self._run, body.texts, listed)
        if body.encoding_format == "base64":
            rows: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors
            ]
        else:
            rows = vectors.tolist()
        tokens = sum(counts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
            ],
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _run(self, texts: list[str], listed: bool) -> tuple[np.ndarray, list[int]]:
        """[N, dim] unit vectors and each text's token count (on the worker thread)."""
        counts = self.embedder.count_tokens(texts)
        most = self.embedder.max_tokens
        for i, n in enumerate(counts):
            if n > most:
                where = f"input[{i}]" if listed else "input"
                raise APIError(
                    400,
                    f"{where} has {n} tokens but {self.model!r} reads at most {most}; "
                    "split the text",
                    param="input",
                    code="context_length_exceeded",
                )
        return self.embedder.encode(texts), counts
