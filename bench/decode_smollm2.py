"""SmolLM2-135M-Instruct on this machine: prompt processing and greedy decoding, batch 1.

Four peers in one process, the same weights for each:
- gptkit, fp32, dequantized from the GGUF file;
- gptkit, int8 (`--quantize int8`: those fp32 weights quantized to int8 again);
- transformers, fp32, `from_pretrained(..., gguf_file=...)` (it dequantizes the same file);
- llama.cpp (llama-cpp-python), computing on the Q4_1 weights themselves, 2 threads.

Each round times a 256-token prompt (one forward pass, no sampling) and a 128-token greedy
generation after it; `common.race` prints medians, tokens/s and ratios. The bounds come from
this machine's fp32 matmul peak and GEMV bandwidth, measured before and after the race (the
better sample of each), and the output starts with the machine they were measured on. The
GEMV bandwidth is also sampled after every round (`common.gemv_sampler`: the better of the
decode plan's products and the native step's), so the decode
bound's median saw the same load as the decode's median: the fairer of the two ratios on a
shared machine.

    .venv/bin/python bench/decode_smollm2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import transformers
from common import (
    Machine,
    decode_bounds,
    gemv_sampler,
    gptkit_peer,
    parse_args,
    print_bounds,
    race,
    transformers_peer,
    write_json,
)

import gptkit
from gptkit.loading import named_model_path

NAME = "smollm2-135m-instruct"


def llama_cpp_peer(prompt: list[int], new: int, path: Path | None = None, smoke: bool = False):
    """llama.cpp on a GGUF file (default: SmolLM2's own Q4_1 file), 2 threads; a smoke's as
    many as torch's (`make test` gives each test worker its share of the cores: llama.cpp's
    spinning threads on another worker's core slow both several-fold)."""
    import llama_cpp

    path = path or named_model_path(NAME)
    threads = torch.get_num_threads() if smoke else 2
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)

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
    # first: the gptkit models below take the decode plan it finds
    limits = Machine.measure(args.smoke)
    print(limits.header(), flush=True)
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
    }
    try:
        peers["llama.cpp Q4_1"] = llama_cpp_peer(prompt, args.new, smoke=args.smoke)
    except ImportError:  # `make test` builds it; a bench without it still races the others
        print("llama.cpp Q4_1: left out (llama-cpp-python is not installed)")
    sample, gemv = gemv_sampler(), []
    rate = race("SmolLM2-135M-Instruct", peers, args, between=lambda: gemv.append(sample()))
    if not args.smoke:  # the better of two samples; a smoke's one is enough
        limits = limits.best(Machine.measure())
    print(limits.header())
    bounds = decode_bounds(fp32, args.prompt, limits)
    print_bounds("gptkit fp32", rate["gptkit fp32"], bounds, limits)
    median = statistics.median(gemv)
    between = median / bounds["weight_bytes"]  # tok/s
    print(
        f"GEMV sampled after each round: median {median / 1e9:.1f} GB/s "
        f"({min(gemv) / 1e9:.1f}-{max(gemv) / 1e9:.1f}), decode bound {between:.0f} tok/s; "
        f"gptkit fp32 decode reaches {rate['gptkit fp32']['decode'] / between:.0%} of it"
    )
    record = {"rate": rate, **bounds, "decode_bound_between_rounds": between}
    write_json(args, {**record, "machine": limits.to_json()})


if __name__ == "__main__":
    main()
