"""How many operator calls one decoding step makes, per layer, and how long a step takes.

Counts what the dispatcher sees for one transformer block of SmolLM2-135M-Instruct in a decode
step (a TorchDispatchMode over the block: every aten call, views included), then times greedy
decode steps after a 64-token prompt (median). Fewer calls per layer is less fixed overhead per
token; the weight streaming each step must do is the same.

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


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps to time")
    args = parser.parse_args()
    lm = gptkit.load("smollm2-135m-instruct")
    model = lm.model
    prompt = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 8)[:64]
    cache = model.new_cache(1, len(prompt) + args.steps + 2)
    token = model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1].argmax(-1)  # [1]

    # One block of one decode step, as GPT.features runs it.
    x = model.tok_emb(token[:, None])  # [1, 1, C]
    position = torch.tensor([[cache.length]])
    rope = None
    if model.config.positions == "rope":
        rope = (model.rope_cos[position][:, :, None], model.rope_sin[position][:, :, None])
    masks = model._masks(1, 1, cache.length, None, x.device)
    with CountOps() as counted:
        model.blocks[0](x, rope, masks, cache)
    print(f"operator calls per layer in a decode step: {sum(counted.ops.values())}")
    print("  " + ", ".join(f"{name} {n}" for name, n in counted.ops.most_common()))

    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        token = model(token[:, None], cache=cache, last_only=True)[:, -1].argmax(-1)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[len(times) // 8 :])  # the first steps warm up
    print(f"median decode step: {step * 1000:.1f} ms ({1 / step:.1f} tok/s), {args.steps} steps")


if __name__ == "__main__":
    main()
