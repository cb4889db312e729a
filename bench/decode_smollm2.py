"""SmolLM2-135M-Instruct on this machine: prompt processing and greedy decoding, batch 1.

Four peers in one process, the same weights for each:
- gptkit, fp32, dequantized from the GGUF file;
- gptkit, int8 (`--quantize int8`: those fp32 weights quantized to int8 again);
- transformers, fp32, `from_pretrained(..., gguf_file=...)` (it dequantizes the same file);
- llama.cpp (llama-cpp-python), computing on the Q4_1 weights themselves, 2 threads.

Each round times a 256-token prompt (one forward pass, no sampling) and a 128-token greedy
generation after it; `common.race` prints medians, tokens/s and ratios.

    .venv/bin/python bench/decode_smollm2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import time

import torch
import transformers
from common import gptkit_peer, parse_args, race, transformers_peer, write_json

import gptkit
from gptkit.api import named_model_path

NAME = "smollm2-135m-instruct"
BANDWIDTH = 30e9  # bytes/s this machine streams from memory (DESIGN.md's measured facts)
PEAK_FLOPS = 150e9  # its fp32 matmul peak


def llama_cpp_peer(prompt: list[int], new: int):
    import llama_cpp

    llm = llama_cpp.Llama(
        str(named_model_path(NAME)), n_ctx=1024, n_threads=2, n_batch=512, verbose=False
    )

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode() -> float:
        # llama-cpp-python reuses a cached prompt prefix, so "generation minus prefill" would
        # flatter it: time from the first generated token to the last instead, and scale.
        llm.reset()
        stamps = []
        for _, _ in zip(range(new), llm.generate(prompt, top_k=1, temp=0.0), strict=False):
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) * new / (new - 1)

    return prefill, decode


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(0)
    prompt = torch.randint(100, 49000, (args.prompt,)).tolist()
    path = named_model_path(NAME)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    fp32 = gptkit.load(NAME, device="cpu").model
    int8 = gptkit.load(NAME, device="cpu", quantize="int8").model
    peers = {
        "gptkit fp32": gptkit_peer(fp32, prompt, args.new),
        "gptkit int8": gptkit_peer(int8, prompt, args.new),
        "transformers fp32": transformers_peer(ref, prompt, args.new),
        "llama.cpp Q4_1": llama_cpp_peer(prompt, args.new),
    }
    rate = race("SmolLM2-135M-Instruct", peers, args)
    # Hardware bounds: a decoding step reads every weight once (memory bandwidth); a prompt
    # token costs 2 FLOPs per weight it multiplies (not the embedding: the head runs for the
    # last token only) plus attention over the prompt (the fp32 matmul peak).
    weight_bytes = sum(p.numel() * p.element_size() for p in fp32.parameters())
    attention = 4 * fp32.config.n_layer * fp32.config.n_embd * args.prompt // 2  # causal: half
    flops = 2 * fp32.num_params(exclude_embeddings=True) + attention
    decode_bound, prompt_bound = BANDWIDTH / weight_bytes, PEAK_FLOPS / flops
    ours = rate["gptkit fp32"]
    print(
        f"fp32 bounds here: decode {decode_bound:.0f} tok/s ({weight_bytes / 1e6:.0f} MB per "
        f"token at {BANDWIDTH / 1e9:.0f} GB/s), prompt {prompt_bound:.0f} tok/s "
        f"({flops / 1e9:.2f} GFLOP per token at {PEAK_FLOPS / 1e9:.0f} GFLOP/s); gptkit fp32 "
        f"reaches {ours['decode'] / decode_bound:.0%} and {ours['prompt'] / prompt_bound:.0%}"
    )
    write_json(args, {"rate": rate, "decode_bound": decode_bound, "prompt_bound": prompt_bound})


if __name__ == "__main__":
    main()
