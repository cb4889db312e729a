"""How the engine's events reach an HTTP response: an Outbox per request, on its event loop,
and server-sent events that always release their engine slot."""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any

from fastapi.responses import StreamingResponse

from .engine import Sequence


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, so a client
    that disconnects mid-stream frees its engine slot at once (the generator's `finally`)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class Outbox:
    """Collects the engine thread's events for one HTTP request on its event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, tuple[str, Any]]] = asyncio.Queue()
        self.sequences: list[Sequence] = []
        self.canned = 0  # choices answered without the model (canned_replies)

    @property
    def size(self) -> int:
        """The response's choices."""
        return len(self.sequences) or self.canned

    def canned_replies(self, n: int, text: str) -> None:
        """n choices that are `text`, finished ("stop"), with no sequence behind them: they
        go through the same response code as generated ones."""
        self.canned = n
        for i in range(n):
            self.queue.put_nowait((i, ("text", text)))
            self.queue.put_nowait((i, ("done", "stop")))

    def emitter(self, index: int):
        def emit(event: tuple[str, Any]) -> None:
            # Safe from the engine thread; a loop already closed (shutdown) has no listener.
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return emit

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancel()
