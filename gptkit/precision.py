"""The precision batch inference computes in: float32, or bfloat16 matmuls under autocast.

Classifying, tagging and embedding many texts is bound by matmul FLOPs, not by reading the
weights, so the matmul precision sets the speed. Under `torch.autocast` the weights stay
float32; each matmul runs in bfloat16 with float32 accumulation, and norms, softmax and the
residual stream stay float32, so results move little: all-MiniLM-L6-v2's vectors of 400 SQuAD
paragraphs kept a cosine of >= 0.99997 to the float32 ones (docs/RESULTS.md has what it does to
labels and retrieval).

Whether it pays is the CPU's: on one with AVX-512-BF16 or AMX, bfloat16 matmuls run several
times faster than float32 (a 2-core AMD EPYC: 895 against 195 GFLOP/s, 2.3-2.8x end to end);
on one without, they are emulated and run slower. `check` measures both once (cached per
machine, see machine.py) and warns when bfloat16 would be the slower. Generation stays float32:
its greedy tokens are held to transformers' and llama.cpp's, and one row is bound by memory.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .config import DTYPES, ConfigError


def check(dtype: str, device: torch.device | str, quantize: str | None = None) -> None:
    """ConfigError for a dtype we do not compute in (or bfloat16 over int8 weights); a warning
    on stderr when this CPU's bfloat16 matmuls are slower than its float32 ones."""
    if known(dtype) == "float32":
        return
    if quantize is not None:
        raise ConfigError(f"--dtype bfloat16 with --quantize {quantize}: pick one of them")
    device = torch.device(device)
    if device.type != "cpu":
        return
    from .machine import peak_flops

    bf16, fp32 = peak_flops(device, torch.bfloat16), peak_flops(device, torch.float32)
    if bf16 < fp32:
        print(
            f"warning: bfloat16 matmuls run at {bf16 / 1e9:.0f} GFLOP/s on this CPU against "
            f"float32's {fp32 / 1e9:.0f} (no AVX-512-BF16 or AMX): --dtype float32 is faster",
            file=sys.stderr,
        )


def known(dtype: str) -> str:
    """dtype, if it is one we compute in; else ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def compute(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context that runs a batch in `dtype`: autocast for bfloat16, nothing for float32.
    Autocast is per thread: enter it in the thread that runs the model."""
    if known(dtype) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
