"""Typed configuration of a model: its shape (GPTConfig) and the named presets, plus the
ConfigError every config raises. Runs are configured in train_config.py (TrainConfig,
FinetuneConfig, PeftConfig); sampling options live with the sampler (generation/sampling.py).

Every knob a GPT-family model needs lives in GPTConfig, so one `GPT` module covers GPT-1
(post-norm, learned positions), GPT-2/3 (pre-norm, GELU, GPT-3's banded sparse layers) and
Llama-style models (RMSNorm, RoPE, SwiGLU, grouped-query attention).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

QUANTIZE_CHOICES = ("int8",)  # weight formats quantize.py makes for CPU inference
DTYPES = ("float32", "bfloat16")  # what batch inference computes its matmuls in (precision.py)

Positions = Literal["learned", "sinusoidal", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu"]
AttentionPattern = Literal["dense", "alternating"]
Head = Literal["lm", "classify", "tag"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (a library's can run to a dozen), cut to
    `limit` characters, or its type's name when it has none: what a one-line error quotes."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: n_embd // n_head (GPT-3 13B needs it explicit)
    intermediate_size: int | None = None  # None: 4 * n_embd
    positions: Positions = "learned"
    rope_theta: float = 10000.0
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True  # False: GPT-1 / original Transformer post-norm, no final norm
    activation: Activation = "gelu_tanh"
    attention: AttentionPattern = "dense"  # "alternating": GPT-3 dense / locally banded layers
    local_window: int = 256  # band width of the sparse layers when attention="alternating"
    bias: bool = True  # biases in linear layers and LayerNorm
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # The output layer: "lm" predicts the next token; "classify" one label per sequence (read
    # at its last token); "tag" one label per token. `labels` names the classes (HF's id2label).
    head: Head = "lm"
    labels: list[str] = field(default_factory=list)
    # A classify head may predict several fields at once (topic and sentiment): label_fields
    # names them and label_sizes says how many of `labels`, in turn, belong to each. Empty:
    # one field, "label".
    label_fields: list[str] = field(default_factory=list)
    label_sizes: list[int] = field(default_factory=list)
    # A bias on the classify / tag head. Hugging Face's *ForSequenceClassification heads have
    # none, so new heads have none either (and export as they are); older checkpoints do.
    score_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("n_head", "n_embd"):  # checked first: the defaults below divide by them
            _check_size(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        self.validate()

    def validate(self) -> None:
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "head_dim")
        for name in (*sizes, "n_kv_head", "intermediate_size", "local_window"):
            _check_size(name, getattr(self, name))
        if self.largest_tensor() > MAX_TENSOR_ELEMENTS:
            raise ConfigError(
                f"a weight of this model would hold {self.largest_tensor():,} values, more "
                f"than the {MAX_TENSOR_ELEMENTS:,} gptkit allows (vocab_size, block_size, "
                "n_embd or intermediate_size is far too large)"
            )
        for name in ("rope_theta", "norm_eps", "dropout", "init_std"):
            value = getattr(self, name)
            if not is_real(value):
                raise ConfigError(f"{_WRONG_TYPE}: {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.rope_theta == 0:  # the RoPE frequencies are powers of 1/rope_theta
            raise ConfigError("rope_theta must be > 0 (Llama uses 10000 or 500000)")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise ConfigError(
                f"{_WRONG_TYPE}: labels must be a list of strings, got {self.labels!r}"
            )
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        choices = {
            "positions": Positions,
            "norm": Norm,
            "activation": Activation,
            "attention": AttentionPattern,
            "head": Head,
        }
        for name, kind in choices.items():
            allowed = kind.__args__
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        groups = self.label_groups()
        if (self.head == "lm") != (not self.labels) or any(
            len(set(names)) < len(names) for _, names in groups
        ):
            raise ConfigError(
                f"head={self.head!r} with labels={self.labels}: classify and tag heads need "
                "distinct label names, the lm head none"
            )
        if self.head != "lm" and self.tie_embeddings:
            raise ConfigError("only the lm head can be tied to the token embeddings")

    def label_groups(self) -> list[tuple[str, list[str]]]:
        """(field, its labels) for each field a classify head predicts; tag heads and
        single-field classifiers have one, named "label" unless training named it."""
        fields, sizes = self.label_fields, self.label_sizes
        if not fields:
            return [("label", list(self.labels))] if self.labels else []
        if (
            not isinstance(fields, list)
            or not isinstance(sizes, list)
            or not all(isinstance(f, str) and f for f in fields)
            or len(set(fields)) < len(fields)
            or len(sizes) != len(fields)
            or not all(isinstance(n, int) and n > 0 for n in sizes)
            or sum(sizes) != len(self.labels)
            or (len(fields) > 1 and self.head != "classify")
        ):
            raise ConfigError(
                f"label_fields={fields} with label_sizes={sizes} do not divide the "
                f"{len(self.labels)} labels into one group per field (several fields need a "
                "classify head)"
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [(f, self.labels[s : s + n]) for f, s, n in zip(fields, starts, sizes, strict=True)]

    def largest_tensor(self) -> int:
        """An upper bound on the values of any one weight or buffer (a table of rows of at
        most the model's width), in Python integers that cannot overflow."""
        width = max(self.n_embd, self.n_head * self.head_dim)
        rows = max(
            self.vocab_size,
            self.block_size,
            2 * self.intermediate_size,  # SwiGLU's gate and up
            (self.n_head + 2 * self.n_kv_head) * self.head_dim,  # fused q, k, v
            len(self.labels),
        )
        return rows * width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        check_keys(cls, d, "model config")
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong type, e.g. n_layer="abc" from a TOML file
            raise ConfigError(f"{_WRONG_TYPE}: {e}") from None


_WRONG_TYPE = "a model config value has the wrong type"


# Bounds that keep every size computation inside int64, where torch does its own (2**62 rows
# overflowed "Storage size calculation" inside the memory check, a traceback). Real models are
# far below: 256k vocabularies, 1M contexts, widths of tens of thousands.
MAX_DIM = 2**31 - 1
MAX_TENSOR_ELEMENTS = 2**48  # 1 PiB of float32 in one tensor


def _check_size(name: str, value: Any) -> None:
    if not is_int(value):
        raise ConfigError(f"{_WRONG_TYPE}: {name} must be an integer, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    if value > MAX_DIM:
        raise ConfigError(f"{name}={value} is past any real model; at most {MAX_DIM}")


def is_int(value: Any) -> bool:
    """An integer (numpy's too), but not a bool: `n_layer = true` is a mistake, not 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_keys(
    cls: type, d: dict[str, Any], what: str, extra: set[str] = frozenset(), prefix: str = ""
) -> None:
    """A ConfigError naming the first key of `d` that is not a field of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"unknown {what} key {prefix + unknown[0]!r}; known keys: {', '.join(sorted(known))}"
        )


def _gpt2(n_layer: int, n_embd: int, n_head: int, block_size: int = 1024) -> dict[str, Any]:
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)


def _gpt3(n_layer: int, n_embd: int, n_head: int, head_dim: int) -> dict[str, Any]:
    # GPT-3 paper, Table 2.1; all sizes use a 2048 context and alternate dense and
    # locally banded sparse attention layers (Section 2.1).
    return dict(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_dim=head_dim,
        block_size=2048,
        attention="alternating",
    )


# Published shapes. `published_params` is the figure the paper or model card states; the
# presets test checks our meta-device count against it.
PRESETS: dict[str, dict[str, Any]] = {
    # GPT-1 (Radford et al. 2018): 12x768, 40k-merge BPE (40478 tokens), post-norm, GELU.
    "gpt1": dict(
        vocab_size=40478,
        block_size=512,
        n_layer=12,
        n_head=12,
        n_embd=768,
        prenorm=False,
        activation="gelu",
    ),
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "gpt3-125m": _gpt3(12, 768, 12, 64),
    "gpt3-350m": _gpt3(24, 1024, 16, 64),
    "gpt3-760m": _gpt3(24, 1536, 16, 96),
    # Table 2.1 lists 24 heads of 128 for 1.3B, which does not multiply to d_model=2048;
    # we keep d_model and head size and use 16 heads.
    "gpt3-1.3b": _gpt3(24, 2048, 16, 128),
    "gpt3-2.7b": _gpt3(32, 2560, 32, 80),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 128),
    "gpt3-13b": _gpt3(40, 5140, 40, 128),
    "gpt3-175b": _gpt3(96, 12288, 96, 128),
    # SmolLM2-135M (HuggingFaceTB): a Llama-style model with GQA, RoPE, RMSNorm, SwiGLU.
    "smollm2-135m": dict(
        vocab_size=49152,
        block_size=8192,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        intermediate_size=1536,
        positions="rope",
        rope_theta=100000.0,
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
    ),
    # Tiny models for tests and CPU demos; vocab_size is usually overridden by the tokenizer.
    "tiny": dict(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(
        vocab_size=256,
        block_size=128,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        intermediate_size=176,
        positions="rope",
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
    ),
    "small": dict(vocab_size=512, block_size=256, n_layer=4, n_head=4, n_embd=128),
}

PUBLISHED_PARAMS: dict[str, float] = {
    "gpt1": 117e6,
    "gpt2": 124e6,
    "gpt2-medium": 355e6,
    "gpt2-large": 774e6,
    "gpt2-xl": 1558e6,
    "gpt3-125m": 125e6,
    "gpt3-350m": 350e6,
    "gpt3-760m": 760e6,
    "gpt3-1.3b": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
    "smollm2-135m": 135e6,
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """The named preset as a GPTConfig, with keyword overrides (e.g. vocab_size=...)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name], **overrides})
