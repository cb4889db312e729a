"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) and a web chat page, over engine.py.

    gptkit serve --model smollm2-135m-instruct            # http://127.0.0.1:8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream
server-sent events with `"stream": true`, in OpenAI's chunk format), POST /v1/embeddings
(embed_api.py), GET /health, and the chat page at /. A classifier (from `gptkit finetune
classify`) is served on POST /v1/classify instead (classify_api.py), and its completion
routes answer 400 saying so.

Retrieval (`gptkit serve --retrieval INDEX`, a rag.Retriever): each chat completion is
grounded in the index's best chunks for the conversation's last user turn (rag.py puts them,
numbered, in the system message and asks for [n] citations), and the response carries them
as a top-level "sources" list (rag.source_cards) beside OpenAI's fields, in the completion
object and in the first chunk of a stream; clients that do not know the field ignore it.
When no chunk reaches the retriever's min_score, the reply is its no_answer text (finish
reason "stop", no tokens generated) and "sources" is empty. /v1/completions takes raw
prompts, often already in the model's own format: they are left as sent, never retrieved for.

Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the
status code OpenAI uses. Handlers only validate and translate: the engine thread owns the
model and batches every running request into each decoding step.

The layers: serve_guard.py (settings and HTTP-level defences), openai_api.py (requests to
engine sequences, engine events to OpenAI responses), this module (routes, app, process).

Several LoRA adapters can be served on one base model (`adapters`, `gptkit serve --adapter
NAME=DIR`): the request's `model` field picks one by name, the base model's name serves the
base; requests for different adapters share the engine's decoding steps (multi_lora.MultiLoRA).

Hardening (docs/RELIABILITY.md, "Serving"): bound to a loopback address the server answers
only loopback Host names (DNS rebinding); the API key is checked before a body is read, and
covers the OpenAPI schema; there is no docs page (it would load a third-party script);
requests must send their head within `header_seconds` and their body within `body_seconds`;
big prompts are tokenized off the event loop; message content is encoded as text (control
tokens come only from the chat template) and generated special tokens are left out of replies.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException

from .api import LM
from .classify_api import ClassifyServer
from .config import ConfigError
from .embed import Embedder, ModelEmbedder
from .embed_api import EmbeddingServer, Worker, embedding_model_id
from .engine import Engine
from .openai_api import Server
from .protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
)
from .rag import Retriever
from .serve_guard import (
    APIError,
    BodyLimit,
    Gate,
    ServeConfig,
    security_warnings,
    uvicorn_config,
)

__all__ = ["ServeConfig", "create_app", "serve"]  # ServeConfig: serve_guard.py

# Names pydantic puts in an error's location for the member of a union it tried.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def create_app(
    lm: LM,
    name: str,
    config: ServeConfig | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    retriever: Retriever | None = None,
    embedder: Embedder | None = None,
) -> FastAPI:
    """The FastAPI app serving `lm` as the model `name`, and each LoRA adapter directory of
    `adapters` on it as its name (serve_models.py); the engine runs while the app does.
    `retriever` grounds every chat completion in its index; /v1/embeddings embeds with
    `embedder`, else the retriever's index's, else `lm` itself (mean-pooled)."""
    config = config or ServeConfig()
    head = lm.config.head
    if head == "tag":
        raise ConfigError("serving a tagger is not supported; label files with `gptkit predict`")
    if head == "classify" and adapters:
        raise ConfigError("--adapter puts LoRA adapters on a language model, not a classifier")
    if head == "classify" and retriever is not None:
        raise ConfigError("--retrieval grounds a language model's chat replies; a classifier "
                          "writes none")  # fmt: skip
    # The embedder's one thread: /v1/embeddings and the retrieval for each chat turn.
    embedding = Worker("gptkit-embed", config.max_queue)
    # A language model generates through the engine; a classifier answers /v1/classify.
    server = None
    if head == "lm":
        server = Server(lm, name, config, adapters, retriever, embedding if retriever else None)
    classifier = ClassifyServer(lm, name, config) if head == "classify" else None
    embeddings = _embedding_server(lm, name, server, retriever, embedder, embedding)

    lifespans = 0  # the engine runs while any lifespan of the app does

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal lifespans
        lifespans += 1
        if server:
            server.engine.start()
        if classifier:
            classifier.start()
        embedding.start()
        try:
            yield
        finally:
            lifespans -= 1
            if not lifespans and server:
                server.engine.close()
            if not lifespans and classifier:
                classifier.close()
            if not lifespans:
                embedding.close()

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
    app.state.server = server  # None for a classifier
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

    # The embedding model's card, unless it has a served model's name: the model itself, or
    # an index built with the served model (`gptkit index --embedder MODEL`).
    embedder_cards = [embeddings.card()]
    if embeddings.model == name or (server and embeddings.model in server.models):
        embedder_cards = []

    @app.get("/health")
    async def health():
        if classifier:
            return {"status": "ok", "model": name, "waiting": classifier.waiting}
        engine = server.engine
        return {
            "status": "ok",
            "model": name,
            "running": len(engine.running),
            "waiting": engine.waiting.qsize(),
        }

    def generating() -> Server:
        if server is None:
            raise APIError(
                400,
                f"the model {name!r} is a classifier ({head} head) and generates no text; "
                "POST /v1/classify",
                code="wrong_model_type",
            )
        return server

    @app.get("/v1/models", responses=errors)
    async def models():
        if classifier:
            card = {"id": name, "object": "model", "created": 0, "owned_by": "gptkit"}
            card["context_length"] = lm.model.context
            return {"object": "list", "data": [{**card, **classifier.card()}, *embedder_cards]}
        cards = []
        for model, served in server.models.items():
            card = {"id": model, "object": "model", "created": 0, "owned_by": "gptkit"}
            card["context_length"] = server.engine.context
            if served.adapter:  # an adapter names its base model, as vLLM's model cards do
                card["parent"] = name
            cards.append(card)
        return {"object": "list", "data": [*cards, *embedder_cards]}

    @app.post("/v1/completions", responses=generated)
    async def completions(body: CompletionRequest, request: Request):
        return await generating().completions(body, request)

    @app.post("/v1/chat/completions", responses=generated)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generating().chat(body, request)

    @app.post("/v1/classify", responses=errors)
    async def classify(body: ClassifyRequest):
        if classifier is None:
            raise APIError(
                400,
                f"the model {name!r} is a language model; /v1/classify needs a classifier "
                "(from `gptkit finetune classify`)",
                code="wrong_model_type",
            )
        return await classifier.classify(body)

    @app.post("/v1/embeddings", responses={**errors, 200: {"model": EmbeddingResponse}})
    async def embed(body: EmbeddingRequest):
        return await embeddings.embeddings(body)

    page = files("gptkit").joinpath("static/chat.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return page

    return app


def _embedding_server(
    lm: LM,
    name: str,
    server: Server | None,
    retriever: Retriever | None,
    embedder: Embedder | None,
    worker: Worker,
) -> EmbeddingServer:
    """/v1/embeddings' model: `embedder`, the index's, or the served model mean-pooled."""
    if embedder is None and retriever is not None:
        embedder = retriever.index.embedder()  # its vectors compare with the index's
    if embedder is not None:
        return EmbeddingServer(embedder, embedding_model_id(embedder), worker)
    refusal = None
    if getattr(lm.model, "multi_lora", None) is not None:
        # Adapters served side by side select each batch row's adapter on the model itself
        # (multi_lora.MultiLoRA.rows) while the engine decodes: a second forward pass on another
        # thread would read the engine's rows.
        refusal = (
            f"the model {name!r} serves LoRA adapters side by side and cannot embed while it "
            "generates; start the server with --embedder (e.g. --embedder minilm)"
        )
    return EmbeddingServer(ModelEmbedder(lm, name=name), name, worker, refusal)


def serve(
    lm: LM,
    name: str,
    config: ServeConfig,
    adapters: Mapping[str, str | Path] | None = None,
    retriever: Retriever | None = None,
    embedder: Embedder | None = None,
) -> None:
    """Run the server until Ctrl-C or SIGTERM, then shut down gracefully: no new requests;
    generations in flight get config.shutdown_seconds, then end with finish_reason "length",
    so every response completes; the engine stops and serve returns (the process exits 0)."""
    app = create_app(lm, name, config, adapters, retriever, embedder)
    for warning in security_warnings(config):
        print(f"gptkit: warning: {warning}", file=sys.stderr, flush=True)
    generating = app.state.server
    server = GracefulServer(
        uvicorn_config(app, config), generating and generating.engine, config.shutdown_seconds
    )
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

    def __init__(self, config: uvicorn.Config, engine: Engine | None, grace: float):
        super().__init__(config)
        self.engine, self.grace = engine, grace  # engine None: a classifier, nothing to drain

    def handle_exit(self, sig, frame) -> None:
        if self.engine is not None:
            self.engine.drain(self.grace)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these
        if captured is not None:
            captured.clear()
