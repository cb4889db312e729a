"""CPU training steps with the linear layers through oneDNN (OneDNNLinear) against nn.Linear's
F.linear (MKL: what nanoGPT and transformers run), the same model and batch, in one process.

Each round times a few full steps (forward, backward, fused AdamW) of each variant in turn;
medians over the rounds, the step-time ratio and tokens/s. Three Llama-style shapes: the
`make demo` model (width 192), width 512 and GPT-2's width 768. The machine's own choice
(`onednn_is_faster`, what `gptkit pretrain` and `finetune` use) is printed with the
two libraries' timings it came from.

    .venv/bin/python bench/train_linear.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from common import add_smoke, write_json

from gptkit import machine
from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.onednn import measure, onednn_is_faster, use_onednn_linears

LLAMA = dict(norm="rmsnorm", positions="rope", activation="swiglu", bias=False)
# name: (config, batch, tokens per row)
SHAPES = {
    "demo, width 192": (
        GPTConfig(
            n_layer=4, n_head=6, n_kv_head=2, n_embd=192, intermediate_size=512,
            block_size=128, vocab_size=8192, **LLAMA,
        ),
        16,
        128,
    ),
    "width 512, 6 layers": (
        GPTConfig(
            n_layer=6, n_head=8, n_embd=512, intermediate_size=1536, block_size=256,
            vocab_size=8192, **LLAMA,
        ),
        8,
        256,
    ),
    "GPT-2 width 768, 4 layers": (
        GPTConfig(
            n_layer=4, n_head=12, n_embd=768, intermediate_size=3072, block_size=256,
            vocab_size=50304, **LLAMA,
        ),
        8,
        256,
    ),
}  # fmt: skip


def stepper(model: GPT, batch: int, tokens: int):
    """A function that runs `steps` training steps and returns each one's seconds."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(model.config.vocab_size, (batch, tokens), generator=gen) for _ in "xy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def run(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    add_smoke(parser)
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    shapes = dict(list(SHAPES.items())[:1]) if args.smoke else SHAPES
    rounds, steps = (1, 1) if args.smoke else (args.rounds, args.steps)

    print(f"machine: {machine.cpu().describe()}; torch {torch.__version__}")
    seconds = measure()
    choice = "oneDNN" if onednn_is_faster() else "F.linear"
    print(
        f"a step's products (onednn.SHAPES): F.linear {seconds['mkl'] * 1e3:.1f} ms, "
        f"oneDNN {seconds['onednn'] * 1e3:.1f} ms now; this machine's cached choice: {choice}"
    )
    print(
        f"{'model':<28} {'F.linear ms':>12} {'oneDNN ms':>10} {'oneDNN tok/s':>13} "
        f"{'oneDNN/F.linear':>16}"
    )
    results = {}
    for name, (config, batch, tokens) in shapes.items():
        torch.manual_seed(0)
        plain = GPT(config)
        ours = copy.deepcopy(plain)
        use_onednn_linears(ours)
        runs = {"F.linear": stepper(plain, batch, tokens), "oneDNN": stepper(ours, batch, tokens)}
        times = {label: [] for label in runs}
        if not args.smoke:
            for run in runs.values():
                run(1)  # warm-up: allocator, kernels, AdamW state
        for _ in range(rounds):
            for label, run in runs.items():
                times[label].append(statistics.median(run(steps)))
        mkl, onednn = (statistics.median(times[label]) for label in runs)
        print(
            f"{name:<28} {mkl * 1e3:>12.0f} {onednn * 1e3:>10.0f} "
            f"{batch * tokens / onednn:>13.0f} {onednn / mkl:>15.2f}x"
        )
        results[name] = {"f_linear_s": mkl, "onednn_s": onednn, "speedup": mkl / onednn}
    print(f"medians of {rounds} rounds of {steps} steps each, alternating, in one process")
    write_json(args, {"products_s": seconds, "choice": choice, "steps": results})


if __name__ == "__main__":
    main()
