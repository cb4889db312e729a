"""OpenAI's API over the engine: a request's prompt and options become engine sequences, and
the engine's events become OpenAI responses, whole or as server-sent events (the chunk
format, usage, log-probabilities in both of OpenAI's shapes). serve.py puts it behind routes.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Request

from .api import LM
from .chat_template import chat_prompt_ids
from .config import ConfigError
from .embed_api import Worker
from .engine import Engine, EngineBusy, Sequence
from .generation import SampleConfig, context_budget
from .model import ContextLengthError
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, _text
from .rag import Retriever, grounded_messages, source_cards
from .serve_events import EventStream, Outbox, sse
from .serve_guard import APIError, ServeConfig, overloaded
from .serve_models import Served, served_models
from .tokenizer import TokenizerError


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
        retriever: Retriever | None = None,
        retrieving: Worker | None = None,
    ):
        self.lm, self.name, self.config = lm, name, config
        self.models = served_models(lm, name, adapters or {})  # before the engine sees lm
        # `gptkit serve --retrieval`: each chat turn is grounded in the index's best chunks,
        # retrieved on the `retrieving` worker (the embedder's thread, shared with
        # /v1/embeddings). Raw prompts (/v1/completions) are the client's own: left as sent.
        if (retriever is None) != (retrieving is None):
            raise ValueError("a retriever needs its worker, and a worker a retriever")
        self.retriever, self.retrieving = retriever, retrieving
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
        self._check_max_tokens(max_tokens, param)
        limit = self.config.max_tokens
        wanted = limit if max_tokens is None else max_tokens
        try:
            return context_budget(len(prompt), wanted, self.engine.context)
        except ContextLengthError as e:
            raise APIError(
                400, str(e), param=prompt_param, code="context_length_exceeded"
            ) from None

    def _check_max_tokens(self, max_tokens: int | None, param: str) -> None:
        limit = self.config.max_tokens
        if max_tokens is not None and max_tokens > limit:
            raise APIError(
                400,
                f"{param} is {max_tokens} but this server generates at most {limit} tokens "
                "per request; ask for fewer",
                param=param,
                code="max_tokens_too_large",
            )

    def _submit(
        self, outbox: Outbox, body: SamplingFields, prompts: list[list[int]], budget, stop
    ) -> None:
        """Queue body.n sequences per prompt; choice index = prompt * n + i, as OpenAI's."""
        self._check_count(len(prompts) * body.n)
        bias = self._logit_bias(body)
        stop_ids = self._token_ids(body.stop_token_ids or [], "stop_token_ids")
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
                        stop_ids=stop_ids,
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
                    raise overloaded(str(e)) from None
                outbox.sequences.append(seq)

    def _logit_bias(self, body: SamplingFields) -> dict[int, float]:
        bias = body.logit_bias or {}
        self._token_ids(bias, "logit_bias")
        return bias

    def _token_ids(self, ids, param: str) -> list[int]:
        """ids (a list, or a dict's keys) if every one is a token id of the model, else 400."""
        vocab = self.lm.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"{param} token ids must be in [0, {vocab})", param=param)
        return list(ids)

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
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        extra = {}  # top-level fields beside OpenAI's: the sources of a retrieving server
        if self.retriever is not None:
            # A request is valid or not whatever the retrieval finds: what _submit would
            # refuse is refused before a no_answer could skip it.
            self._check_max_tokens(getattr(body, field), field)
            self._logit_bias(body)
            self._token_ids(body.stop_token_ids or [], "stop_token_ids")
            for m in messages:  # what the embedder cannot read: 400 here, as the template's
                try:
                    _text(m["content"], "a message's content")
                except ValueError as e:
                    raise APIError(400, str(e), param="messages") from None
            hits = await self.retrieving.run("retrieval", self.retriever.retrieve, messages)
            extra["sources"] = source_cards(hits)
            if not hits:  # nothing in the documents passed min_score: say so, invent nothing
                outbox = Outbox()
                outbox.canned_replies(body.n, self.retriever.config.no_answer)
                return await self._chat_response(body, request, outbox, 0, extra)
            messages = grounded_messages(messages, hits)

        def work() -> list[int]:
            try:  # control tokens only from the template; contents are text
                return self._nonempty(chat_prompt_ids(served.tokenizer, messages))
            except ValueError as e:  # ChatTemplateError, or content that is not text
                raise APIError(400, str(e), param="messages") from None

        # Each message costs the template a few strings: count them with the contents.
        size = sum(len(m["content"]) + 16 for m in messages)
        prompt = await self._off_loop(size, work)
        budget = self._budget(prompt, getattr(body, field), field, "messages")
        outbox = Outbox()
        self._submit(outbox, body, [prompt], lambda p: budget, [*body.stops, *served.chat_stops])
        return await self._chat_response(body, request, outbox, len(prompt), extra)

    async def _chat_response(self, body, request, outbox: Outbox, prompt_tokens: int, extra):
        """The chat completion of outbox's choices: streamed or whole."""
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
            return EventStream(self._stream(outbox, body, head, chunk, prompt_tokens, extra))
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
        return {**self._response(head, choices, outbox, prompt_tokens), **extra}

    # --- engine events to responses --------------------------------------------------------

    # How often a non-streamed request looks for its client, whether tokens come or not.
    DISCONNECT_CHECK_SECONDS = 0.25

    async def _collect(self, outbox: Outbox, request: Request):
        """(texts, finish reasons, logprob entries) of every sequence once all have finished;
        a client gone meanwhile cancels them all (checked every DISCONNECT_CHECK_SECONDS even
        while tokens keep coming: a request that bans EOS would otherwise hold its slots until
        max_tokens or --max-seconds)."""
        n = outbox.size
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

    async def _stream(
        self, outbox, body, head, chunk, prompt_tokens, first: dict | None = None
    ) -> AsyncIterator[str]:
        """OpenAI's server-sent events: a chunk per text piece, a finishing chunk per choice,
        the usage chunk when asked for, then [DONE]. `first`: fields the first chunk alone
        carries besides OpenAI's (a retrieving server's sources)."""
        head = {**head, "created": int(time.time())}
        n = live = outbox.size
        tokens = [[] for _ in range(n)]  # logprob entries not yet sent, per choice
        extra = dict(first or {})

        def event(choices: list) -> str:
            nonlocal extra
            data, extra = {**head, "choices": choices, **extra}, {}
            return sse(data)

        try:
            for i in range(n):
                if opening := chunk(i, None, None):
                    yield event(opening)
            while live:
                i, (kind, value) = await outbox.queue.get()
                if kind == "logprob":
                    tokens[i].append(value)
                elif kind == "text":
                    yield event(chunk(i, value, None, tokens[i]))
                    tokens[i] = []
                elif kind == "done":
                    live -= 1
                    yield event(chunk(i, "", value, tokens[i]))
                else:
                    error = {"message": value, "type": "server_error", "param": None, "code": None}
                    yield sse({"error": error})
                    return
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(outbox, prompt_tokens)})
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
