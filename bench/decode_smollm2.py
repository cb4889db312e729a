"""SmolLM2-135M-Instruct on this machine: prompt processing and greedy decoding, batch 1.

Three peers in one process, the same weights for each:
- gptkit, fp32, dequantized from the GGUF file;
- transformers, fp32, `from_pretrained(..., gguf_file=...)` (it dequantizes the same file);
- llama.cpp (llama-cpp-python), computing on the Q4_1 weights themselves, 2 threads.

Each round times a 256-token prompt (one forward pass, no sampling) and a 128-token greedy
generation after it (its time minus the prompt's); we print medians, tokens/s and ratios.

    .venv/bin/python bench/decode_smollm2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import gptkit
from gptkit.api import named_model_path
from gptkit.config import SampleConfig
from gptkit.generate import generate


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gptkit_peer(prompt: list[int], new: int):
    lm = gptkit.load("smollm2-135m-instruct", device="cpu")
    ids = torch.tensor([prompt])
    sample = SampleConfig(temperature=0, max_new_tokens=new)

    def prefill():
        with torch.inference_mode():
            lm.model(ids, last_only=True)

    def decode():
        generate(lm.model, [prompt], sample)

    return prefill, decode


def transformers_peer(prompt: list[int], new: int):
    import transformers

    path = named_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt])

    def prefill():
        with torch.inference_mode():
            model(ids)

    def decode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )

    return prefill, decode


def llama_cpp_peer(prompt: list[int], new: int):
    import llama_cpp

    path = named_model_path("smollm2-135m-instruct")
    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=2, n_batch=512, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode():
        # llama-cpp-python reuses a cached prompt prefix, so "generation minus prefill" would
        # flatter it: time from the first generated token to the last instead, and scale.
        llm.reset()
        stamps = []
        for _, _ in zip(range(new), llm.generate(prompt, top_k=1, temp=0.0), strict=False):
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) * new / (new - 1)

    return prefill, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(100, 49000, (args.prompt,)).tolist()

    peers = {
        "gptkit fp32": gptkit_peer(prompt, args.new),
        "transformers fp32": transformers_peer(prompt, args.new),
        "llama.cpp Q4_1": llama_cpp_peer(prompt, args.new),
    }
    times: dict[str, dict[str, list[float]]] = {p: {"prefill": [], "decode": []} for p in peers}
    for prefill, decode in peers.values():  # warm up
        prefill(), decode()
    for _ in range(args.rounds):
        for name, (prefill, decode) in peers.items():
            pre = seconds(prefill)
            times[name]["prefill"].append(pre)
            start = time.perf_counter()
            measured = decode()  # a peer may time its own decoding
            total = time.perf_counter() - start
            times[name]["decode"].append(measured if measured is not None else total - pre)

    rate = {
        name: {
            "prefill": args.prompt / statistics.median(t["prefill"]),
            "decode": args.new / statistics.median(t["decode"]),
        }
        for name, t in times.items()
    }
    ours = rate["gptkit fp32"]
    print(
        f"SmolLM2-135M-Instruct, prompt {args.prompt}, decode {args.new} greedy, batch 1, "
        f"{torch.get_num_threads()} threads, medians of {args.rounds}"
    )
    print(
        f"{'peer':<20} {'prompt tok/s':>13} {'decode tok/s':>13} {'gptkit/peer prompt':>19} "
        f"{'gptkit/peer decode':>19}"
    )
    for name, r in rate.items():
        print(
            f"{name:<20} {r['prefill']:>13.1f} {r['decode']:>13.1f} "
            f"{ours['prefill'] / r['prefill']:>18.2f}x {ours['decode'] / r['decode']:>18.2f}x"
        )


if __name__ == "__main__":
    main()
