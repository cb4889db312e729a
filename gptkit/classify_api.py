"""`gptkit serve` on a classifier: POST /v1/classify in vLLM's shape.

    {"model": "sentiment", "input": ["great film", "dull"]}
    -> {"id": "classify-...", "object": "list", "created": ..., "model": "sentiment",
        "data": [{"index": 0, "object": "classify", "label": "pos", "probs": [0.07, 0.93],
                  "num_classes": 2}, ...],
        "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}}

`probs` follows the model's label order (GET /v1/models lists it as `labels`). A classifier
of several fields answers its first field at the top level, as vLLM would, and every field
under `fields`: {"topic": {"label", "probs", "num_classes"}, ...}.

The model runs on one worker thread, a request's inputs as one length-sorted batch; at most
max_queue requests wait for it (more: 503, as the generating routes do).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .api import LM
from .predict import class_probs, classification_rows
from .protocol import ClassifyRequest
from .serve_guard import APIError, ServeConfig, overloaded


class ClassifyServer:
    """Answers /v1/classify for a served classifier."""

    def __init__(self, lm: LM, name: str, config: ServeConfig):
        self.lm, self.name, self.config = lm, name, config
        self.worker: ThreadPoolExecutor | None = None  # runs while the app does (start/close)
        self.waiting = 0  # requests queued or running on the worker
        self.lock = threading.Lock()

    def card(self) -> dict[str, Any]:
        """What GET /v1/models says of the model beyond OpenAI's fields."""
        groups = self.lm.config.label_groups()
        return {"task": "classify", "labels": {field: labels for field, labels in groups}}

    def _run(self, texts: list[str]) -> tuple[list[tuple[str, list[str], list]], int]:
        """(field, labels, probability rows) per field, and the tokens the model read."""
        model, tok = self.lm.model, self.lm.tokenizer
        rows = classification_rows(tok, texts, model.context)  # encoded once
        groups = class_probs(model, tok, texts, self.config.max_batch, rows)
        tokens = sum(len(row.ids) for row in rows)
        return [(f, labels, probs.tolist()) for f, labels, probs in groups], tokens

    async def classify(self, body: ClassifyRequest) -> dict[str, Any]:
        if body.model != self.name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        with self.lock:
            if self.waiting >= self.config.max_queue:
                raise overloaded(f"{self.waiting} classify requests are waiting; retry shortly")
            self.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            if self.worker is None:
                raise overloaded("the server is shutting down")
            groups, tokens = await loop.run_in_executor(self.worker, self._run, body.texts)
        finally:
            with self.lock:
                self.waiting -= 1
        data = []
        for i in range(len(body.texts)):
            fields = {
                field: {
                    "label": labels[max(range(len(labels)), key=rows[i].__getitem__)],
                    "probs": rows[i],
                    "num_classes": len(labels),
                }
                for field, labels, rows in groups
            }
            entry = {"index": i, "object": "classify", **next(iter(fields.values()))}
            if len(fields) > 1:
                entry["fields"] = fields
            data.append(entry)
        return {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": self.name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    def start(self) -> None:
        if self.worker is None:
            self.worker = ThreadPoolExecutor(1, thread_name_prefix="gptkit-classify")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=False, cancel_futures=True)
            self.worker = None
