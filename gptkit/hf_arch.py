"""What a Hugging Face architecture is in gptkit's terms: its parameter names (one `Rule`
table per architecture) and its config.json (both directions).

A gptkit tensor is made of one or more Hugging Face tensors stacked along dim 0 (q/k/v -> qkv,
gate/up -> fc), and GPT-2's Conv1D weights are stored transposed ([in, out]). convert.py moves
the weights by these tables; convert_gguf.py reuses them for GGUF's names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, GPTConfig


class ConversionError(ValueError):
    """A foreign checkpoint or config gptkit cannot convert; the message says what and why."""


# ------------------------------------------------------------------------------ name tables


def _qkv_rows(c: GPTConfig) -> list[int]:
    return [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]


def _gate_up_rows(c: GPTConfig) -> list[int]:
    return [c.intermediate_size, c.intermediate_size]


@dataclass(frozen=True)
class Rule:
    """One gptkit tensor and the Hugging Face tensor(s) it is made of.

    Names may contain "{i}" (the layer index). Several `theirs` are concatenated along dim 0
    in that order, with row counts given by `split`; `transpose` marks GPT-2 Conv1D weights.
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    split: Callable[[GPTConfig], list[int]] | None = None


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face architecture names and lays out its tensors."""

    architecture: str  # class name written to config.json "architectures"
    prefix: str  # the body's prefix inside the *ForCausalLM wrapper (base models lack it)
    rules: tuple[Rule, ...]  # model-level tensors
    layer_rules: tuple[Rule, ...]  # per block, "{i}" = layer index
    ignore: str = r"$^"  # regex of stored tensors that are buffers, not weights
    zero_if_absent: str = r"$^"  # regex of biases the architecture omits (they are zero)


def _r(
    ours: str, *theirs: str, t: bool = False, split: Callable[[GPTConfig], list[int]] | None = None
) -> Rule:
    return Rule(ours, theirs, transpose=t, split=split)


GPT2 = Arch(
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    rules=(
        _r("tok_emb.weight", "transformer.wte.weight"),
        _r("pos_emb.weight", "transformer.wpe.weight"),
        _r("norm_f.weight", "transformer.ln_f.weight"),
        _r("norm_f.bias", "transformer.ln_f.bias"),
        _r("lm_head.weight", "lm_head.weight"),
        _r("score.weight", "score.weight"),  # GPT2ForSequenceClassification
    ),
    layer_rules=(
        _r("blocks.{i}.norm1.weight", "transformer.h.{i}.ln_1.weight"),
        _r("blocks.{i}.norm1.bias", "transformer.h.{i}.ln_1.bias"),
        _r("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", t=True),
        _r("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
        _r("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", t=True),
        _r("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
        _r("blocks.{i}.norm2.weight", "transformer.h.{i}.ln_2.weight"),
        _r("blocks.{i}.norm2.bias", "transformer.h.{i}.ln_2.bias"),
        _r("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", t=True),
        _r("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias"),
        _r("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", t=True),
        _r("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    ),
    # Older checkpoints store the causal-mask buffers.
    ignore=r"\.attn\.(masked_)?bias$",
)

_L = "model.layers.{i}."
LLAMA = Arch(
    architecture="LlamaForCausalLM",
    prefix="model.",
    rules=(
        _r("tok_emb.weight", "model.embed_tokens.weight"),
        _r("norm_f.weight", "model.norm.weight"),
        _r("lm_head.weight", "lm_head.weight"),
        _r("score.weight", "score.weight"),  # LlamaForSequenceClassification
    ),
    layer_rules=(
        _r("blocks.{i}.norm1.weight", _L + "input_layernorm.weight"),
        *(
            _r(
                f"blocks.{{i}}.attn.qkv.{p}",
                *(f"{_L}self_attn.{x}_proj.{p}" for x in "qkv"),
                split=_qkv_rows,
            )
            for p in ("weight", "bias")
        ),
        _r("blocks.{i}.attn.proj.weight", _L + "self_attn.o_proj.weight"),
        _r("blocks.{i}.attn.proj.bias", _L + "self_attn.o_proj.bias"),
        _r("blocks.{i}.norm2.weight", _L + "post_attention_layernorm.weight"),
        *(
            _r(
                f"blocks.{{i}}.mlp.fc.{p}",
                f"{_L}mlp.gate_proj.{p}",
                f"{_L}mlp.up_proj.{p}",
                split=_gate_up_rows,
            )
            for p in ("weight", "bias")
        ),
        _r("blocks.{i}.mlp.proj.weight", _L + "mlp.down_proj.weight"),
        _r("blocks.{i}.mlp.proj.bias", _L + "mlp.down_proj.bias"),
    ),
    ignore=r"rotary_emb\.inv_freq$",
)

ARCHES: dict[str, Arch] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    # Qwen2 has q/k/v biases but none on o_proj or the MLP: we load it as bias=True with zeros.
    "qwen2": dataclasses.replace(
        LLAMA, zero_if_absent=r"\.(o_proj|gate_proj|up_proj|down_proj)\.bias$"
    ),
}

# HF architecture class names, for config.json files that lack "model_type".
_BY_ARCHITECTURE = {
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2ForSequenceClassification": "gpt2",
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "Qwen2ForSequenceClassification": "qwen2",
}
# A sequence classifier's head is `score`, read at the last token that is not padding (the
# same position gptkit reads: the EOS it appends).
_CLASSIFIER = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}


def arch_of(model_type: str) -> Arch:
    if model_type not in ARCHES:
        raise ConversionError(
            f"Hugging Face model_type {model_type!r} is not supported; "
            f"gptkit converts {', '.join(ARCHES)}"
        )
    return ARCHES[model_type]


def expand_rules(arch: Arch, config: GPTConfig, present: set[str]) -> Iterator[Rule]:
    """The rules of a whole model, layer templates filled in, limited to `present` names."""
    layer_rules = (
        Rule(r.ours.format(i=i), tuple(n.format(i=i) for n in r.theirs), r.transpose, r.split)
        for i in range(config.n_layer)
        for r in arch.layer_rules
    )
    other = "lm_head." if config.head == "classify" else "score."  # a head it does not have
    for rule in (*arch.rules, *layer_rules):
        if rule.ours in present and not rule.ours.startswith(other):
            yield rule


def stored_names(config: GPTConfig, state: dict[str, Any]) -> set[str]:
    """gptkit names a checkpoint stores: all of state_dict but a tied lm_head."""
    return set(state) - ({"lm_head.weight"} if config.tie_embeddings else set())


# ------------------------------------------------------------------------------ configs

# What Hugging Face assumes for keys a config.json leaves out (transformers' class defaults).
_LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        n_inner=None,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
    ),
    "llama": dict(_LLAMA_DEFAULTS, intermediate_size=11008, max_position_embeddings=2048),
    "mistral": dict(
        _LLAMA_DEFAULTS,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        sliding_window=4096,
    ),
    "qwen2": dict(
        _LLAMA_DEFAULTS,
        vocab_size=151936,
        intermediate_size=22016,
        max_position_embeddings=32768,
    ),
}

# Activation names: HF GPT-2's `activation_function` <-> gptkit's `activation`.
_GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
_GPT2_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

# HF GPT-2 options that change the function computed; value = the only one we implement.
_GPT2_FIXED_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def model_type_of(hf: dict[str, Any]) -> str:
    """The config's model_type, falling back to its "architectures" list."""
    if "model_type" in hf:
        return hf["model_type"]
    for name in hf.get("architectures") or []:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    raise ConversionError(
        f"config.json names neither a model_type nor a known architecture "
        f"(architectures={hf.get('architectures')}); gptkit converts {', '.join(ARCHES)}"
    )


def hf_config_to_gptkit(hf: dict[str, Any]) -> GPTConfig:
    """The GPTConfig computing the same function as a Hugging Face config.json dict.

    Dropout is left at 0: it is a training choice, not part of the weights.
    """
    model_type = model_type_of(hf)
    arch_of(model_type)  # an unsupported model_type fails here, before any key is read
    get = {**_HF_DEFAULTS[model_type], **hf}.get
    try:
        config = _gpt2_config(get) if model_type == "gpt2" else _llama_config(get, model_type)
        if any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
            names = hf.get("id2label") or {}
            if not isinstance(names, dict) or not names:
                raise ConversionError("a sequence classifier's config.json needs its id2label")
            labels = [str(names.get(str(i), f"LABEL_{i}")) for i in range(len(names))]
            config = dataclasses.replace(
                config, head="classify", labels=labels, tie_embeddings=False
            )
        return config
    except ConfigError as e:
        raise ConversionError(f"Hugging Face {model_type} config: {e}") from None


def _gpt2_config(get: Callable[..., Any]) -> GPTConfig:
    for key, value in _GPT2_FIXED_FLAGS.items():
        if bool(get(key, value)) != value:
            raise ConversionError(f"GPT-2 option {key}={get(key)} is not supported by gptkit")
    # reorder_and_upcast_attn only computes attention in fp32: the same function, accepted.
    act = get("activation_function")
    if act not in _GPT2_ACTIVATIONS:
        raise ConversionError(
            f"GPT-2 activation_function={act!r} is not supported; "
            f"gptkit has {', '.join(_GPT2_ACTIVATIONS)}"
        )
    return GPTConfig(
        vocab_size=get("vocab_size"),
        block_size=get("n_positions"),
        n_layer=get("n_layer"),
        n_head=get("n_head"),
        n_embd=get("n_embd"),
        intermediate_size=get("n_inner"),
        positions="learned",
        norm="layernorm",
        norm_eps=get("layer_norm_epsilon"),
        activation=_GPT2_ACTIVATIONS[act],
        bias=True,
        tie_embeddings=bool(get("tie_word_embeddings")),
        dropout=0.0,
        init_std=get("initializer_range"),
    )


def _rope_theta(get: Callable[..., Any]) -> float:
    """RoPE base from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = get("rope_parameters") or get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConversionError(
            f"per-layer-type rope_parameters ({', '.join(params)}) are not supported"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ConversionError(
            f"RoPE scaling type {kind!r} (rope_parameters / rope_scaling) is not supported; "
            "gptkit implements plain RoPE (rope_type 'default') only"
        )
    if params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(
            "partial_rotary_factor != 1 is not supported; gptkit rotates all dims"
        )
    return float(params.get("rope_theta", get("rope_theta", 10000.0)))


def _sliding_window(get: Callable[..., Any], model_type: str) -> int | None:
    """The attention window every layer uses (Mistral), or that some use (Qwen2), or None."""
    if model_type == "qwen2":
        sliding = get("use_sliding_window") or "sliding_attention" in (get("layer_types") or [])
        return get("sliding_window", 4096) if sliding else None
    if model_type == "mistral":
        return get("sliding_window")
    return None


def _llama_config(get: Callable[..., Any], model_type: str) -> GPTConfig:
    if get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(
            f"{model_type} hidden_act={get('hidden_act')!r} is not supported; "
            "gptkit's SwiGLU uses silu"
        )
    if model_type == "qwen2":
        bias = True  # q/k/v biases; the others are zero-filled on load
    elif bool(get("attention_bias", False)) != bool(get("mlp_bias", False)):
        raise ConversionError(
            f"attention_bias={get('attention_bias')} with mlp_bias={get('mlp_bias')} is not "
            "supported; gptkit's single `bias` knob needs them equal"
        )
    else:
        bias = bool(get("attention_bias", False))
    block_size = get("max_position_embeddings")
    window = _sliding_window(get, model_type)
    if window is not None and window < block_size:
        # Within the window sliding attention is plain causal attention; past it we would
        # differ, so the context stops there.
        block_size = window
    n_embd, n_head = get("hidden_size"), get("num_attention_heads")
    return GPTConfig(
        vocab_size=get("vocab_size"),
        block_size=block_size,
        n_layer=get("num_hidden_layers"),
        n_head=n_head,
        n_kv_head=get("num_key_value_heads"),  # None: GPTConfig derives it (and checks it)
        n_embd=n_embd,
        head_dim=get("head_dim"),
        intermediate_size=get("intermediate_size"),
        positions="rope",
        rope_theta=_rope_theta(get),
        norm="rmsnorm",
        norm_eps=get("rms_norm_eps"),
        activation="swiglu",
        bias=bias,
        tie_embeddings=bool(get("tie_word_embeddings")),
        dropout=0.0,
        init_std=get("initializer_range"),
    )


# Knob values the Hugging Face architecture has built in; anything else cannot be exported.
_EXPORT_FIXED: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", prenorm=True, attention="dense", bias=True),
    "llama": dict(norm="rmsnorm", prenorm=True, attention="dense", activation="swiglu"),
}
# Which architecture a model exports to is decided by how it encodes positions.
_EXPORT_BY_POSITIONS = {"learned": "gpt2", "rope": "llama"}


def _export_checks(c: GPTConfig) -> str:
    """The HF model_type to export `c` as; ConversionError naming every knob that can't be."""
    model_type = _EXPORT_BY_POSITIONS.get(c.positions)
    if model_type is None:
        raise ConversionError(
            f"cannot export positions={c.positions!r} to Hugging Face: GPT-2 uses learned "
            "positions and Llama uses RoPE; no supported architecture has fixed sinusoids"
        )
    problems = [
        f"{k}={getattr(c, k)!r} (needs {v!r})"
        for k, v in _EXPORT_FIXED[model_type].items()
        if getattr(c, k) != v
    ]
    if model_type == "gpt2":
        if c.activation not in _GPT2_ACTIVATION_NAMES:
            problems.append(f"activation={c.activation!r} (needs one of gelu, gelu_tanh, relu)")
        if c.n_kv_head != c.n_head:
            problems.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no GQA; needs n_head)")
        if c.head_dim * c.n_head != c.n_embd:
            problems.append(f"head_dim={c.head_dim} (GPT-2 needs n_embd // n_head)")
    elif c.n_embd % c.n_head:
        problems.append(f"n_head={c.n_head} (Llama needs n_embd divisible by n_head)")
    if c.head == "tag":
        problems.append("head='tag' (language-model and classify heads export)")
    if len(c.label_groups()) > 1:
        problems.append(f"label_fields={c.label_fields} (a Hugging Face classifier has one)")
    if c.score_bias:
        problems.append("score_bias=True (Hugging Face's classifier head has no bias)")
    if problems:
        raise ConversionError(
            f"cannot export to Hugging Face {model_type} (positions={c.positions!r}): "
            + "; ".join(problems)
        )
    return model_type


def gptkit_config_to_hf(
    c: GPTConfig,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The config.json dict of the Hugging Face model computing the same function as `c`.
    A classifier needs pad_token_id: the id its batches are padded with, never in a text."""
    model_type = _export_checks(c)
    dtype_name = str(dtype).removeprefix("torch.")
    classify = c.head == "classify"
    if classify and pad_token_id is None:
        raise ConversionError("a classifier exports with a pad_token_id (a batch's padding)")
    common = dict(
        architectures=[_CLASSIFIER[model_type] if classify else ARCHES[model_type].architecture],
        model_type=model_type,
        vocab_size=c.vocab_size,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype=dtype_name,  # transformers 5
        torch_dtype=dtype_name,  # transformers 4
    )
    if classify:
        common |= dict(
            id2label={str(i): label for i, label in enumerate(c.labels)},
            label2id={label: i for i, label in enumerate(c.labels)},
            pad_token_id=pad_token_id,
        )
    if model_type == "gpt2":
        return dict(
            common,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_inner=c.intermediate_size,
            activation_function=_GPT2_ACTIVATION_NAMES[c.activation],
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
        )
    return dict(
        common,
        hidden_size=c.n_embd,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta),  # transformers 5
        rope_theta=c.rope_theta,  # transformers 4
        attention_bias=c.bias,
        mlp_bias=c.bias,
        attention_dropout=c.dropout,
    )
