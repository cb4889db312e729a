"""GGUF (llama.cpp's file format) -> gptkit: config, float32 weights and tokenizer from one file.

The `gguf` package (gguf-py, maintained with llama.cpp) dequantizes the tensors, so no
quantization kernel is written here. The header is read here (`_Header`: checked against the
file's size, and 25x faster than gguf-py's reader). What this module adds is the mapping:

- metadata keys (`llama.block_count`, ...) become a Hugging Face Llama config dict, which
  `convert.hf_config_to_gptkit` turns into a GPTConfig with the same checks as HF imports;
- tensor names (`blk.0.attn_q.weight`, ...) become Hugging Face Llama names, and
  `convert.hf_to_gptkit_state_dict` fuses q/k/v and gate/up exactly as for HF checkpoints;
- the vocabulary, merges, token types and pre-tokenizer name become an HF `tokenizers`
  byte-level BPE that splits text with llama.cpp's own regexes for that pre-tokenizer.

Only the `llama` architecture with a byte-level BPE vocabulary is read (SmolLM/SmolLM2,
Llama 3.0, and other dense Llama-style models converted by llama.cpp); SentencePiece
vocabularies (Llama 1/2, Mistral v0.1), RoPE scaling and mixture-of-experts are refused.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizerObject

from . import resources
from .config import GPTConfig
from .convert import (
    ConversionError,
    LazyTensors,
    hf_config_to_gptkit,
    hf_to_gptkit_state_dict,
    listing,
    model_from_state_dict,
)
from .model import GPT
from .tokenizer import HFTokenizer, Tokenizer


class GGUFError(ConversionError):
    """A GGUF file gptkit cannot read; the one-line message names the file and the problem."""


# Tensor types gguf-py dequantizes that llama.cpp's common presets produce.
SUPPORTED_TYPES = (
    *("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
)

_MODEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer regexes, copied from llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe). llama.cpp
# applies them in turn, each splitting the pieces the previous one made and keeping unmatched
# text as pieces of its own: HF's Split(behavior="isolated") in a Sequence does the same.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
# name -> (regexes, ignore_merges, add_bos default), as llama.cpp's llama_vocab::load sets them.
_SMOLLM = ((r"\p{N}", _GPT2), False, False)
_GPT2_PRE = ((_GPT2,), False, False)
_LLAMA3_PRE = ((_LLAMA3,), True, True)
_QWEN2_PRE = ((_QWEN2,), False, False)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), _GPT2_PRE),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), _SMOLLM),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3"), _LLAMA3_PRE),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_PRE),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's LLAMA_TOKEN_TYPE_* values in tokenizer.ggml.token_type
_MISSING = object()

# GGUF's value types (gguf.GGUFValueType) as struct formats; 8 = string, 9 = array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 8  # arrays of arrays: GGUF allows them; llama.cpp writes none
# Tensor types stored as plain numbers (read with this numpy type); all others are blocks of bytes.
_PLAIN = {"F32": "f4", "F16": "f2", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in the file and how its bytes read."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, outermost first
    offset: int  # from the start of the file
    n_bytes: int
    dtype: np.dtype  # what the bytes read as: the number type, or uint8 for quantized blocks
    row: int  # items of that dtype per innermost row (gguf.quants.dequantize wants rows)


class _Header:
    """A GGUF file's header, read: every metadata value and where every tensor lies.

    Every length, count and tensor extent is checked against the file's size as it is read,
    so a crafted header is one GGUFError, never a loop past the end or an overflow: lengths
    are Python ints, and a loop over items is bounded by the file's size, as every item takes
    at least one byte. (gguf-py's GGUFReader trusts the header, and it takes ~2.5 s where
    this takes ~0.1 s on a 49k vocabulary; gguf-py still dequantizes the tensors.)
    """

    def __init__(self, path: Path, data: mmap.mmap, gguf: Any):
        self.path, self.data, self.size, self.pos = path, data, len(data), 0
        self.gguf = gguf
        self.order = "<"
        self.fields: dict[str, Any] = {}
        self.tensors: list[_Stored] = []
        self.names: set[str] = set()

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: not a readable GGUF file ({problem})")

    def take(self, n: int, what: str) -> int:
        """Step over n bytes; their start."""
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {n:,} bytes at offset {self.pos:,}, past the end of the file "
                f"({self.size:,} bytes); truncated or corrupt?"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def number(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.order + fmt, self.data, start)[0]

    def text(self, what: str) -> str:
        n = self.number("Q", f"length of {what}")
        start = self.take(n, f"{what} (a string of {n:,} bytes)")
        try:
            return str(self.data[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at offset {start:,} is not UTF-8") from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.number(_SCALARS[kind], what)
        if kind == _STRING:
            return self.text(what)
        if kind != _ARRAY:
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define")
        if depth >= _MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {_MAX_NESTING} deep")
        item = self.number("I", f"item type of {what}")
        n = self.number("Q", f"length of {what}")
        if item in _SCALARS:
            fmt = f"{self.order}{n}{_SCALARS[item]}"
            start = self.take(n * struct.calcsize(_SCALARS[item]), f"{what} ({n:,} items)")
            return list(struct.unpack_from(fmt, self.data, start))
        if n > self.size - self.pos:  # each string or array item takes >= 8 bytes
            raise self.fail(f"{what} claims {n:,} items, more than the file's bytes")
        return [self.value(item, what, depth + 1) for _ in range(n)]

    def read(self) -> _Header:
        self.take(4, "magic")
        if self.data[:4] != b"GGUF":
            raise self.fail("no GGUF magic at the start")
        version = self.number("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = struct.unpack_from(">I", self.data, 4)[0]
        if version not in (2, 3):
            raise self.fail(f"GGUF version {version}; gptkit reads versions 2 and 3")
        n_tensors, n_fields = self.number("Q", "tensor count"), self.number("Q", "field count")
        # A field takes >= 13 bytes (key length, type, a 1-byte value), a tensor's info >= 24.
        for count, what, least in ((n_fields, "metadata fields", 13), (n_tensors, "tensors", 24)):
            if count * least > self.size - self.pos:
                raise self.fail(
                    f"the header claims {count:,} {what}, more than the file could hold"
                )
        for _ in range(n_fields):
            key = self.text("a metadata key")
            shown = _shown(key)
            if key in self.fields:
                raise self.fail(f"metadata key {shown!r} appears twice")
            kind = self.number("I", f"type of {shown}")
            if key == "general.alignment" and kind != _UINT32:
                raise self.fail(f"general.alignment has value type {kind}, not uint32 ({_UINT32})")
            self.fields[key] = self.value(kind, f"metadata {shown!r}")
        alignment = self.fields.get("general.alignment", 32)  # GGUF_DEFAULT_ALIGNMENT
        if alignment == 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment={alignment} is not a power of two")
        infos = [self._tensor_info() for _ in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        for name, dims, qtype, offset in infos:
            self._place(name, dims, qtype, data_start + offset)
        return self

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self.text("a tensor name")
        shown = _shown(name)
        n_dims = self.number("I", f"dimension count of tensor {shown}")
        if n_dims > _MAX_DIMS:
            raise self.fail(f"tensor {shown} claims {n_dims:,} dimensions (at most 4)")
        dims = [self.number("Q", f"dimensions of tensor {shown}") for _ in range(n_dims)]
        qtype = self.number("I", f"type of tensor {shown}")
        return name, dims, qtype, self.number("Q", f"offset of tensor {shown}")

    def _place(self, name: str, dims: list[int], qtype: int, start: int) -> None:
        shown = _shown(name)
        if name in self.names:
            raise self.fail(f"tensor {shown} appears twice")
        self.names.add(name)
        sizes = self.gguf.GGML_QUANT_SIZES
        kind = next((k for k in sizes if int(k) == qtype), None)
        if kind is None:
            raise self.fail(f"tensor {shown} has type {qtype}, which GGML does not define")
        block, block_bytes = sizes[kind]
        inner = dims[0] if dims else 1
        if inner % block:
            raise self.fail(f"tensor {shown}: rows of {inner} do not fill {block}-blocks")
        n_bytes = math.prod(dims) // block * block_bytes
        if start + n_bytes > self.size:
            raise self.fail(
                f"tensor {shown} with GGUF dims {dims} spans bytes "
                f"{start:,}..{start + n_bytes:,}, past the end of the file "
                f"({self.size:,} bytes); truncated or corrupt?"
            )
        if kind.name in _PLAIN:
            dtype, row = np.dtype(_PLAIN[kind.name]).newbyteorder(self.order), inner
        else:
            dtype, row = np.dtype(np.uint8), inner // block * block_bytes
        shape = tuple(reversed(dims))  # GGUF lists dims innermost first
        self.tensors.append(_Stored(name, kind, shape, start, n_bytes, dtype, row))


def _shown(text: str) -> str:
    """A string from the file as a message shows it: escaped (no newline from the file reaches
    a message) and cut short (a key may be megabytes long)."""
    return repr(text[:80])[1:-1] + ("..." if len(text) > 80 else "")


class _File:
    """An open GGUF file: metadata lookup with errors that name the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        try:
            import gguf
        except ImportError:
            msg = "reading GGUF needs the gguf package: pip install gguf"
            raise GGUFError(f"{self.path}: {msg}") from None
        self.gguf = gguf
        size = self.path.stat().st_size
        if size < 24:  # magic, version and the two counts
            raise GGUFError(f"{self.path}: not a readable GGUF file (only {size} bytes)")
        with (
            self.path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            header = _Header(self.path, data, gguf).read()
        self.fields, self.tensors = header.fields, header.tensors

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.fields:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return self.fields[key]

    def length(self, key: str) -> int:
        """Items in an array field."""
        return len(self.get(key))

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")


def _config(f: _File, tensor_names: set[str]) -> GPTConfig:
    """GGUF llama metadata as a GPTConfig (via the HF Llama config it describes)."""
    arch = f.get("general.architecture")
    if arch != "llama":
        raise f.fail(f"architecture {arch!r} is not supported; gptkit reads 'llama' GGUF files")
    p = "llama."
    if f.get(p + "expert_count", 0):
        n = f.get(p + "expert_count")
        raise f.fail(f"mixture-of-experts models ({p}expert_count={n}) are not supported")
    scaling = f.get(p + "rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        kind = scaling if scaling != "none" else "llama3 rope_freqs"
        raise f.fail(f"RoPE scaling {kind!r} is not supported; gptkit implements plain RoPE")
    n_embd, n_head = f.get(p + "embedding_length"), f.get(p + "attention.head_count")
    if not n_head or (n_embd % n_head and f.get(p + "attention.key_length", None) is None):
        raise f.fail(f"{p}embedding_length={n_embd} does not split into {n_head} heads")
    head_dim = f.get(p + "attention.key_length", n_embd // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):
        if f.get(p + key, head_dim) != head_dim:
            raise f.fail(f"{p}{key}={f.get(p + key)} differs from head_dim={head_dim}")
    hf = dict(
        model_type="llama",
        vocab_size=f.length("tokenizer.ggml.tokens"),  # llama.cpp's n_vocab, too
        hidden_size=n_embd,
        intermediate_size=f.get(p + "feed_forward_length"),
        num_hidden_layers=f.get(p + "block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=f.get(p + "attention.head_count_kv", n_head),
        head_dim=head_dim,
        rms_norm_eps=f.get(p + "attention.layer_norm_rms_epsilon"),
        rope_theta=f.get(p + "rope.freq_base", 10000.0),
        max_position_embeddings=f.get(p + "context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    try:
        return hf_config_to_gptkit(hf)
    except ConversionError as e:
        raise f.fail(str(e)) from None


def _expected_names(config: GPTConfig) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    names |= set() if config.tie_embeddings else {"output.weight"}
    return names | {f"blk.{i}.{n}.weight" for i in range(config.n_layer) for n in _LAYER_NAMES}


def _hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (names were checked)."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_MODEL_NAMES[parts[0]]}.{parts[1]}"


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter (`permute` in convert_hf_to_gguf.py) gives q/k.

    ggml's Llama RoPE rotates adjacent pairs (x0, x1), (x2, x3)...; HF (and gptkit) rotate
    the two halves of each head. The converter interleaves each head's halves so that the same
    weights work with pair rotation; reading them back we de-interleave (as transformers does).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensors(f: _File, config: GPTConfig) -> LazyTensors:
    """Every tensor, dequantized to float32 when taken, under HF Llama names, q/k back in HF
    row order.

    Each tensor's bytes are read with a plain file read rather than through a memory map, so
    the quantized file does not stay resident next to the float32 weights.
    """
    tensors = f.tensors
    present = {t.name for t in tensors}
    expected = _expected_names(config)
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        listed = [listing(k, v) for k, v in (("missing", missing), ("unexpected", unexpected)) if v]
        raise f.fail("tensors do not match a llama model: " + "; ".join(listed))
    bad = [t for t in tensors if t.qtype.name not in SUPPORTED_TYPES]
    if bad:
        raise f.fail(
            f"tensor {bad[0].name} has type {bad[0].qtype.name}, which gptkit cannot "
            f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    heads = {"attn_q": config.n_head, "attn_k": config.n_kv_head}

    def read(t: _Stored) -> torch.Tensor:
        raw = bytearray(t.n_bytes)
        with f.path.open("rb") as file:
            file.seek(t.offset)
            if file.readinto(raw) != t.n_bytes:
                raise f.fail(f"tensor {t.name}: the file changed while it was being read")
        data = np.frombuffer(raw, dtype=t.dtype).reshape(-1, t.row)
        try:
            values = f.gguf.quants.dequantize(data, t.qtype)
        except Exception as e:
            raise f.fail(f"cannot dequantize tensor {t.name} ({t.qtype.name}): {e}") from None
        w = torch.from_numpy(values).reshape(t.shape)
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        return unpermute_rope(w, heads[kind]) if kind in heads else w

    return LazyTensors({_hf_name(t.name): (lambda t=t: read(t)) for t in tensors})


def _tokenizer(f: _File) -> HFTokenizer:
    """The file's byte-level BPE vocabulary as an HF tokenizer that tokenizes like llama.cpp."""
    model = f.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise f.fail(
            f"tokenizer model {model!r} is not supported; gptkit builds byte-level BPE "
            "('gpt2') tokenizers from GGUF vocabularies"
        )
    pre = f.get("tokenizer.ggml.pre", "default")  # llama.cpp's fallback for old files, too
    if pre not in PRE_TOKENIZERS:
        raise f.fail(
            f"pre-tokenizer {pre!r} is not supported; gptkit knows {', '.join(PRE_TOKENIZERS)}"
        )
    splits, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    try:
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocab
        raise f.fail(f"vocabulary and merges do not fit together: {e}") from None
    tok = HFTokenizerObject(bpe)
    isolated = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*isolated, byte_level])
    tok.decoder = decoders.ByteLevel()

    def named(key: str) -> str | None:
        i = f.get(f"tokenizer.ggml.{key}_token_id", None)
        if i is not None and not 0 <= i < len(tokens):
            raise f.fail(f"tokenizer.ggml.{key}_token_id={i} is outside the vocabulary")
        return None if i is None else tokens[i]

    names = {"eos_token": named("eos"), "bos_token": named("bos"), "pad_token": named("padding")}
    types = f.get("tokenizer.ggml.token_type", [])
    # llama.cpp matches control tokens whole when parsing specials, and user-defined ones always.
    special = [t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL]
    special += [t for t in (*names.values(), named("unknown")) if t is not None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    # gptkit's encode never adds BOS/EOS (callers add them by id); a post-processor keeps the
    # file's add_bos/add_eos flags in tokenizer.json for transformers and other HF users.
    single = ["$A"]
    if names["bos_token"] and f.get("tokenizer.ggml.add_bos_token", add_bos):
        single.insert(0, names["bos_token"])
    if names["eos_token"] and f.get("tokenizer.ggml.add_eos_token", False):
        single.append(names["eos_token"])
    if len(single) > 1:
        ends = [(t, tokens.index(t)) for t in single if t != "$A"]
        tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=ends)
    wrapped = HFTokenizer(tok, **names)
    wrapped.chat_template = f.get("tokenizer.chat_template", None)
    return wrapped


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (any architecture; no tensor is read)."""
    return _tokenizer(_File(path))


def read_gguf(
    path: str | Path,
    decode_layout: bool = False,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[GPTConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, float32 tensors under gptkit names, tokenizer) of a llama GGUF file.

    A tied model has no lm_head.weight, as in gptkit checkpoints. decode_layout: see
    hf_to_gptkit_state_dict. Raises GGUFError, or resources.ResourceError (before any tensor
    is read) when the model cannot fit in float32 on the CPU or in `dtype` on `device`.
    """
    f = _File(path)
    config = _config(f, {t.name for t in f.tensors})
    # The float32 weights are built on the CPU whatever the target: refuse before that.
    resources.check_inference(config, str(f.path), "cpu", torch.float32)
    if torch.device(device).type != "cpu":
        resources.check_inference(config, str(f.path), device, dtype)
    tokenizer = _tokenizer(f)
    try:
        tensors = hf_to_gptkit_state_dict(_tensors(f, config), config, "llama", decode_layout)
    except ConversionError as e:
        raise f.fail(str(e)) from None
    return config, tensors, tokenizer


def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    decode_layout: bool = False,
) -> tuple[GPT, Tokenizer]:
    """A gptkit GPT (eval mode) with the dequantized weights of a GGUF file, and its tokenizer."""
    config, tensors, tokenizer = read_gguf(path, decode_layout, device=device, dtype=dtype)
    return model_from_state_dict(config, tensors, device, dtype, source=path), tokenizer
