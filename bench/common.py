"""What the decode benchmarks share: flags, and a race of peers timed in the same process.

A peer is a pair of callables on the same prompt: `prefill()` runs the prompt through the model
once, `decode()` generates the new tokens greedily after it. `decode` returns the seconds it
spent decoding when it can measure them itself; otherwise its time minus a prefill's counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

Peer = tuple[Callable[[], object], Callable[[], float | None]]


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    return parser.parse_args()


def write_json(args: argparse.Namespace, results: dict) -> None:
    """The numbers `python -m bench` puts in its targets table."""
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gptkit_peer(model, prompt: list[int], new: int) -> Peer:
    """A gptkit GPT: one prompt forward pass; `generate` for the greedy decode."""
    from gptkit.config import SampleConfig
    from gptkit.generate import generate

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


def race(title: str, peers: dict[str, Peer], args: argparse.Namespace) -> dict[str, dict]:
    """Warm every peer up, time them round-robin, print medians and gptkit/peer ratios, and
    return {peer: {"prompt": tok/s, "decode": tok/s}}.

    The first peer is gptkit.
    """
    times = {name: {"prompt": [], "decode": []} for name in peers}
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
