"""GGUF (llama.cpp's file format) -> gptkit: config, float32 weights and tokenizer from one file.

gguf_header.py reads the file's header; the `gguf` package (gguf-py, maintained with llama.cpp)
dequantizes the tensors. The three simplest and most common block types (Q8_0, Q4_0, Q4_1) are
dequantized here with torch instead, in the same float32 arithmetic and to the same bits, but
faster: on a 2-core AMD EPYC, SmolLM2-135M's 211 such tensors take 0.20 s against gguf-py's
0.52, and a whole load 1.19 s against 1.82. What this module adds is the mapping:

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

from pathlib import Path

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
from .gguf_header import GGUFFile, Stored
from .model import GPT
from .tokenizer import HFTokenizer, Tokenizer

# Tensor types gguf-py dequantizes that llama.cpp's common presets produce.
SUPPORTED_TYPES = (
    *("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
)

# GGUF name -> Hugging Face Llama name (export_gguf.py maps the other way).
MODEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
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


def _config(f: GGUFFile, tensor_names: set[str]) -> GPTConfig:
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
    return names | {f"blk.{i}.{n}.weight" for i in range(config.n_layer) for n in LAYER_NAMES}


def _hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (names were checked)."""
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{MODEL_NAMES[parts[0]]}.{parts[1]}"


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter (`permute` in convert_hf_to_gguf.py) gives q/k.

    ggml's Llama RoPE rotates adjacent pairs (x0, x1), (x2, x3)...; HF (and gptkit) rotate
    the two halves of each head. The converter interleaves each head's halves so that the same
    weights work with pair rotation; reading them back we de-interleave (as transformers does).
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k: the inverse of `unpermute_rope`."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of each block [n, bytes] uint8, as float32 [n, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit values: every low nibble, then every high one."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


# Block bytes [n, type_size] uint8 -> values [n, 32] float32, as gguf.quants computes them.
DEQUANTIZE = {
    "Q8_0": lambda b: b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0),
    "Q4_0": lambda b: _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float(),
    "Q4_1": lambda b: _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2),
}


def _tensors(f: GGUFFile, config: GPTConfig) -> LazyTensors:
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

    def read(t: Stored) -> torch.Tensor:
        raw = bytearray(t.n_bytes)
        with f.path.open("rb") as file:
            file.seek(t.offset)
            if file.readinto(raw) != t.n_bytes:
                raise f.fail(f"tensor {t.name}: the file changed while it was being read")
        try:
            if t.qtype.name in DEQUANTIZE:
                type_size = f.gguf.GGML_QUANT_SIZES[t.qtype][1]
                blocks = torch.frombuffer(raw, dtype=torch.uint8).view(-1, type_size)
                w = DEQUANTIZE[t.qtype.name](blocks).reshape(t.shape)
            else:
                data = np.frombuffer(raw, dtype=t.dtype).reshape(-1, t.row)
                w = torch.from_numpy(f.gguf.quants.dequantize(data, t.qtype)).reshape(t.shape)
        except Exception as e:
            raise f.fail(f"cannot dequantize tensor {t.name} ({t.qtype.name}): {e}") from None
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        return unpermute_rope(w, heads[kind]) if kind in heads else w

    return LazyTensors({_hf_name(t.name): (lambda t=t: read(t)) for t in tensors})


def _tokenizer(f: GGUFFile) -> HFTokenizer:
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
    return _tokenizer(GGUFFile(path))


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
    f = GGUFFile(path)
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
