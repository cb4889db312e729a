"""SmolLM2-135M-Instruct on this machine: prompt processing and greedy decoding, batch 1.

Three peers in one process, the same weights for each:
- gptkit, fp32, dequantized from the GGUF file;
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
from common import gptkit_peer, parse_args, race, transformers_peer

import gptkit
from gptkit.api import named_model_path

NAME = "smollm2-135m-instruct"


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
    peers = {
        "gptkit fp32": gptkit_peer(gptkit.load(NAME, device="cpu").model, prompt, args.new),
        "transformers fp32": transformers_peer(ref, prompt, args.new),
        "llama.cpp Q4_1": llama_cpp_peer(prompt, args.new),
    }
    race("SmolLM2-135M-Instruct", peers, args)


if __name__ == "__main__":
    main()
