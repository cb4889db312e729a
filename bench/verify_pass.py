"""What a speculative check costs on this CPU: SmolLM2-135M-Instruct's pass over 1 to 9 new
tokens through a KV cache, and where the extra cost of several rows goes, matrix by matrix.

Speculative decoding pays when a pass over k + 1 tokens costs little more than a pass over one
(generation/speculative.py). This times, round-robin and as medians:
- each of the model's weight shapes multiplied as decoding multiplies it (cpu_plan.plan_linear
  under this machine's decode plan), at 1 to 5 rows, over enough copies of the matrix that
  every call streams it from memory as a decode step does;
- the whole pass over 1 to 9 tokens after a 400-token prompt, as a check runs it
  (`model(x, cache=...)`: the native step, cpu_step.py, where it serves the model), and in
  PyTorch alone (the native step set aside), whose products the matrix table times.

    .venv/bin/python bench/verify_pass.py [--rounds 9] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import gptkit
from gptkit import cpu_plan, machine

PROMPT = 400  # cached tokens before the timed pass


def shapes(config) -> dict[str, tuple[int, int, int]]:
    """{name: (out, in, matrices of this shape per pass)} of a SmolLM2-style model's linears."""
    c, layers = config, config.n_layer
    qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim
    return {
        "qkv": (qkv, c.n_embd, layers),
        "attention out": (c.n_embd, c.n_head * c.head_dim, layers),
        "MLP in (gate, up)": (2 * c.intermediate_size, c.n_embd, layers),
        "MLP out": (c.n_embd, c.intermediate_size, layers),
        "head": (c.vocab_size, c.n_embd, 1),
    }


def time_shapes(
    config, rows: list[int], rounds: int, calls: int, footprint: int
) -> dict[str, dict[int, float]]:
    """{shape: {rows: median µs per plan_linear call}}, cycling through copies of each matrix
    that fill `footprint` bytes: past the caches, every call streams its weights from memory,
    as a pass does. Each timed block follows untimed calls of its row count, as passes are
    timed (time_passes)."""
    plan, out = cpu_plan.decode_plan(), {}
    for name, (n, k, _) in shapes(config).items():
        weights = [torch.randn(n, k) for _ in range(max(2, footprint // (n * k * 4)))]
        packed = [machine.pack(w) if plan.packed_from else None for w in weights]  # as decoding
        xs = {r: torch.randn(r, k) for r in rows}
        times: dict[int, list[float]] = {r: [] for r in rows}
        for _ in range(rounds):
            for r in rows:
                for timed in (False, True):
                    start = time.perf_counter()
                    for i in range(calls):
                        j = i % len(weights)
                        cpu_plan.plan_linear(xs[r], weights[j], None, plan, packed[j])
                    if timed:
                        times[r].append((time.perf_counter() - start) / calls * 1e6)
        out[name] = {r: statistics.median(t) for r, t in times.items()}
    return out


@torch.inference_mode()
def time_passes(lm, rows: list[int], rounds: int, native: bool) -> dict[int, float]:
    """{tokens in the pass: median ms of a pass through a 400-token cache, every row's
    logits}, with the model's native step or without it. Each timed pass follows an untimed
    one of its size: a pass right after one of another size (another split, other buffers)
    pays for the switch, which is not its own cost."""
    model = lm.model
    step = model.native_step
    model.native_step = step if native else None
    cache = model.new_cache(1, PROMPT + max(rows))
    model(torch.randint(100, 40000, (1, PROMPT)), cache=cache, last_only=True)
    xs = {r: torch.randint(100, 40000, (1, r)) for r in rows}
    times: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(rounds):
        for r in rows:
            for timed in (False, True):
                start = time.perf_counter()
                model(xs[r], cache=cache)
                if timed:
                    times[r].append((time.perf_counter() - start) * 1e3)
                cache.truncate(PROMPT)
    model.native_step = step
    return {r: statistics.median(t) for r, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="1 and 4 rows, 1 round: a check")
    args = parser.parse_args()
    rows, pass_rows = ([1, 4], [1, 4]) if args.smoke else ([1, 2, 3, 4, 5], list(range(1, 10)))
    rounds, calls, footprint = (1, 2, 8 << 20) if args.smoke else (args.rounds, 40, 256 << 20)
    lm = gptkit.load("smollm2-135m-instruct", device="cpu")
    tuning = cpu_plan.decode_tuning()
    print(
        f"machine: {machine.cpu().describe()}; decode plan {tuning.plan.name}, split up to "
        f"{tuning.plan.max_split_rows} rows; load average {os.getloadavg()[0]:.1f}"
    )
    by_shape = time_shapes(lm.config, rows, rounds, calls, footprint)
    print(f"\none matrix, µs per call (medians of {rounds}), and over 1 row")
    print(f"{'matrix':<18} {'shape':>12} " + " ".join(f"{f'{r} rows':>14}" for r in rows))
    total = {r: 0.0 for r in rows}
    for name, (n, k, count) in shapes(lm.config).items():
        t = by_shape[name]
        cells = " ".join(f"{t[r]:>7.0f} {t[r] / t[1]:>5.2f}x" for r in rows)
        print(f"{name:<18} {f'{n}x{k}':>12} {cells}")
        for r in rows:
            total[r] += count * t[r] / 1e3
    cells = " ".join(f"{total[r]:>6.1f}ms {total[r] / total[1]:>4.2f}x" for r in rows)
    print(f"{'all, one pass':<18} {'':>12} {cells}")
    print(f"\nthe whole pass after a {PROMPT}-token prompt, ms (medians of {rounds}):")
    ways = {"as a check runs it": True, "PyTorch alone": False} if lm.model.native_step else {}
    for way, native in (ways or {"PyTorch": False}).items():
        passes = time_passes(lm, pass_rows, rounds, native)
        cells = ", ".join(f"{r} tokens {t:.1f} ({t / passes[1]:.2f}x)" for r, t in passes.items())
        print(f"  {way}: {cells}")


if __name__ == "__main__":
    main()
