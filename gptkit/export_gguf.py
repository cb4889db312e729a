"""gptkit -> GGUF, so that a model trained or fine-tuned here runs in llama.cpp and Ollama.

The mapping goes through the Hugging Face names `export_hf` writes (convert.py), then renames
them as llama.cpp's convert_hf_to_gguf.py does:

- Llama-style models (RoPE, RMSNorm, SwiGLU) become the `llama` architecture, q/k rows in the
  pair order llama.cpp's RoPE rotates (`permute_rope`);
- GPT-2-style models (learned positions, LayerNorm, tanh-GELU) become `gpt2`, with the fused
  qkv and the MLP weights back in (out, in) order from HF's Conv1D (in, out);
- the byte-level BPE tokenizer becomes `tokenizer.ggml.*`: tokens by id, merges, token types
  (special tokens CONTROL, other added tokens USER_DEFINED, rows past the vocabulary UNUSED
  "[PAD<i>]" as llama.cpp's converter writes them), the pre-tokenizer name whose regexes split
  text as this tokenizer does, BOS/EOS/pad ids and the chat template.

gguf-py (maintained with llama.cpp) writes the file and quantizes: 2-D weights in the chosen
type, except the output projection (F16 under quantized types); norms, biases and GPT-2's
position table in F32 (as llama.cpp's own converter keeps them). K-quants (q4_k_m, ...) have
no quantizer in gguf-py; llama.cpp's `llama-quantize` makes them from the f32 or f16 file this
writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .convert import ConversionError, gptkit_to_hf_state_dict
from .convert_gguf import LAYER_NAMES, MODEL_NAMES, PRE_TOKENIZERS, permute_rope
from .hf_arch import gptkit_config_to_hf
from .model import GPT
from .tokenizer import HFTokenizer, Tokenizer


@dataclass(frozen=True)
class GGUFType:
    qtype: str  # gguf.GGMLQuantizationType name of the 2-D weights
    file_type: str  # gguf.LlamaFileType name (general.file_type)


# --type choices: the types gguf-py can both quantize and llama.cpp runs on a CPU.
GGUF_TYPES = {
    "f32": GGUFType("F32", "ALL_F32"),
    "f16": GGUFType("F16", "MOSTLY_F16"),
    "q8_0": GGUFType("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": GGUFType("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": GGUFType("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": GGUFType("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": GGUFType("Q4_0", "MOSTLY_Q4_0"),
}

# HF GPT-2 name (after "transformer.h.{i}." or at the top) -> (GGUF name, stored transposed).
_GPT2_NAMES = {
    "transformer.wte": ("token_embd", False),
    "transformer.wpe": ("position_embd", False),
    "transformer.ln_f": ("output_norm", False),
    "lm_head": ("output", False),
    "ln_1": ("attn_norm", False),
    "attn.c_attn": ("attn_qkv", True),
    "attn.c_proj": ("attn_output", True),
    "ln_2": ("ffn_norm", False),
    "mlp.c_fc": ("ffn_up", True),
    "mlp.c_proj": ("ffn_down", True),
}
_LLAMA_NAMES = {hf: gguf for gguf, hf in (MODEL_NAMES | LAYER_NAMES).items()}
_HF_LAYER = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)")
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # llama.cpp's LLAMA_TOKEN_TYPE_*


def _gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Every weight under its GGUF name, in the layout llama.cpp reads (float32, CPU)."""
    heads = {"attn_q": model.config.n_head, "attn_k": model.config.n_kv_head}
    out = {}
    for name, w in gptkit_to_hf_state_dict(model, arch).items():
        if m := _HF_LAYER.fullmatch(name):  # model.layers.3.self_attn.q_proj.weight
            layer, stem, kind = m.groups()
            prefix = f"blk.{layer}."
        else:  # model.embed_tokens.weight
            (stem, kind), prefix = name.rsplit(".", 1), ""
        if arch == "llama":
            gguf_stem = _LLAMA_NAMES[stem]
            if gguf_stem in heads:
                w = permute_rope(w, heads[gguf_stem])
        else:
            gguf_stem, transposed = _GPT2_NAMES[stem]
            if transposed and kind == "weight":
                w = w.t()
        out[f"{prefix}{gguf_stem}.{kind}"] = w.float().contiguous()
    return out


def _architecture(model: GPT) -> str:
    """`llama` or `gpt2`; ConversionError naming what llama.cpp cannot compute."""
    c = model.config
    if c.head != "lm":
        raise ConversionError(
            f"GGUF export writes language models; this one has a head={c.head!r} "
            "(export it with --to hf, which keeps classifiers)"
        )
    arch = gptkit_config_to_hf(c)["model_type"]  # the same checks as --to hf
    if arch == "gpt2" and c.activation != "gelu_tanh":
        raise ConversionError(
            f"llama.cpp's gpt2 computes GELU with the tanh approximation; this model has "
            f"activation={c.activation!r} (train with activation=gelu_tanh to export to GGUF)"
        )
    return arch


def _pre_tokenizer(spec: dict) -> str | None:
    """The llama.cpp pre-tokenizer name that splits text as this tokenizer.json pre_tokenizer
    does, or None. Three forms are known: GPT-2's ByteLevel regex alone (gptkit's trained
    tokenizers, GPT-2), SmolLM's single digits then ByteLevel, and the Split regexes a GGUF
    file's tokenizer was read into (convert_gguf.py)."""
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    if not parts:
        return None
    *splits, last = parts
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if last.get("use_regex", True):
        digits = [{"type": "Digits", "individual_digits": True}]
        return {0: "gpt-2", 1: "smollm" if splits == digits else None}.get(len(splits))
    if not all(p.get("type") == "Split" and p.get("behavior") == "Isolated" for p in splits):
        return None
    regexes = tuple(p["pattern"].get("Regex") for p in splits)
    return next((name for name, (rs, _, _) in PRE_TOKENIZERS.items() if rs == regexes), None)


def _tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer; ConversionError for any other."""
    spec = tokenizer.spec() if isinstance(tokenizer, HFTokenizer) else {}
    model = spec.get("model") or {}
    pre = _pre_tokenizer(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or pre is None or spec.get("normalizer"):
        raise ConversionError(
            "GGUF export needs a byte-level BPE tokenizer (gptkit tokenizer train, GPT-2, "
            f"SmolLM2, or one read from a GGUF file); this one is {tokenizer!r}"
        )
    if bool(model.get("ignore_merges", False)) != PRE_TOKENIZERS[pre][1]:
        raise ConversionError(f"the tokenizer's ignore_merges differs from llama.cpp's {pre!r}")
    tokens: list[str | None] = [None] * vocab_size
    types = [_NORMAL] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = token
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = _CONTROL if added["special"] else _USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:  # rows the model has beyond the vocabulary
            tokens[i], types[i] = f"[PAD{i}]", _UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = spec.get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    return dict(
        pre=pre,
        tokens=tokens,
        types=types,
        merges=merges,
        add_bos="SpecialToken" in first,
        ids={"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "padding": tokenizer.pad_id},
        chat_template=tokenizer.chat_template,
    )


def export_gguf(
    model: GPT, tokenizer: Tokenizer, path: str | Path, type: str = "f32", name: str = "gptkit"
) -> Path:
    """Write `model` and its tokenizer as one GGUF file llama.cpp loads (`type`: GGUF_TYPES).

    The file is written beside `path` and renamed onto it when complete, so an existing file
    there is replaced only by a whole new one. Raises ConversionError naming the knob when the
    model or tokenizer has no llama.cpp equivalent.
    """
    import gguf  # a dependency of gptkit, imported here to keep `import gptkit` fast

    if type not in GGUF_TYPES:
        raise ConversionError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    c, kind = model.config, GGUF_TYPES[type]
    arch = _architecture(model)
    tok = _tokenizer_metadata(tokenizer, c.vocab_size)
    tensors = _gguf_tensors(model, arch)
    qtype = gguf.GGMLQuantizationType[kind.qtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    w = gguf.GGUFWriter(partial, arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[kind.file_type])
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    if arch == "llama":
        w.add_head_count_kv(c.n_kv_head)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        if c.head_dim * c.n_head != c.n_embd:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        w.add_vocab_size(c.vocab_size)
    else:
        w.add_layer_norm_eps(c.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, i in tok["ids"].items():
        if i is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", i)
    w.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    # The output projection (the embedding, when tied) decides the top token directly: it stays
    # F16 under quantized types, as llama.cpp's quantizer keeps it a type above the rest.
    output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for tensor_name, t in tensors.items():
        x = t.numpy()
        matrix = x.ndim == 2 and not tensor_name.startswith("position_embd")
        if not matrix or qtype == gguf.GGMLQuantizationType.F32 or x.shape[-1] % block:
            w.add_tensor(tensor_name, x)  # llama.cpp's converter keeps these in F32 too
        elif qtype == gguf.GGMLQuantizationType.F16 or tensor_name == output:
            w.add_tensor(tensor_name, x.astype(np.float16))
        else:
            w.add_tensor(tensor_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
