"""How many operator calls one decoding step makes, per layer, and how long a step takes:
PyTorch's eager step against the native one (cpu_step.py), SmolLM2-135M-Instruct, batch 1.

Counts what the dispatcher sees in one whole decode step (a TorchDispatchMode over the model's
call: every aten call, views included), divided by the layers; then times greedy decode steps
after a 64-token prompt, both ways alternately in the same process (medians). Fewer calls per
layer is less fixed overhead per token; the weight streaming each step must do is the same.

    .venv/bin/python bench/decode_ops.py [--steps 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gptkit


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, token: torch.Tensor, cache) -> Counter[str]:
    """The calls of a decode step after a first one (which may set things up), both undone."""
    model(token[:, None], cache=cache, last_only=True)
    with CountOps() as counted:
        model(token[:, None], cache=cache, last_only=True)
    cache.truncate(cache.length - 2)
    return counted.ops


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps to time")
    args = parser.parse_args()
    lm = gptkit.load("smollm2-135m-instruct")
    model = lm.model
    native = model.native_step  # None where cpu_step cannot serve (no C compiler, say)
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]
    ways = {"pytorch": None, "native": native} if native is not None else {"pytorch": None}
    caches = {way: model.new_cache(1, len(prompt) + args.steps + 2) for way in ways}
    tokens, times = {}, {way: [] for way in ways}
    for way, step in ways.items():
        model.native_step = step
        logits = model(torch.tensor([prompt]), cache=caches[way], last_only=True)
        tokens[way] = logits[:, -1].argmax(-1)  # [1]
        ops = count_ops(model, tokens[way], caches[way])
        per_layer = sum(ops.values()) / model.config.n_layer
        print(f"{way}: operator calls per layer in a decode step: {per_layer:.1f}")
        print("  " + ", ".join(f"{name} {n}" for name, n in ops.most_common(8)))
    for _ in range(args.steps):  # alternately, so both see the same load
        for way, step in ways.items():
            model.native_step = step
            start = time.perf_counter()
            logits = model(tokens[way][:, None], cache=caches[way], last_only=True)
            times[way].append(time.perf_counter() - start)
            tokens[way] = logits[:, -1].argmax(-1)
    model.native_step = native
    for way, spent in times.items():
        step = statistics.median(spent[len(spent) // 8 :])  # the first steps warm up
        print(f"{way}: median decode step {step * 1000:.1f} ms ({1 / step:.1f} tok/s)")
    if native is not None:
        ratio = statistics.median(
            a / b for a, b in zip(times["native"], times["pytorch"], strict=True)
        )
        print(f"native / pytorch, step by step: median {ratio:.2f}")


if __name__ == "__main__":
    main()
