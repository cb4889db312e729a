"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page, over engine.py.

    gptkit serve --model smollm2-135m-instruct            # http://127.0.0.1:8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream
server-sent events with `"stream": true`, in OpenAI's chunk format), GET /health, and the chat
page at /. Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}},
with the status code OpenAI uses. Handlers only validate and translate: the engine thread
owns the model and batches every running request into each decoding step.

Several LoRA adapters can be served on one base model (`adapters`, `gptkit serve --adapter
NAME=DIR`): the request's `model` field picks one by name, the base model's name serves the
base; requests for different adapters share the engine's decoding steps (peft.MultiLoRA).

Hardening (docs/RELIABILITY.md, "Serving"): bound to a loopback address the server answers
only loopback Host names (DNS rebinding); the API key is checked before a body is read, and
covers the OpenAPI schema; there is no docs page (it would load a third-party script);
requests must send their head within `header_seconds` and their body within `body_seconds`;
big prompts are tokenized off the event loop; message content is encoded as text (control
tokens come only from the chat template) and generated special tokens are left out of replies.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .api import LM
from .chat_template import chat_prompt_ids, turn_stops
from .config import ConfigError
from .engine import Engine, EngineBusy, Sequence
from .generation import SampleConfig, context_budget
from .model import ContextLengthError
from .peft import load_loras
from .protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse, SamplingFields
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer_files import load_tokenizer


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
    # Host names accepted besides the loopback ones when bound to a loopback address.
    allowed_hosts: tuple[str, ...] = ()
    # A client must send a request's head within header_seconds of starting it, and its body
    # within body_seconds of the head; an idle keep-alive connection closes after
    # keep_alive_seconds. Without them a socket that sends nothing holds a connection for ever.
    header_seconds: float = 10.0
    body_seconds: float = 30.0
    keep_alive_seconds: float = 5.0
    prefill_chunk: int = 64  # prompt tokens fed between two decoding steps

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_tokens", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_seconds", "header_seconds", "body_seconds", "keep_alive_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.shutdown_seconds >= 0:
            raise ConfigError(f"shutdown_seconds must be >= 0, got {self.shutdown_seconds}")
        if self.api_key is not None:
            check_api_key(self.api_key)
        self.allowed_hosts = tuple(h.lower().rstrip(".") for h in self.allowed_hosts)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def check_api_key(key: str) -> None:
    """A key a client can send: one HTTP header token of visible ASCII. A non-ASCII key, or
    one with a space or a trailing newline, could never match what a client sends, and every
    request would get 401 for ever."""
    if not key:
        raise ConfigError("the API key is empty; give a non-empty key or none")
    if not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ConfigError(
            "the API key must be visible ASCII characters with no spaces (it travels in an "
            "HTTP header, where anything else never matches); pick another key"
        )


def read_api_key(path: str | Path) -> str:
    """The key in a file (`--api-key-file`: unlike --api-key, not visible in `ps`), without
    its final newline; the file is read only up to a few kB."""
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as e:
        raise ConfigError(f"cannot read the API key file {path}: {e.strerror or e}") from None
    if len(data) > 4096:
        raise ConfigError(f"the API key file {path} is over 4 kB; it should hold one key")
    try:
        key = data.decode("ascii").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigError(f"the API key in {path} is not ASCII; pick another key") from None
    check_api_key(key)
    return key


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_warnings(config: ServeConfig) -> list[str]:
    """What `gptkit serve` warns about at startup."""
    if not config.loopback and config.api_key is None:
        return [
            f"serving on {config.host} with no API key: anyone who can reach port "
            f"{config.port} can use the model; set --api-key-file (or --api-key)"
        ]
    return []


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
    (by Content-Length, and by counting for chunked uploads), and bodies that do not arrive
    within `seconds` with 408 (a client sending a byte a minute, or a chunk size of 2^64-1
    and then nothing, would hold its connection for ever)."""

    def __init__(self, app, limit: int, seconds: float = 30.0):
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is over {self.limit} bytes", code="too_large")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen, complete = 0, False
        deadline = time.monotonic() + self.seconds

        async def counted():
            nonlocal seen, complete
            if complete:  # after the body: waiting for a disconnect, which has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.seconds:g} s"
                ) from None
            complete = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # An HTTPException: FastAPI turns any other error raised while it reads the
                # body into "400 There was an error parsing the body".
                raise HTTPException(413, too_big.message)
            return message

        # FastAPI answers the HTTPException with http_error below: 413, code "too_large".
        await self.app(scope, counted, send)


class Gate:
    """ASGI middleware run before anything reads the body: the Host allow-list (a server bound
    to a loopback address answers only loopback names, as Ollama does: a web page the user
    visits cannot reach it by DNS rebinding), then the API key on /v1/* and the schema."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.key = app, config.api_key
        self.hosts = None  # None: any Host (bound to a public address: the key guards it)
        if config.loopback:
            self.hosts = {config.host.lower(), *config.allowed_hosts}  # besides loopback names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if not (is_loopback(host) or host in self.hosts):
                refused = APIError(
                    403,
                    f"the Host {host!r} is not served: this server listens on a loopback "
                    "address and answers only localhost names; start it with "
                    f"--allowed-host {host or 'NAME'} to accept that name",
                    "permission_error",
                    code="host_not_allowed",
                )
                return await refused.response()(scope, receive, send)
        path = scope["path"]
        guarded = self.key is not None and (path.startswith("/v1/") or path == "/openapi.json")
        if guarded and not _bearer_matches(headers.get(b"authorization", b""), self.key):
            refused = APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
            return await refused.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a Host header, without the port: "[::1]:8000" -> "[::1]"."""
    host = host.strip().lower()
    name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
    return name.rstrip(".")


def _bearer_matches(header: bytes, key: str) -> bool:
    """RFC 7235: the scheme is case-insensitive ("bearer", "BEARER"); the key is compared in
    constant time."""
    scheme, _, given = header.strip().partition(b" ")
    matches = hmac.compare_digest(given.strip(), key.encode())
    return matches and scheme.lower() == b"bearer"


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


@dataclass(frozen=True)
class Served:
    """A model name the server answers to: the base model, or one LoRA adapter on it."""

    adapter: int  # the engine's adapter index (peft.MultiLoRA); 0: the base model
    tokenizer: Tokenizer  # renders its chat prompts: an SFT adapter may bring its own template
    chat_stops: tuple[str, ...]  # its end-of-turn strings


def served_models(lm: LM, name: str, adapters: Mapping[str, str | Path]) -> dict[str, Served]:
    """{model name: Served}: the base model as `name`, then each LoRA adapter (a `gptkit
    finetune` adapter directory) as its name, put on lm.model side by side (peft.load_loras).
    Everything is checked before the model changes; a one-line ConfigError names the
    directory refused."""
    for adapter in adapters:
        if not adapter:
            raise ConfigError("an adapter's name is empty; give each one as NAME=DIR")
        if adapter == name:
            raise ConfigError(f"the adapter name {adapter!r} is the base model's; pick another")
    tokenizers = [_adapter_tokenizer(lm, Path(d)) for d in adapters.values()]
    if adapters:
        load_loras(lm.model, adapters)
    models = {name: Served(0, lm.tokenizer, tuple(turn_stops(lm.tokenizer)))}
    for index, (adapter, tok) in enumerate(zip(adapters, tokenizers, strict=True), start=1):
        models[adapter] = Served(index, tok, tuple(turn_stops(tok)))
    return models


def _adapter_tokenizer(lm: LM, directory: Path) -> Tokenizer:
    """The tokenizer finetune saved with the adapter (`gptkit.load(base, adapter=...)` uses
    it: its chat template), or the base model's when there is none. It must be the base's
    vocabulary: the engine decodes every row's tokens with the base tokenizer."""
    path, base = directory / "tokenizer", lm.tokenizer
    if not path.is_dir():
        return base
    tok = load_tokenizer(path)
    if tok.vocab_size != base.vocab_size or tok.special_tokens != base.special_tokens:
        raise ConfigError(
            f"{path} is not the base model's vocabulary ({tok.vocab_size} tokens, the base "
            f"{base.vocab_size}; or other special tokens): serve this adapter alone with "
            f"--adapter {directory}"
        )
    return tok


class Server:
    """The request handling: prompts to sequences, engine events to OpenAI responses."""

    # Prompts up to this size are tokenized on the event loop (cheap at this size);
    # larger ones in a worker thread, so that a megabyte prompt never stalls the other
    # requests' streams, /health, or the next request's parsing.
    INLINE_CHARS = 4096

    def __init__(
        self,
        lm: LM,
        name: str,
        config: ServeConfig,
        adapters: Mapping[str, str | Path] | None = None,
    ):
        self.lm, self.name, self.config = lm, name, config
        self.models = served_models(lm, name, adapters or {})  # before the engine sees lm
        self.engine = Engine(lm, config.max_batch, config.max_queue, config.prefill_chunk)
        # One worker: big prompts wait for each other rather than share two cores with the
        # engine. The tokenizers release the GIL while they encode.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="gptkit-tokenize")

    async def _off_loop(self, size: int, work: Callable[[], Any]) -> Any:
        if size <= self.INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work)

    # --- prompts and sequences -----------------------------------------------------------

    def _check_model(self, body: SamplingFields) -> Served:
        served = self.models.get(body.model)
        if served is None:
            names = ", ".join(map(repr, self.models))
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {names}",
                param="model",
                code="model_not_found",
            )
        return served

    def _budget(
        self, prompt: list[int], max_tokens: int | None, param: str, prompt_param: str
    ) -> int:
        """max_tokens (the request's field `param`) capped so the prompt (the field
        `prompt_param`) and the reply fit the context (None: all of it, up to the server's
        max_tokens)."""
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(
                400,
                f"{param} is {max_tokens} but this server generates at most {limit} tokens "
                "per request; ask for fewer",
                param=param,
                code="max_tokens_too_large",
            )
        wanted = limit if max_tokens is None else max_tokens
        try:
            return context_budget(len(prompt), wanted, self.engine.context)
        except ContextLengthError as e:
            raise APIError(
                400, str(e), param=prompt_param, code="context_length_exceeded"
            ) from None

    def _submit(
        self, outbox: Outbox, body: SamplingFields, prompts: list[list[int]], budget, stop
    ) -> None:
        """Queue body.n sequences per prompt; choice index = prompt * n + i, as OpenAI's."""
        self._check_count(len(prompts) * body.n)
        bias = self._logit_bias(body)
        adapter = self.models[body.model].adapter
        deadline = time.monotonic() + self.config.max_seconds
        for p, prompt in enumerate(prompts):
            for i in range(body.n):
                try:
                    sample = SampleConfig(
                        max_new_tokens=budget(prompt),
                        temperature=body.temperature,
                        top_k=body.top_k,
                        top_p=body.top_p,
                        min_p=body.min_p,
                        repetition_penalty=body.repetition_penalty,
                        frequency_penalty=body.frequency_penalty,
                        presence_penalty=body.presence_penalty,
                        logit_bias=bias,
                        stop=stop,
                        seed=None if body.seed is None else body.seed + i,
                        logprobs=body.logprob_count,
                    )
                except ConfigError as e:  # the protocol's ranges should make this unreachable
                    outbox.cancel()
                    raise APIError(400, str(e)) from None
                seq = Sequence(
                    prompt,
                    sample,
                    outbox.emitter(p * body.n + i),
                    deadline=deadline,
                    skip_special=body.skip_special_tokens,
                    adapter=adapter,
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

    async def _encode_prompts(self, body: CompletionRequest) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            self._check_count(len(texts) * body.n)  # before any work on the texts
            tok = self.lm.tokenizer
            # Special-token strings are text unless the client asks for a raw prompt.
            encode = (lambda t: tok.encode_many([t])[0]) if body.parse_special else tok.encode_text

            def work() -> list[list[int]]:
                return [self._nonempty(self._encoded(encode, t, "prompt")) for t in texts]

            return await self._off_loop(sum(map(len, texts)), work)
        rows = [prompt] if isinstance(prompt[0], int) else prompt
        self._check_count(len(rows) * body.n)
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

    def _check_count(self, wanted: int) -> None:
        most = self.engine.waiting.maxsize
        if wanted > most:  # would never fit, however long the client waited
            raise APIError(
                400,
                f"this request asks for {wanted} completions (prompts x n) but the server "
                f"queues at most {most}; send fewer prompts or a smaller n",
                param="n",
            )

    def _nonempty(self, ids: list[int]) -> list[int]:
        return ids or self.lm.prompt_ids("")  # an empty prompt starts from BOS (or EOS)

    @staticmethod
    def _encoded(encode: Callable[[str], list[int]], text: str, param: str) -> list[int]:
        try:
            return encode(text)
        except ValueError as e:  # e.g. a lone surrogate ("\\udc80" in the JSON): not text
            raise APIError(400, str(e), param=param) from None

    # --- the two generation routes -------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body)
        prompts = await self._encode_prompts(body)
        # OpenAI's default of 16 applies when the client sets none; the server's cap, if lower.
        limit = body.max_tokens
        if "max_tokens" not in body.model_fields_set:
            limit = min(limit, self.config.max_tokens)

        def budget(prompt: list[int]) -> int:
            return self._budget(prompt, limit, "max_tokens", "prompt")

        for prompt in prompts:
            budget(prompt)  # every prompt must fit before any starts
        if body.echo and body.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs would need the prompt's log-probabilities, which this server "
                "does not compute; drop one of them",
                param="logprobs",
            )
        outbox = Outbox()
        self._submit(outbox, body, prompts, budget, body.stops)
        echoes = [self.lm.tokenizer.decode(p) if body.echo else "" for p in prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "model": body.model}

        sent = [0] * len(outbox.sequences)  # characters of each choice so far (text_offset)

        def choice(i: int, text: str, reason: str | None, tokens=None) -> dict:
            logprobs = None
            if body.logprobs is not None:
                logprobs = self._completion_logprobs(tokens or [], sent[i])
            sent[i] += len(text)
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:

            def chunk(i, piece, reason, tokens=None):
                if piece is None:  # the opening chunk: the echoed prompt, if any
                    echo = echoes[i // body.n]
                    return [choice(i, echo, None)] if echo else None
                return [choice(i, piece, reason, tokens)]

            return EventStream(self._stream(outbox, body, head, chunk, prompt_tokens))
        texts, reasons, tokens = await self._collect(outbox, request)
        choices = [
            choice(i, echoes[i // body.n] + t, r, tokens[i])
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return self._response(head, choices, outbox, prompt_tokens)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        served = self._check_model(body)
        self._check_count(body.n)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in body.messages
        ]

        def work() -> list[int]:
            try:  # control tokens only from the template; contents are text
                return self._nonempty(chat_prompt_ids(served.tokenizer, messages))
            except ValueError as e:  # ChatTemplateError, or content that is not text
                raise APIError(400, str(e), param="messages") from None

        # Each message costs the template a few strings: count them with the contents.
        size = sum(len(m["content"]) + 16 for m in messages)
        prompt = await self._off_loop(size, work)
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        budget = self._budget(prompt, getattr(body, field), field, "messages")
        outbox = Outbox()
        self._submit(outbox, body, [prompt], lambda p: budget, [*body.stops, *served.chat_stops])
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "model": body.model,
        }
        if body.stream:

            def chunk(i, piece, reason, tokens=None):
                # The first chunk of a choice carries the role, as OpenAI's stream does.
                delta = {"role": "assistant", "content": ""} if piece is None else {}
                if piece:
                    delta["content"] = piece
                logprobs = self._chat_logprobs(tokens) if body.logprobs and tokens else None
                return [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]

            head = {**head, "object": "chat.completion.chunk"}
            return EventStream(self._stream(outbox, body, head, chunk, len(prompt)))
        texts, reasons, tokens = await self._collect(outbox, request)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": t},
                "logprobs": self._chat_logprobs(tokens[i]) if body.logprobs else None,
                "finish_reason": r,
            }
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return self._response(head, choices, outbox, len(prompt))

    # --- engine events to responses --------------------------------------------------------

    # How often a non-streamed request looks for its client, whether tokens come or not.
    DISCONNECT_CHECK_SECONDS = 0.25

    async def _collect(self, outbox: Outbox, request: Request):
        """(texts, finish reasons, logprob entries) of every sequence once all have finished;
        a client gone meanwhile cancels them all (checked every DISCONNECT_CHECK_SECONDS even
        while tokens keep coming: a request that bans EOS would otherwise hold its slots until
        max_tokens or --max-seconds)."""
        n = len(outbox.sequences)
        texts, reasons, tokens = [""] * n, [None] * n, [[] for _ in range(n)]
        check = self.DISCONNECT_CHECK_SECONDS
        next_check = time.monotonic() + check
        try:
            while any(r is None for r in reasons):
                try:
                    i, (kind, value) = await asyncio.wait_for(outbox.queue.get(), check)
                except TimeoutError:
                    i, kind, value = -1, "wait", None
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        raise APIError(499, "the client closed the request") from None
                    next_check = time.monotonic() + check
                if kind == "text":
                    texts[i] += value
                elif kind == "logprob":
                    tokens[i].append(value)
                elif kind == "done":
                    reasons[i] = value
                elif kind == "error":
                    raise APIError(503, value, "server_error")
        finally:
            outbox.cancel()  # a no-op for finished sequences
        return texts, reasons, tokens

    async def _stream(self, outbox, body, head, chunk, prompt_tokens) -> AsyncIterator[str]:
        """OpenAI's server-sent events: a chunk per text piece, a finishing chunk per choice,
        the usage chunk when asked for, then [DONE]."""
        head = {**head, "created": int(time.time())}
        n, live = len(outbox.sequences), len(outbox.sequences)
        tokens = [[] for _ in range(n)]  # logprob entries not yet sent, per choice
        try:
            for i in range(n):
                if opening := chunk(i, None, None):
                    yield _sse({**head, "choices": opening})
            while live:
                i, (kind, value) = await outbox.queue.get()
                if kind == "logprob":
                    tokens[i].append(value)
                elif kind == "text":
                    yield _sse({**head, "choices": chunk(i, value, None, tokens[i])})
                    tokens[i] = []
                elif kind == "done":
                    live -= 1
                    yield _sse({**head, "choices": chunk(i, "", value, tokens[i])})
                else:
                    error = {"message": value, "type": "server_error", "param": None, "code": None}
                    yield _sse({"error": error})
                    return
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(outbox, prompt_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            outbox.cancel()

    # --- log-probabilities in OpenAI's two shapes ---------------------------------------------
    # entries: (token id, logprob, {alternative id: logprob}) per generated token. A token's
    # string is its own decoded text (a byte-level piece of a character decodes to U+FFFD).

    def _completion_logprobs(self, entries: list, offset: int) -> dict:
        """The legacy completions' object: tokens, token_logprobs, top_logprobs, text_offset."""
        decode = self.lm.tokenizer.decode
        tokens = [decode([t]) for t, _, _ in entries]
        offsets = list(itertools.accumulate(map(len, tokens), initial=offset))[:-1]
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{decode([a]): b for a, b in top.items()} for _, _, top in entries],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, entries: list) -> dict:
        """The chat completions' object: content = [{token, logprob, bytes, top_logprobs}]."""
        decode = self.lm.tokenizer.decode

        def item(token: int, logprob: float) -> dict:
            text = decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            {**item(t, lp), "top_logprobs": [item(a, b) for a, b in top.items()]}
            for t, lp, top in entries
        ]
        return {"content": content, "refusal": None}

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
            "choices": choices,
            "usage": self._usage(outbox, prompt_tokens),
        }


# Names pydantic puts in an error's location for the member of a union it tried.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def create_app(
    lm: LM,
    name: str,
    config: ServeConfig | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> FastAPI:
    """The FastAPI app serving `lm` as the model `name`, and each LoRA adapter directory of
    `adapters` on it as its name (see served_models); the engine runs while the app does."""
    config = config or ServeConfig()
    server = Server(lm, name, config, adapters)

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

    # No docs page (FastAPI's loads swagger-ui from a CDN into this origin, unpinned); the
    # schema is served below, behind the key; no trailing-slash redirects (they would echo
    # the request's Host in Location).
    app = FastAPI(
        title="gptkit",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.server = server
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, seconds=config.body_seconds)
    app.add_middleware(Gate, config=config)  # added last: runs first

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        # The field's path in the request; pydantic adds the union member it tried ("str",
        # "list[int]", "function-after[...]"), which names no field: those are dropped.
        where = [
            str(p)
            for p in first.get("loc", ())[1:]
            if isinstance(p, int) or (str(p).isidentifier() and p not in _TYPE_TAGS)
        ]
        param = ".".join(where) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {413: "too_large", 408: "timeout"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # a bug: still OpenAI's shape
        return APIError(500, "internal server error (a bug in gptkit)", "server_error").response()

    # What the routes answer, for the OpenAPI schema (clients and schemathesis read it).
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 408, 413, 503)}
    generated = {
        **errors,
        200: {"content": {"application/json": {}, "text/event-stream": {}}},
    }

    @app.get("/openapi.json", include_in_schema=False)
    async def schema():
        return app.openapi()

    @app.get("/health")
    async def health():
        engine = server.engine
        return {
            "status": "ok",
            "model": name,
            "running": len(engine.running),
            "waiting": engine.waiting.qsize(),
        }

    @app.get("/v1/models", responses=errors)
    async def models():
        cards = []
        for model, served in server.models.items():
            card = {"id": model, "object": "model", "created": 0, "owned_by": "gptkit"}
            card["context_length"] = server.engine.context
            if served.adapter:  # an adapter names its base model, as vLLM's model cards do
                card["parent"] = name
            cards.append(card)
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", responses=generated)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", responses=generated)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    page = files("gptkit").joinpath("static/chat.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    return app


def uvicorn_config(app: FastAPI, config: ServeConfig, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`: h11 with the request-head deadline, the keep-alive limit;
    uvicorn's own graceful-shutdown limit is a backstop for clients that stop reading."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=deadline_protocol(config.header_seconds),
        timeout_keep_alive=config.keep_alive_seconds,
        h11_max_incomplete_event_size=16 * 1024,  # a request head over 16 kB: 400
        timeout_graceful_shutdown=config.shutdown_seconds + 5,
        **{"log_level": "info", **options},
    )


def serve(
    lm: LM, name: str, config: ServeConfig, adapters: Mapping[str, str | Path] | None = None
) -> None:
    """Run the server until Ctrl-C or SIGTERM, then shut down gracefully: no new requests;
    generations in flight get config.shutdown_seconds, then end with finish_reason "length",
    so every response completes; the engine stops and serve returns (the process exits 0)."""
    app = create_app(lm, name, config, adapters)
    for warning in security_warnings(config):
        print(f"gptkit: warning: {warning}", file=sys.stderr, flush=True)
    server = GracefulServer(
        uvicorn_config(app, config), app.state.server.engine, config.shutdown_seconds
    )
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind the address or its startup fails
        raise ConfigError(
            f"the server could not start on {config.host}:{config.port} (see the log above); "
            "is the port in use? pick another with --port"
        ) from None


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's head (request line and
    headers): uvicorn has a keep-alive timeout between requests but none while a head is
    arriving, so a socket that connects and sends nothing, or half a header, stayed open for
    ever. A client that misses the deadline gets 408 and the connection is closed."""

    head_seconds = 10.0
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Time the head while the next request has not been read whole (h11 IDLE); the
        keep-alive timeout covers a connection with no data at all after a response."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._timer is None and (self.cycle is None or self.cycle.response_complete):
            self._timer = self.loop.call_later(self.head_seconds, self._head_too_slow)
        elif not waiting:
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_too_slow(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            # h11 cannot answer a request it has not read: the bytes are written as they are.
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()


def deadline_protocol(seconds: float) -> type[HeadDeadline]:
    return type("HeadDeadline", (HeadDeadline,), {"head_seconds": seconds})


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
