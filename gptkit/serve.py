"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page, over engine.py.

    gptkit serve --model smollm2-135m-instruct            # http://127.0.0.1:8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream
server-sent events with `"stream": true`, in OpenAI's chunk format), GET /health, and the chat
page at /. Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with the status code OpenAI uses. Handlers only validate and translate: the engine thread
owns the model and batches every running request into each decoding step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .api import LM
from .chat import ChatTemplateError, chat_prompt, turn_stops
from .config import ConfigError, SampleConfig
from .engine import Engine, EngineBusy, Sequence
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class ServeConfig:
    """The server's address and limits (every limit is a flag of `gptkit serve`)."""

    host: str = "127.0.0.1"  # localhost only unless asked otherwise
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # sequences waiting for a slot; beyond that: 503
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_seconds: float = 300.0  # a sequence's generation time, from its arrival

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty key or none")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = extra.get("param"), extra.get("code")

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, before reading them whole
    (by Content-Length, and by counting for chunked uploads)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is over {self.limit} bytes", code="too_large")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_big
            return message

        try:
            await self.app(scope, counted, send)
        except APIError as e:  # only reachable before a response has started
            await e.response()(scope, receive, send)


def _sse(data: Any) -> str:
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

    def emitter(self, index: int):
        def emit(event: tuple[str, Any]) -> None:
            # Safe from the engine thread; a loop already closed (shutdown) has no listener.
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return emit

    def cancel(self) -> None:
        for seq in self.sequences:
            seq.cancel()


class Server:
    """The request handling: prompts to sequences, engine events to OpenAI responses."""

    def __init__(self, lm: LM, name: str, config: ServeConfig):
        self.lm, self.name, self.config = lm, name, config
        self.engine = Engine(lm, config.max_batch, config.max_queue)
        self.chat_stops = turn_stops(lm.tokenizer)

    # --- prompts and sequences -----------------------------------------------------------

    def _check_model(self, body: SamplingFields) -> None:
        if body.model != self.name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def _budget(self, prompt: list[int], max_tokens: int | None) -> int:
        """max_tokens capped so the prompt and the reply fit the context (None: all of it)."""
        context = self.engine.context
        if len(prompt) > context:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens but the model's context is {context}; "
                "shorten the prompt",
                param="messages",
                code="context_length_exceeded",
            )
        room = context - len(prompt) + 1  # the last token is never fed back
        return room if max_tokens is None else min(max_tokens, room)

    def _submit(
        self, outbox: Outbox, body: SamplingFields, prompts: list[list[int]], budget, stop
    ) -> None:
        """Queue body.n sequences per prompt; choice index = prompt * n + i, as OpenAI's."""
        deadline = time.monotonic() + self.config.max_seconds
        for p, prompt in enumerate(prompts):
            for i in range(body.n):
                sample = SampleConfig(
                    max_new_tokens=budget(prompt),
                    temperature=body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    repetition_penalty=body.repetition_penalty,
                    stop=stop,
                    seed=None if body.seed is None else body.seed + i,
                )
                seq = Sequence(
                    prompt,
                    sample,
                    outbox.emitter(p * body.n + i),
                    frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty,
                    logit_bias=self._logit_bias(body),
                    deadline=deadline,
                )
                try:
                    self.engine.submit(seq)
                except EngineBusy as e:
                    outbox.cancel()
                    raise APIError(503, str(e), "server_error", code="overloaded") from None
                outbox.sequences.append(seq)

    def _logit_bias(self, body: SamplingFields) -> dict[int, float]:
        bias = body.logit_bias or {}
        vocab = self.lm.config.vocab_size
        if any(not 0 <= t < vocab for t in bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        return bias

    def _encode_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            return [self.lm.prompt_ids(t) for t in texts]
        rows = [prompt] if isinstance(prompt[0], int) else prompt
        vocab = self.lm.config.vocab_size
        for row in rows:
            if not row or any(not 0 <= t < vocab for t in row):
                raise APIError(
                    400, f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt"
                )
        return rows

    # --- the two generation routes -------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body)
        prompts = self._encode_prompts(body.prompt)
        for prompt in prompts:
            self._budget(prompt, body.max_tokens)  # every prompt must fit before any starts
        outbox = Outbox()
        self._submit(outbox, body, prompts, lambda p: self._budget(p, body.max_tokens), body.stops)
        echoes = [self.lm.tokenizer.decode(p) if body.echo else "" for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}

        def choice(i: int, text: str, reason: str | None) -> dict:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:

            def chunk(i, piece, reason):
                if piece is None:  # the opening chunk: the echoed prompt, if any
                    echo = echoes[i // body.n]
                    return [choice(i, echo, None)] if echo else None
                return [choice(i, piece, reason)]

            return EventStream(self._stream(outbox, body, head, chunk, prompt_tokens))
        texts, reasons = await self._collect(outbox, request)
        choices = [
            choice(i, echoes[i // body.n] + t, r)
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return self._response(head, choices, outbox, prompt_tokens)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in body.messages
        ]
        try:
            prompt = self.lm.prompt_ids(chat_prompt(self.lm.tokenizer, messages))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        budget = self._budget(prompt, limit)
        outbox = Outbox()
        self._submit(outbox, body, [prompt], lambda p: budget, [*body.stops, *self.chat_stops])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        if body.stream:

            def chunk(i, piece, reason):
                # The first chunk of a choice carries the role, as OpenAI's stream does.
                delta = {"role": "assistant", "content": ""} if piece is None else {}
                if piece:
                    delta["content"] = piece
                return [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]

            head = {**head, "object": "chat.completion.chunk"}
            return EventStream(self._stream(outbox, body, head, chunk, len(prompt)))
        texts, reasons = await self._collect(outbox, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": None,
                "finish_reason": r,
            }
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return self._response(head, choices, outbox, len(prompt))

    # --- engine events to responses --------------------------------------------------------

    async def _collect(self, outbox: Outbox, request: Request) -> tuple[list[str], list[str]]:
        """Wait for every sequence to finish; a client gone meanwhile cancels them all."""
        n = len(outbox.sequences)
        texts, reasons = [""] * n, [None] * n
        try:
            while any(r is None for r in reasons):
                try:
                    i, (kind, value) = await asyncio.wait_for(outbox.queue.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the request") from None
                    continue
                if kind == "text":
                    texts[i] += value
                elif kind == "done":
                    reasons[i] = value
                else:
                    raise APIError(503, value, "server_error")
        finally:
            outbox.cancel()  # a no-op for finished sequences
        return texts, reasons

    async def _stream(self, outbox, body, head, chunk, prompt_tokens) -> AsyncIterator[str]:
        """OpenAI's server-sent events: a chunk per text piece, a finishing chunk per choice,
        the usage chunk when asked for, then [DONE]."""
        head = {**head, "created": int(time.time()), "model": self.name}
        n, live = len(outbox.sequences), len(outbox.sequences)
        try:
            for i in range(n):
                if opening := chunk(i, None, None):
                    yield _sse({**head, "choices": opening})
            while live:
                i, (kind, value) = await outbox.queue.get()
                if kind == "text":
                    yield _sse({**head, "choices": chunk(i, value, None)})
                elif kind == "done":
                    live -= 1
                    yield _sse({**head, "choices": chunk(i, "", value)})
                else:
                    error = {"message": value, "type": "server_error", "param": None, "code": None}
                    yield _sse({"error": error})
                    return
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(outbox, prompt_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            outbox.cancel()

    def _usage(self, outbox: Outbox, prompt_tokens: int) -> dict[str, int]:
        completion = sum(seq.generated for seq in outbox.sequences)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def _response(self, head, choices, outbox, prompt_tokens) -> dict:
        return {
            **head,
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": self._usage(outbox, prompt_tokens),
        }


def create_app(lm: LM, name: str, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `lm` as the model `name`; the engine runs while the app does."""
    config = config or ServeConfig()
    server = Server(lm, name, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.engine.close()

    app = FastAPI(title="gptkit", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {config.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    v1 = [Depends(authorized)]

    @app.get("/health")
    async def health():
        engine = server.engine
        return {
            "status": "ok",
            "model": name,
            "running": len(engine.running),
            "waiting": engine.waiting.qsize(),
        }

    @app.get("/v1/models", dependencies=v1)
    async def models():
        card = {"id": name, "object": "model", "created": 0, "owned_by": "gptkit"}
        return {"object": "list", "data": [{**card, "context_length": server.engine.context}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    page = files("gptkit").joinpath("static/chat.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    return app


def serve(lm: LM, name: str, config: ServeConfig) -> None:
    """Run the server until Ctrl-C; in-flight requests end cleanly with an error event."""
    import uvicorn

    app = create_app(lm, name, config)
    # On Ctrl-C or SIGTERM, streams in flight get 10 s to finish; then they are cancelled and
    # the engine stops (every sequence left ends with an error event).
    uvicorn.run(
        app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=10
    )
