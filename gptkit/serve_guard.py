"""The server's settings (ServeConfig) and its defences at the HTTP layer, before any
request reaches a route: the Host allow-list and the API key (Gate), body size and body time
(BodyLimit), the request head's deadline (HeadDeadline), and OpenAI-shaped errors (APIError).
docs/RELIABILITY.md ("Serving") says what each one stops.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ConfigError


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


def overloaded(message: str) -> APIError:
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
