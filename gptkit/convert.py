"""Hugging Face ⇄ gptkit: the only module that knows foreign parameter names.

Supported Hugging Face architectures: GPT-2 (`gpt2`) and Llama-style models (`llama`, and
`mistral` / `qwen2`, which are Llama with a sliding window or q/k/v biases).

Both directions are driven by one table per architecture (`Rule`s): a gptkit tensor is made
of one or more Hugging Face tensors stacked along dim 0 (q/k/v -> qkv, gate/up -> fc), and
GPT-2's Conv1D weights are stored transposed ([in, out]). Import checks every tensor against
the shapes of a meta-device `GPT` built from the converted config, so a mismatch names the
Hugging Face tensor rather than failing deep inside `load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import resources
from .config import ConfigError, GPTConfig, first_line
from .model import GPT
from .safeload import MetadataError, first_non_finite, read_json
from .tensorfile import read_safetensors


class ConversionError(ValueError):
    """A foreign checkpoint or config gptkit cannot convert; the message says what and why."""


class PickleNotAllowedError(ConversionError):
    """A pickled weights file met without the user's explicit allow_pickle / --allow-pickle."""


# Whether pickled weights files may be read when a caller does not say (allow_pickle=None).
# Off unless a caller turns it on with `allowing_pickle`: the CLI does for --allow-pickle, so
# that commands whose loading happens deep inside (finetune's init_from, a distill teacher)
# honour the flag without every layer passing it down.
_PICKLE_ALLOWED: ContextVar[bool] = ContextVar("gptkit_allow_pickle", default=False)


@contextmanager
def allowing_pickle(allow: bool = True) -> Iterator[None]:
    """Within the block, loaders given allow_pickle=None read pickled weights (weights-only)."""
    token = _PICKLE_ALLOWED.set(allow)
    try:
        yield
    finally:
        _PICKLE_ALLOWED.reset(token)


def pickle_allowed(allow_pickle: bool | None) -> bool:
    """An explicit True/False, or else the setting `allowing_pickle` made (default False)."""
    return _PICKLE_ALLOWED.get() if allow_pickle is None else allow_pickle


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
}


def _arch(model_type: str) -> Arch:
    if model_type not in ARCHES:
        raise ConversionError(
            f"Hugging Face model_type {model_type!r} is not supported; "
            f"gptkit converts {', '.join(ARCHES)}"
        )
    return ARCHES[model_type]


def _expand(arch: Arch, config: GPTConfig, present: set[str]) -> Iterator[Rule]:
    """The rules of a whole model, layer templates filled in, limited to `present` names."""
    layer_rules = (
        Rule(r.ours.format(i=i), tuple(n.format(i=i) for n in r.theirs), r.transpose, r.split)
        for i in range(config.n_layer)
        for r in arch.layer_rules
    )
    for rule in (*arch.rules, *layer_rules):
        if rule.ours in present:
            yield rule


def _stored_names(config: GPTConfig, state: dict[str, Any]) -> set[str]:
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
    _arch(model_type)  # an unsupported model_type fails here, before any key is read
    get = {**_HF_DEFAULTS[model_type], **hf}.get
    try:
        if model_type == "gpt2":
            return _gpt2_config(get)
        return _llama_config(get, model_type)
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
    if c.head != "lm":
        problems.append(f"head={c.head!r} (only language-model heads export)")
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
) -> dict[str, Any]:
    """The config.json dict of the Hugging Face model computing the same function as `c`."""
    model_type = _export_checks(c)
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(
        architectures=[ARCHES[model_type].architecture],
        model_type=model_type,
        vocab_size=c.vocab_size,
        tie_word_embeddings=c.tie_embeddings,
        initializer_range=c.init_std,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        dtype=dtype_name,  # transformers 5
        torch_dtype=dtype_name,  # transformers 4
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


# ------------------------------------------------------------------------------ weights


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json describes a Hugging Face model."""
    file = Path(path) / "config.json"
    try:
        hf = read_json(file)  # size- and depth-bounded: see safeload.py
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and ("model_type" in hf or "architectures" in hf)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    return _read_json(Path(directory) / "config.json")


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or a ConversionError naming the file."""
    try:
        data = read_json(file)  # size- and depth-bounded: see safeload.py
    except OSError as e:
        raise ConversionError(f"{file}: cannot read ({e.strerror})") from None
    except MetadataError as e:
        raise ConversionError(f"{file}: {first_line(e, 200).removeprefix(f'{file} ')}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def unpickling_problem(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in a few words. Its own message runs to a
    dozen lines and suggests retrying with the weights-only guard off, which for a hostile file is
    exactly what must not be done."""
    found = re.search(r"GLOBAL ([\w.]+)|([Uu]nsupported operand \S+)", str(e))
    if found and found.group(1):
        return f"it calls for {found.group(1)}"
    return found.group(2) if found else "torch's weights-only unpickler refused it"


def _load_weights_file(file: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors" and not allow_pickle:
        raise PickleNotAllowedError(
            f"{file} is a pickle, which can run code when loaded; convert it to safetensors "
            "(from a copy you trust) or pass --allow-pickle (allow_pickle=True in Python)"
        )
    try:
        if file.suffix == ".safetensors":
            return read_safetensors(file)  # tensors of their own: see tensorfile.py
        # weights_only, always (even when pickles are allowed): torch's restricted unpickler
        # builds tensors and plain containers, and refuses any other global a file names.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{file}: refused to unpickle: it holds more than tensors ({unpickling_problem(e)}); "
            "a weights file never needs that, so it may be hostile"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError) as e:
        raise ConversionError(
            f"{file}: cannot read the weights ({first_line(e)}); damaged?"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{file}: not a state dict of named tensors")
    return state


def load_hf_state_dict(
    directory: str | Path, allow_pickle: bool | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: single or sharded safetensors, else pytorch_model.bin
    (only with allow_pickle: see `pickle_allowed`)."""
    directory = Path(directory)
    allow = pickle_allowed(allow_pickle)
    for stem in ("model.safetensors", "pytorch_model.bin"):
        if (directory / stem).is_file():
            return _load_weights_file(directory / stem, allow)
        index = directory / f"{stem}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map: not a Hugging Face index")
            shards = sorted({str(s) for s in weight_map.values()})
            outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
            if outside:  # a shard must sit beside its index, not anywhere on the disk
                raise ConversionError(f"{index} names a shard outside its directory: {outside[0]}")
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_weights_file(directory / shard, allow))
            return sd
    raise ConversionError(
        f"{directory} has no weights: expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin"
    )


def _canonical_name(name: str, arch: Arch) -> str:
    """Base-model checkpoints (GPT2Model, original gpt2) lack the wrapper prefix: add it."""
    return name if name.startswith((arch.prefix, "lm_head.")) else arch.prefix + name


def _part_shapes(rule: Rule, shape: torch.Size, config: GPTConfig) -> list[tuple[int, ...]]:
    """Shapes each HF tensor of `rule` must have for the gptkit tensor to be `shape`."""
    rows = rule.split(config) if rule.split else [shape[0]]
    parts = [(n, *shape[1:]) for n in rows]
    return [p[::-1] if rule.transpose else p for p in parts]


def listing(label: str, items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} {', '.join(items[:limit])}{more}"


class LazyTensors:
    """Named tensors, each read only when taken with `pop`.

    `hf_to_gptkit_state_dict` takes every source once, fuses it and drops it, so with lazy
    sources loading holds the converted weights plus one layer's sources, never a second copy.
    """

    # glibc keeps the pages of freed blocks resident unless asked: the holes dropped sources
    # and dequantization temporaries leave add ~10% to SmolLM2's loading peak without this.
    _return_freed_pages = staticmethod(resources.return_freed_pages)

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._readers = readers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._readers))

    def pop(self, name: str) -> torch.Tensor:
        self._return_freed_pages()
        return self._readers.pop(name)()


def _join(parts: list[torch.Tensor], column_major: bool) -> torch.Tensor:
    """One new tensor from a rule's parts (stacked along dim 0), column-major if asked."""
    if not column_major or parts[0].dim() != 2:
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)
    rows = sum(p.shape[0] for p in parts)
    return torch.cat(parts, out=torch.empty(parts[0].shape[1], rows, dtype=parts[0].dtype).t())


def hf_to_gptkit_state_dict(
    sd: dict[str, torch.Tensor] | LazyTensors,
    config: GPTConfig,
    model_type: str,
    decode_layout: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename, transpose and fuse HF tensors into gptkit's names for a model of `config`.

    Returns what a gptkit checkpoint stores (no lm_head.weight when tied). Raises one
    ConversionError listing every missing, unexpected and mis-shaped Hugging Face tensor.
    Each tensor is taken out of `sd` when its rule is reached and dropped once fused or
    copied, so loading holds about one copy of the weights at a time. decode_layout=True
    makes each matrix column-major as it is copied (GPT.use_decode_layout's layout, made here
    with one tensor's sources in memory rather than later with the whole model's).
    """
    arch = _arch(model_type)
    stored = {_canonical_name(k, arch): k for k in sd}  # canonical name -> name in `sd`
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    for rule in _expand(arch, config, _stored_names(config, shapes)):
        parts = []
        expected = _part_shapes(rule, shapes[rule.ours], config)
        for name, shape in zip(rule.theirs, expected, strict=True):
            tensor = sd.pop(stored.pop(name)) if name in stored else None
            if tensor is None and re.search(arch.zero_if_absent, name):
                tensor = torch.zeros(shape)
            if tensor is None:
                missing.append(name)
            elif tuple(tensor.shape) != shape:
                misshaped.append(f"{name} {list(tensor.shape)} (expected {list(shape)})")
            else:
                parts.append(tensor.t() if rule.transpose else tensor)
        if len(parts) == len(rule.theirs):
            out[rule.ours] = _join(parts, decode_layout)
    ignore = arch.ignore + (r"|^lm_head\.weight$" if config.tie_embeddings else "")
    unexpected = sorted(k for k in stored if not re.search(ignore, k))
    if missing or unexpected or misshaped:
        problems = [
            listing(label, items)
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", misshaped),
            )
            if items
        ]
        raise ConversionError(
            f"checkpoint does not match its {model_type} config: " + "; ".join(problems)
        )
    return out


def gptkit_to_hf_state_dict(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_gptkit_state_dict: HF names, split and transposed, contiguous."""
    arch = _arch(model_type)
    state = model.state_dict()
    stored = _stored_names(model.config, state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in _expand(arch, model.config, stored):
        tensor = state[rule.ours].detach()
        parts = tensor.split(rule.split(model.config)) if rule.split else [tensor]
        for name, part in zip(rule.theirs, parts, strict=True):
            out[name] = (part.t() if rule.transpose else part).contiguous().cpu()
        used.add(rule.ours)
    left = sorted(stored - used)
    if left:
        raise ConversionError(
            listing("model has tensors Hugging Face cannot hold:", left)
            + " (merge adapters or drop task heads before exporting)"
        )
    return out


# ------------------------------------------------------------------------------ entry points


def load_hf(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    decode_layout: bool = False,
    *,
    allow_pickle: bool | None = None,
) -> GPT:
    """A gptkit GPT with the weights of a Hugging Face directory, in eval mode (matrices
    column-major with decode_layout=True; see hf_to_gptkit_state_dict).

    allow_pickle=True lets a pytorch_model.bin be read (weights-only); None: see
    `pickle_allowed`. Raises ResourceError before reading any weight when the model cannot
    fit on `device`."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config = hf_config_to_gptkit(hf)
    resources.check_inference(config, str(directory), device, dtype)
    sd = load_hf_state_dict(directory, allow_pickle)
    sd = hf_to_gptkit_state_dict(sd, config, model_type_of(hf), decode_layout)
    return model_from_state_dict(config, sd, device, dtype, source=directory)


def model_from_state_dict(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    device,
    dtype: torch.dtype,
    source: str | Path = "the weights",
) -> GPT:
    """A GPT in eval mode holding `state`, as `hf_to_gptkit_state_dict` returns it (every name
    and shape already checked; a tied lm_head absent), with no random init on the way.

    Weights holding NaN or infinity are refused (ConversionError naming `source`): such a model
    answers "" greedily and fails every sampled request. Checked once built, as GGUF tensors
    are only dequantized then."""
    model = GPT.from_state_dict(config, state, device, dtype).eval()
    bad = first_non_finite(model.named_parameters())
    if bad is not None:
        raise ConversionError(
            f"{source}: tensor {bad} holds NaN or infinite values; the weights are unusable "
            "(a diverged training run, or damage)"
        )
    return model


def export_hf(
    model: GPT,
    out_dir: str | Path,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads.

    Raises ConversionError naming the knob when the model has no Hugging Face equivalent.
    Tokenizer files are not written (gptkit.tokenizer owns them).
    """
    dtype = model.tok_emb.weight.dtype
    hf = gptkit_config_to_hf(model.config, dtype, bos_token_id, eos_token_id)
    tensors = gptkit_to_hf_state_dict(model, hf["model_type"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


# Files a model needs: config, weights and tokenizer (no optimizer states, no other formats).
_HUB_METADATA = ["*.json", "merges.txt", "vocab.json", "tokenizer*"]


def resolve_hf(
    name_or_path: str | Path,
    allow_pickle: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A local directory as is; otherwise download a hub repo's model files (cached).

    The config and tokenizer come first: a model gptkit cannot run, or one too big for
    `device` in `dtype`, is refused before its weights are downloaded. safetensors weights
    are preferred; a repo that has only pickled ones (pytorch_model.bin) is fetched only with
    allow_pickle (None: see `pickle_allowed`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")):
        raise ConversionError(f"{name}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(name, allow_patterns=_HUB_METADATA))
        config = hf_config_to_gptkit(read_hf_config(local))
        resources.check_inference(config, name, device, dtype)
        local = Path(snapshot_download(name, allow_patterns=["*.safetensors"]))
        if not any(local.glob("*.safetensors")):  # older repos ship only pickled weights
            if not pickle_allowed(allow_pickle):
                raise PickleNotAllowedError(
                    f"{name!r} on the Hugging Face hub has no safetensors weights; its "
                    "pickled pytorch_model.bin can run code when loaded: pass --allow-pickle "
                    "(allow_pickle=True in Python) to fetch and read it weights-only"
                )
            local = Path(snapshot_download(name, allow_patterns=["pytorch_model*.bin*"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as e:
        if isinstance(e, ConversionError | ConfigError):  # already clear (ResourceError, too)
            raise
        raise ConversionError(
            f"cannot fetch {name!r} from the Hugging Face hub: {first_line(e)}"
        ) from None
    return local
