"""The OpenAI HTTP API's request bodies, as pydantic models (the subset a local model serves).

Field names, defaults and ranges follow OpenAI's API reference, so a request that OpenAI
accepts is accepted here with the same meaning, and an out-of-range value is refused with the
field named. `top_k`, `min_p` and `repetition_penalty` are the extensions vLLM and
llama.cpp's server also take. Unknown fields are refused (as OpenAI does), so a typo never
passes silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from .generation.sampling import MAX_TOP_LOGPROBS

# OpenAI allows up to 4 stop sequences and up to 128 choices; a local server keeps n small.
MAX_STOP = 4
MAX_STOP_IDS = 64
MAX_N = 8
# Refused before any rendering: a chat of thousands of turns never fits a context anyway, and
# rendering 30,000 empty messages cost about a second of CPU (AMD EPYC, 2 cores).
MAX_MESSAGES = 2048


def _text(value: str | None, what: str) -> str | None:
    """A string that can be UTF-8: Python's json reads a lone surrogate ("\\ud800"), which is
    no character, and the tokenizers refuse it later; refuse it here with the field named."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start]
            raise ValueError(
                f"{what} is not valid text: it holds a lone surrogate (U+{ord(bad):04X})"
            ) from None
    return value


# The range of a seed: the int64 OpenAI documents (torch takes any 64-bit value).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    # Types as the schema says, as OpenAI checks them: no "0.7" for a number, no 0 for a bool.
    # Python's json module reads NaN and Infinity; no sampling parameter means anything by them.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # JSON object keys are strings: the token ids are parsed from them.
    logit_bias: (
        dict[Annotated[int, Strict(False)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None
    ) = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    # vLLM's extension: token ids that end a reply as EOS does (left out of the text).
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP_IDS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension, on by default as there: special tokens the model generates are left
    # out of the returned text, so that a client sending the reply back as history cannot
    # smuggle control tokens in. false returns them as text.
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop):
        if stop == "" or (isinstance(stop, list) and "" in stop):
            raise ValueError("stop sequences must not be empty strings")
        for s in [stop] if isinstance(stop, str) else stop or []:
            _text(s, "a stop sequence")
        return stop

    @field_validator("user")
    @classmethod
    def _user_is_text(cls, user):
        return _text(user, "user")

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """POST /v1/completions. `prompt` is text, a list of texts, or token ids (one or many)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] = 16  # OpenAI's default for completions
    echo: bool = False
    # The legacy completions' logprobs: each token's, and the k most likely alternatives.
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # Special-token strings in a text prompt are plain text, as OpenAI treats them; true makes
    # them control tokens (a raw prompt written in the model's own format). Token-id prompts
    # are always taken as they are.
    parse_special: bool = False

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Extra keys (e.g. "name", which a local model has no use for) are ignored, not refused.
    model_config = ConfigDict(strict=True, allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers: OpenAI's shape (documented in the OpenAPI schema)."""

    error: ErrorBody


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    # None: as many as the context leaves (OpenAI's default); max_completion_tokens is the
    # newer name for the same limit.
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:  # as OpenAI refuses it
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_count(self) -> int | None:
        """SampleConfig.logprobs: None, or how many alternatives to report per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _text_inputs(most: int) -> Any:
    """The `input` of /v1/classify and /v1/embeddings: one text, or a list of 1..most."""
    text = Annotated[str, Field(min_length=1)]
    return text | Annotated[list[text], Field(min_length=1, max_length=most)]


# Inputs of one /v1/classify request: each is one row of a batch the model runs.
MAX_CLASSIFY_INPUTS = 256
ClassifyInputs = _text_inputs(MAX_CLASSIFY_INPUTS)
# Inputs of one /v1/embeddings request (OpenAI takes 2,048): each is one row the embedder
# runs, all in one call, so the cap bounds a request's time and memory as for /v1/classify.
MAX_EMBEDDING_INPUTS = 256
EmbeddingInputs = _text_inputs(MAX_EMBEDDING_INPUTS)


class ClassifyRequest(_Strict):
    """POST /v1/classify, vLLM's shape: `input` is one text or a list of texts."""

    model: str
    input: ClassifyInputs
    user: str | None = None

    @field_validator("input", "user")
    @classmethod
    def _is_text(cls, value):
        for text in value if isinstance(value, list) else [value]:
            _text(text, "input")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings, OpenAI's shape: `input` is one text or a list of texts."""

    model: str
    input: EmbeddingInputs
    # base64: the vector's little-endian float32 bytes, as OpenAI sends them (a third of the
    # JSON's size; the official client asks for it by default).
    encoding_format: Literal["float", "base64"] = "float"
    # OpenAI shortens text-embedding-3 vectors to `dimensions`; these models were not trained
    # for that, so only their own size is accepted (else 400).
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _plain_refusals(cls, value):
        # Said in words: the union's own errors would read "Input should be a valid string".
        if value == [] or value == "":
            raise ValueError("input is empty; send a text or a list of texts")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input has {len(value)} texts; this server embeds at most "
                             f"{MAX_EMBEDDING_INPUTS} per request: split them")  # fmt: skip
        if isinstance(value, list):
            # OpenAI also takes token ids; they are ids of its own tokenizer, which mean
            # nothing to a local embedder.
            if any(isinstance(v, int | list) and not isinstance(v, bool) for v in value):
                raise ValueError("token-id arrays are not accepted here; send text (a string "
                                 "or a list of strings)")  # fmt: skip
            if "" in value:
                raise ValueError(f"input[{value.index('')}] is an empty string; every input "
                                 "needs some text")  # fmt: skip
        for text in value if isinstance(value, list) else [value]:
            _text(text, "input")  # before the str check, whose words would be pydantic's
        return value

    @field_validator("user")
    @classmethod
    def _user_is_text(cls, user):
        return _text(user, "user")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """What POST /v1/embeddings answers (documented in the OpenAPI schema)."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
