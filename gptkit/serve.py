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

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .api import LM
from .chat import ChatTemplateError, chat_prompt, turn_stops
from .config import ConfigError, SampleConfig
from .engine import Engine, EngineBusy, Sequence
from .protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, SamplingFields
from .tokenizer import TokenizerError


@dataclass
class ServeConfig:
    """The server's address and limits (every limit is a flag of `gptkit serve`)."""

    host: str = "127.0.0.1"  # localhost only unless asked otherwise
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_batch: int = 8  # sequences decoded together in one step
    max_queue: int = 64  # sequences waiting for a slot; beyond that: 503
    max_body_bytes: int = 1 << 20  # larger request bodies: 413
    max_tokens: int = 4096  # a request asking for more completion tokens: 400
    max_seconds: float = 300.0  # a sequence's generation time, from its arrival
    # On SIGTERM / Ctrl-C, generations still running this long after are cut short
    # (finish_reason "length") so that their responses end cleanly; then the process exits 0.
    shutdown_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_seconds > 0:
            raise ConfigError(f"max_seconds must be > 0, got {self.max_seconds}")
        if not self.shutdown_seconds >= 0:
            raise ConfigError(f"shutdown_seconds must be >= 0, got {self.shutdown_seconds}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty key or none")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = extra.get("param"), extra.get("code")
        self.headers: dict[str, str] | None = extra.get("headers")

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def _overloaded(message: str) -> APIError:
    """503 with Retry-After: the queue is full, or the server is shutting down."""
    return APIError(503, message, "server_error", code="overloaded", headers={"Retry-After": "1"})


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
                # An HTTPException: FastAPI turns any other error raised while it reads the
                # body into "400 There was an error parsing the body".
                raise HTTPException(413, too_big.message)
            return message

        # FastAPI answers the HTTPException with http_error below: 413, code "too_large".
        await self.app(scope, counted, send)


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

    def _budget(self, prompt: list[int], max_tokens: int | None, param: str = "max_tokens") -> int:
        """max_tokens (the request's field `param`) capped so the prompt and the reply fit the
        context (None: all of it, up to the server's max_tokens)."""
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(
                400,
                f"{param} is {max_tokens} but this server generates at most {limit} tokens "
                "per request; ask for fewer",
                param=param,
                code="max_tokens_too_large",
            )
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
        return min(limit if max_tokens is None else max_tokens, room)

    def _submit(
        self, outbox: Outbox, body: SamplingFields, prompts: list[list[int]], budget, stop
    ) -> None:
        """Queue body.n sequences per prompt; choice index = prompt * n + i, as OpenAI's."""
        wanted, most = len(prompts) * body.n, self.engine.waiting.maxsize
        if wanted > most:  # would never fit, however long the client waited
            raise APIError(
                400,
                f"this request asks for {wanted} completions (prompts x n) but the server "
                f"queues at most {most}; send fewer prompts or a smaller n",
                param="n",
            )
        deadline = time.monotonic() + self.config.max_seconds
        for p, prompt in enumerate(prompts):
            for i in range(body.n):
                try:
                    sample = SampleConfig(
                        max_new_tokens=budget(prompt),
                        temperature=body.temperature,
                        top_k=body.top_k,
                        top_p=body.top_p,
                        repetition_penalty=body.repetition_penalty,
                        stop=stop,
                        seed=None if body.seed is None else body.seed + i,
                    )
                except ConfigError as e:  # the protocol's ranges should make this unreachable
                    outbox.cancel()
                    raise APIError(400, str(e)) from None
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
                    raise _overloaded(str(e)) from None
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
            return [self._prompt_ids(t, "prompt") for t in texts]
        rows = [prompt] if isinstance(prompt[0], int) else prompt
        vocab = self.lm.config.vocab_size
        for row in rows:
            if not row or any(not 0 <= t < vocab for t in row):
                raise APIError(
                    400, f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt"
                )
            try:  # ids the model has but the tokenizer cannot turn into text
                self.lm.tokenizer.decode(row)
            except TokenizerError as e:
                raise APIError(400, str(e), param="prompt") from None
        return rows

    def _prompt_ids(self, text: str, param: str) -> list[int]:
        try:
            return self.lm.prompt_ids(text)
        except ValueError as e:  # e.g. a lone surrogate ("\\udc80" in the JSON): not text
            raise APIError(400, str(e), param=param) from None

    # --- the two generation routes -------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body)
        prompts = self._encode_prompts(body.prompt)
        # OpenAI's default of 16 applies when the client sets none; the server's cap, if lower.
        limit = body.max_tokens
        if "max_tokens" not in body.model_fields_set:
            limit = min(limit, self.config.max_tokens)
        for prompt in prompts:
            self._budget(prompt, limit)  # every prompt must fit before any starts
        outbox = Outbox()
        self._submit(outbox, body, prompts, lambda p: self._budget(p, limit), body.stops)
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
            text = chat_prompt(self.lm.tokenizer, messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        prompt = self._prompt_ids(text, "messages")
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        budget = self._budget(prompt, getattr(body, field), field)
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

    lifespans = 0  # the engine runs while any lifespan of the app does

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal lifespans
        lifespans += 1
        server.engine.start()
        try:
            yield
        finally:
            lifespans -= 1
            if not lifespans:
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
        code = "too_large" if e.status_code == 413 else None
        return APIError(e.status_code, str(e.detail), code=code).response()

    v1 = [Depends(authorized)]
    # What the routes answer, for the OpenAPI schema (clients and schemathesis read it).
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
    generated = {
        **errors,
        200: {"content": {"application/json": {}, "text/event-stream": {}}},
    }

    @app.get("/health")
    async def health():
        engine = server.engine
        return {
            "status": "ok",
            "model": name,
            "running": len(engine.running),
            "waiting": engine.waiting.qsize(),
        }

    @app.get("/v1/models", dependencies=v1, responses=errors)
    async def models():
        card = {"id": name, "object": "model", "created": 0, "owned_by": "gptkit"}
        return {"object": "list", "data": [{**card, "context_length": server.engine.context}]}

    @app.post("/v1/completions", dependencies=v1, responses=generated)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=v1, responses=generated)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    page = files("gptkit").joinpath("static/chat.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    return app


def serve(lm: LM, name: str, config: ServeConfig) -> None:
    """Run the server until Ctrl-C or SIGTERM, then shut down gracefully: no new requests;
    generations in flight get config.shutdown_seconds, then end with finish_reason "length",
    so every response completes; the engine stops and serve returns (the process exits 0)."""
    app = create_app(lm, name, config)
    # uvicorn's own limit is a backstop for clients that stop reading: it cancels what is left.
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=config.shutdown_seconds + 5,
    )
    server = GracefulServer(settings, app.state.server.engine, config.shutdown_seconds)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind the address or its startup fails
        raise ConfigError(
            f"the server could not start on {config.host}:{config.port} (see the log above); "
            "is the port in use? pick another with --port"
        ) from None


class GracefulServer(uvicorn.Server):
    """uvicorn's server; a stop signal also starts the engine's drain, and a completed graceful
    stop is a normal exit (uvicorn would re-raise the signal: exit status 143 for SIGTERM)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace

    def handle_exit(self, sig, frame) -> None:
        self.engine.drain(self.grace)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these
        if captured is not None:
            captured.clear()
