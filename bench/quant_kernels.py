"""Does a 4-bit kernel pay off on this CPU? One SmolLM2 MLP matrix (3072 x 576) multiplied in
float32, by gptkit's int8 layer (fbgemm, quantize.py) and by torch's CPU int4 kernel
(`_weight_int4pack_mm_for_cpu`, 4-bit weights in groups of 32), at 1 row (a decode step), 16
rows and 1024 rows (a fine-tuning batch of 16 x 64 tokens, what `peft.quantize` multiplies).

    .venv/bin/python bench/quant_kernels.py [--reps 30] [--smoke]

Prints medians in ms, each kernel's time over float32's, and its relative error against the
float32 product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gptkit import machine
from gptkit.quantize import Int8Linear

N, K, GROUP = 3072, 576, 32  # SmolLM2's fused gate/up projection; int4 groups of 32


def int4_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int4 weights, scales and zeros [K / GROUP, N, 2]) for torch's CPU int4 kernel:
    asymmetric 4-bit per group of GROUP inputs, as torch's own int4 weight-only quantizer."""
    groups = w.reshape(N, K // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros.contiguous()


def median_ms(f, reps: int) -> float:
    f()  # warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="2 repetitions (tests)")
    args = parser.parse_args()
    reps = 2 if args.smoke else args.reps
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w
    int8 = Int8Linear.from_linear(linear)
    packed, scales_zeros = int4_weights(w)
    print(f"machine: {machine.cpu().describe()}, torch {torch.__version__}")
    print(f"[rows, {K}] x [{K}, {N}]: median ms of {reps}; ratio = kernel / float32")
    print(f"{'rows':>5} {'fp32 ms':>8} {'int8 ms':>8} {'ratio':>6} {'err':>6} "
          f"{'int4 ms':>8} {'ratio':>6} {'err':>6}")  # fmt: skip
    for rows in (1, 16, 1024):
        x = torch.randn(rows, K)
        exact = F.linear(x, w)
        kernels = {
            "int8": lambda x=x: int8(x),
            "int4": lambda x=x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros),
        }
        fp32 = median_ms(lambda x=x: F.linear(x, w), reps)
        line = f"{rows:>5} {fp32:>8.3f}"
        for kernel in kernels.values():
            error = ((kernel() - exact).norm() / exact.norm()).item()
            ms = median_ms(kernel, reps)
            line += f" {ms:>8.3f} {ms / fp32:>5.2f}x {error:>6.3f}"
        print(line)


if __name__ == "__main__":
    main()
