"""What the decode benchmarks share: flags, the machine they ran on (measured, not assumed), and
a race of peers timed in the same process.

A peer is a pair of callables on the same prompt: `prefill()` runs the prompt through the model
once, `decode()` generates the new tokens greedily after it. `decode` returns the seconds it
spent decoding when it can measure them itself; otherwise its time minus a prefill's counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gptkit import cpu_plan, cpu_step, machine

Peer = tuple[Callable[[], object], Callable[[], float | None]]


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    add_smoke(parser)
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    return args


def add_smoke(parser: argparse.ArgumentParser) -> None:
    """--smoke: a check that every peer runs, not a measurement: one round, no warm-up round
    before it, the machine's limits sampled once (Machine.measure; tests, with a small --prompt
    and --new)."""
    parser.add_argument(
        "--smoke", action="store_true", help="one round, no warm-up, limits sampled once"
    )


def write_json(args: argparse.Namespace, results: dict) -> None:
    """The numbers `python -m bench` puts in its targets table."""
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


@dataclass
class Machine:
    """What bounds a benchmark here, measured in this run: the fp32 matmul peak (prompt
    processing is compute-bound) and the GEMV bandwidth (batch-1 decoding reads every weight
    once per token), with the decode plan that streams fastest."""

    cpu: machine.CPU
    peak_flops: float  # fp32 matmul FLOP/s, best of this run's samples and the cached peak
    gemv_bytes_per_s: float  # best weight streaming rate of a matrix-vector product
    plan: str  # the decode plan that reached it

    @classmethod
    def measure(cls, smoke: bool = False) -> Machine:
        """Fresh samples (a bench re-measures rather than trust a cache taken on a busy
        moment); the decode plan they find is cached for gptkit to use. A smoke (a check that
        the bench runs) takes one matmul sample and the cached decode plan: re-measuring it
        there costs seconds, and would cache a plan measured while the tests load the cores."""
        cpu = torch.device("cpu")
        peak = max(machine.measure_matmul_flops(cpu) for _ in range(1 if smoke else 3))
        tuning = cpu_plan.decode_tuning(refresh=not smoke)
        gemv, plan = tuning.gemv_bytes_per_s, tuning.plan.name
        native = cpu_step.gemv_sampler()  # native decoding's product: the bound is the better
        if native is not None and (rate := native()) > gemv:
            gemv, plan = rate, f"native step's product (the plan: {plan})"
        return cls(machine.cpu(), machine.raise_peak(cpu, torch.float32, peak), gemv, plan)

    def best(self, other: Machine) -> Machine:
        """The better of two samples of each limit: a busy moment only ever lowers one."""
        return dataclasses.replace(
            self,
            peak_flops=max(self.peak_flops, other.peak_flops),
            gemv_bytes_per_s=max(self.gemv_bytes_per_s, other.gemv_bytes_per_s),
        )

    def header(self) -> str:
        return (
            f"machine: {self.cpu.describe()}; fp32 matmul peak {self.peak_flops / 1e9:.0f} "
            f"GFLOP/s, GEMV {self.gemv_bytes_per_s / 1e9:.1f} GB/s ({self.plan}), measured "
            f"in this run; load average {os.getloadavg()[0]:.1f} (other work on the machine)"
        )

    def to_json(self) -> dict:
        return {
            "cpu": self.cpu.model,
            "simd": list(self.cpu.flags),
            "cores": self.cpu.cores,
            "threads": self.cpu.threads,
            "peak_flops": self.peak_flops,
            "gemv_bytes_per_s": self.gemv_bytes_per_s,
            "decode_plan": self.plan,
        }


def gemv_sampler() -> Callable[[], float]:
    """The GEMV bound sampled whenever a benchmark wants (between rounds, say): the better of
    the decode plan's rate (cpu_plan.gemv_sampler) and the native step's (cpu_step)."""
    rows = cpu_plan.block_matrices(768)  # one copy (~256 MB) for both samplers
    samplers = [cpu_plan.gemv_sampler(rows=rows), cpu_step.gemv_sampler(weights=rows)]
    return lambda: max(sample() for sample in samplers if sample is not None)


def decode_bounds(model, prompt: int, limits: Machine) -> dict[str, float]:
    """fp32 upper bounds for `model` on this machine, in tokens/s. Decoding reads every weight
    once per token (GEMV bandwidth); a prompt token costs 2 FLOPs per weight it multiplies
    (not the embedding: the head runs for the last token only) plus attention over the
    prompt, causal so half of it (the matmul peak)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    attention = 4 * model.config.n_layer * model.config.n_embd * prompt // 2
    flops = 2 * model.num_params(exclude_embeddings=True) + attention
    return {
        "decode_bound": limits.gemv_bytes_per_s / weight_bytes,
        "prompt_bound": limits.peak_flops / flops,
        "weight_bytes": weight_bytes,
        "prompt_flops": flops,
    }


def print_bounds(name: str, rate: dict[str, float], bounds: dict, limits: Machine) -> None:
    print(
        f"fp32 bounds here: decode {bounds['decode_bound']:.0f} tok/s "
        f"({bounds['weight_bytes'] / 1e6:.0f} MB per token at "
        f"{limits.gemv_bytes_per_s / 1e9:.1f} GB/s GEMV), prompt {bounds['prompt_bound']:.0f} "
        f"tok/s ({bounds['prompt_flops'] / 1e9:.2f} GFLOP per token at "
        f"{limits.peak_flops / 1e9:.0f} GFLOP/s); {name} reaches "
        f"{rate['decode'] / bounds['decode_bound']:.0%} and "
        f"{rate['prompt'] / bounds['prompt_bound']:.0%}"
    )


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gptkit_peer(model, prompt: list[int], new: int) -> Peer:
    """A gptkit GPT: one prompt forward pass; `generate` for the greedy decode."""
    from gptkit.generation import SampleConfig, generate

    ids = torch.tensor([prompt])
    sample = SampleConfig(temperature=0, max_new_tokens=new)

    def prefill():
        with torch.inference_mode():
            model(ids, last_only=True)

    def decode():
        generate(model, [prompt], sample)

    return prefill, decode


def transformers_peer(model, prompt: list[int], new: int) -> Peer:
    """A transformers causal LM: one prompt forward pass; `generate` for the greedy decode."""
    ids = torch.tensor([prompt])

    def prefill():
        with torch.inference_mode():
            model(ids, logits_to_keep=1)  # as generate does: logits for the last token only

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


def race(
    title: str,
    peers: dict[str, Peer],
    args: argparse.Namespace,
    between: Callable[[], object] | None = None,
) -> dict[str, dict]:
    """Warm every peer up, time them round-robin, print medians and gptkit/peer ratios, and
    return {peer: {"prompt": tok/s, "decode": tok/s}}.

    The first peer is gptkit. `between` is called after each round (a bound sampled under
    the same load as the peers).
    """
    times = {name: {"prompt": [], "decode": []} for name in peers}
    if not getattr(args, "smoke", False):  # a smoke's one round runs every peer anyway
        for prefill, decode in peers.values():
            prefill(), decode()
    for _ in range(args.rounds):
        for name, (prefill, decode) in peers.items():
            pre = seconds(prefill)
            start = time.perf_counter()
            measured = decode()
            total = time.perf_counter() - start
            times[name]["prompt"].append(pre)
            times[name]["decode"].append(measured if measured is not None else total - pre)
        if between is not None:
            between()
    rate = {
        name: {
            "prompt": args.prompt / statistics.median(t["prompt"]),
            "decode": args.new / statistics.median(t["decode"]),
        }
        for name, t in times.items()
    }
    ours = next(iter(rate.values()))
    print(
        f"{title}: prompt {args.prompt}, decode {args.new} greedy, batch 1, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, medians of {args.rounds}"
    )
    print(
        f"{'peer':<20} {'prompt tok/s':>13} {'decode tok/s':>13} "
        f"{'gptkit/peer prompt':>19} {'gptkit/peer decode':>19}"
    )
    for name, r in rate.items():
        print(
            f"{name:<20} {r['prompt']:>13.1f} {r['decode']:>13.1f} "
            f"{ours['prompt'] / r['prompt']:>18.2f}x {ours['decode'] / r['decode']:>18.2f}x"
        )
    return rate
