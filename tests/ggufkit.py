"""A tiny llama GGUF file, written as llama.cpp's converter writes one (test helper)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import tokenizers

Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute` (HF q/k rows -> GGUF rows)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


BYTE_TOKENS = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *BYTE_TOKENS]


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    qtype: Q = Q.F32,
    *,
    arch: str = "llama",
    tokens: list[str] = TINY_TOKENS,
    merges: list[str] = (),
    types: list[int] | None = None,
    pre: str = "gpt-2",
    tokenizer_model: str = "gpt2",
    shape: dict[str, int] | None = None,
    extra: dict[str, str | int] | None = None,
    raw_types: dict[str, Q] | None = None,
) -> Path:
    """A llama GGUF as llama.cpp's converter writes it: 2-D tensors in `qtype`, others F32;
    `raw_types` names tensors given as the raw bytes of another type."""
    s = dict(C=256, H=4, KV=2, I=512, L=1) | (shape or {})
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(s["L"])
    w.add_context_length(64)
    w.add_embedding_length(s["C"])
    w.add_feed_forward_length(s["I"])
    w.add_head_count(s["H"])
    w.add_head_count_kv(s["KV"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(s["C"] // s["H"])
    for key, value in (extra or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(list(merges))
    w.add_token_types(types if types is not None else [3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{{ messages }}")
    for name, x in tensors.items():
        if name in (raw_types or {}):  # already the bytes of that type
            w.add_tensor(name, x, raw_dtype=raw_types[name])
        elif x.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_weights(tied: bool = False, C=256, H=4, KV=2, I=512, L=1, seed=0):
    """(GGUF tensors with q/k permuted as llama.cpp stores them, gptkit tensors expected)."""
    rng = np.random.default_rng(seed)
    D, V = C // H, len(TINY_TOKENS)

    def rand(*shape):
        return (rng.standard_normal(shape) * (1.0 if len(shape) == 1 else 0.05)).astype(np.float32)

    g = {"token_embd.weight": rand(V, C), "output_norm.weight": rand(C)}
    if not tied:
        g["output.weight"] = rand(V, C)
    ours = {"tok_emb.weight": g["token_embd.weight"], "norm_f.weight": g["output_norm.weight"]}
    if not tied:
        ours["lm_head.weight"] = g["output.weight"]
    for i in range(L):
        b = f"blk.{i}."
        q, k, v = rand(H * D, C), rand(KV * D, C), rand(KV * D, C)
        gate, up = rand(I, C), rand(I, C)
        g |= {b + "attn_q.weight": permute(q, H), b + "attn_k.weight": permute(k, KV)}
        g |= {b + "attn_v.weight": v, b + "attn_output.weight": rand(C, H * D)}
        g |= {
            b + "ffn_gate.weight": gate,
            b + "ffn_up.weight": up,
            b + "ffn_down.weight": rand(C, I),
        }
        g |= {b + "attn_norm.weight": rand(C), b + "ffn_norm.weight": rand(C)}
        ours |= {
            f"blocks.{i}.norm1.weight": g[b + "attn_norm.weight"],
            f"blocks.{i}.attn.qkv.weight": np.concatenate([q, k, v]),
            f"blocks.{i}.attn.proj.weight": g[b + "attn_output.weight"],
            f"blocks.{i}.norm2.weight": g[b + "ffn_norm.weight"],
            f"blocks.{i}.mlp.fc.weight": np.concatenate([gate, up]),
            f"blocks.{i}.mlp.proj.weight": g[b + "ffn_down.weight"],
        }
    return g, ours
