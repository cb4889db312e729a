"""Speculative decoding on SmolLM2-135M-Instruct: greedy tokens/s, plain vs prompt lookup.

Two real prompts in SmolLM2's chat template, built from SQuAD v1.1 dev (Wikipedia paragraphs,
../shared/data/squad-dev):
- summarise: the longest paragraph of the "Steam_engine" article, to summarise;
- rag: a question on the "Black_Death" article with its first three paragraphs as the
  retrieved context (the second holds the answer), to answer by quoting. The question is the
  second paragraph's first "How" question, which SmolLM2 answers at length: a reply of a few
  tokens would time the prompt, not the decoding (most get "The answer to this question is:").

Each is decoded greedily (up to --new tokens, batch 1) plainly and with prompt lookup at
each --k (guesses per pass); a round times each once, round-robin, and the table gives medians
of --rounds. Two rates: "call" is new tokens over the whole call's wall time, prompt processing
included, as a user waits for it; "decode" leaves the prompt out (it is the same pass with and
without speculation): the new tokens after the first over the call's time less the time of a
1-token call. Speculation must not change a token: the bench fails if the greedy outputs
differ.

    .venv/bin/python bench/speculative.py [--new 128] [--k 2 4 8] [--rounds 3] [--threads N]
        [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import gptkit
from gptkit import cpu_plan, machine
from gptkit.chat_template import chat_prompt

NAME = "smollm2-135m-instruct"
SQUAD = Path(__file__).resolve().parents[2] / "shared/data/squad-dev/squaddev_v1.1.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=128, help="new tokens at most")
    parser.add_argument(
        "--k", type=int, nargs="+", help="prompt lookup's guesses per pass (default: 2 3 4 8)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); 1 is steadier while other work shares the cores",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="8 new tokens, k=3, one round, no warm-up: a check"
    )
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    if args.smoke:
        # one k: every k runs the same lookup code (tests/test_speculative.py checks several
        # k token for token); each call prefills a prompt of hundreds of tokens
        args.new, args.rounds, args.k = 8, 1, args.k or [3]
    args.k = args.k or [2, 3, 4, 8]
    return args


def header() -> str:
    """The machine, with the CPU model as lscpu names it, how busy it is, and its decode plan:
    a pass over up to max_split_rows tokens streams the weights as one token's does."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line]
    load = os.getloadavg()[0]
    plan = cpu_plan.decode_plan()
    return (
        f"machine: {machine.cpu().describe()}; lscpu model name: {names[0] if names else '?'}; "
        f"load average {load:.1f} (other work on the machine shares the cores); decode plan "
        f"{plan.name}, split up to {plan.max_split_rows} rows"
    )


def prompts(tokenizer) -> dict[str, str]:
    """{name: prompt in the chat template}: the summary and the RAG prompt."""
    if not SQUAD.exists():
        raise SystemExit(f"{SQUAD} is missing: this benchmark reads ../shared/data")
    articles = {a["title"]: a for a in json.loads(SQUAD.read_text())["data"]}
    text = max(articles["Steam_engine"]["paragraphs"], key=lambda p: len(p["context"]))["context"]
    summarise = f"Summarise the following text in a few sentences.\n\n{text}"
    plague = articles["Black_Death"]["paragraphs"]
    question = next(qa["question"] for qa in plague[1]["qas"] if qa["question"].startswith("How"))
    passages = "\n\n".join(f"Passage {i + 1}: {plague[i]['context']}" for i in range(3))
    rag = (
        "Answer the question using the passages below. Quote the sentences that answer it "
        f"word for word, then explain them.\n\n{passages}\n\nQuestion: {question}"
    )
    return {
        name: chat_prompt(tokenizer, [{"role": "user", "content": content}])
        for name, content in (("summarise", summarise), ("rag", rag))
    }


def race(lm, prompt: str, args: argparse.Namespace) -> dict:
    """Plain vs prompt lookup at each k on one prompt: tokens/s (medians), speedups and
    acceptance; the greedy tokens must be identical."""
    options = dict(temperature=0, max_new_tokens=args.new)
    runs = {
        "prompt": {**options, "max_new_tokens": 1},  # the prompt's pass and one token
        "plain": options,
        **{k: {**options, "prompt_lookup": k} for k in args.k},
    }
    if not args.smoke:  # the smoke's one round is a check: it runs every path anyway
        for run in runs.values():  # warm up every path (allocations, the decode plan)
            lm.complete(prompt, **run)
    times: dict = {name: [] for name in runs}
    last = {}  # each run's completion (the same every round: greedy is deterministic)
    for _ in range(args.rounds):  # round-robin, so a busy moment slows every run alike
        for name, run in runs.items():
            start = time.perf_counter()
            last[name] = lm.complete(prompt, **run)[0]
            times[name].append(time.perf_counter() - start)
            if name != "prompt" and last[name].ids != last["plain"].ids:
                raise SystemExit(f"prompt lookup (k={name}) changed the greedy output: a bug")
    new = len(last["plain"].ids)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    prompt_seconds = seconds.pop("prompt")
    rate = {name: new / s for name, s in seconds.items()}
    decode = {name: (new - 1) / (s - prompt_seconds) for name, s in seconds.items()}
    lookup = {
        k: {
            "rate": rate[k],
            "speedup": rate[k] / rate["plain"],
            "decode_rate": decode[k],
            "decode_speedup": decode[k] / decode["plain"],
            "acceptance": last[k].stats.acceptance,
            "tokens_per_pass": last[k].stats.tokens_per_pass,
        }
        for k in args.k
    }
    return {
        "prompt_tokens": len(lm.prompt_ids(prompt)),
        "new_tokens": new,
        "prompt_seconds": prompt_seconds,
        "plain": rate["plain"],
        "plain_decode": decode["plain"],
        "lookup": lookup,
        "reply": last["plain"].text,
    }


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(header(), flush=True)
    lm = gptkit.load(NAME, device="cpu")
    results = {name: race(lm, prompt, args) for name, prompt in prompts(lm.tokenizer).items()}
    print(
        f"SmolLM2-135M-Instruct fp32, greedy, up to {args.new} new tokens, batch 1, "
        f"{torch.get_num_threads()} threads, medians of {args.rounds}; tokens/s: call = new tokens "
        "/ the call's wall time, decode = the same less the prompt's pass"
    )
    print(
        f"{'prompt':<10} {'prompt tok':>10} {'prompt s':>8} {'k':>3} {'plain call':>10} "
        f"{'lookup call':>11} {'speedup':>8} {'plain decode':>12} {'lookup decode':>13} "
        f"{'speedup':>8} {'accepted':>9} {'tok/pass':>9}"
    )
    for name, r in results.items():
        for k, x in r["lookup"].items():
            print(
                f"{name:<10} {r['prompt_tokens']:>10} {r['prompt_seconds']:>8.2f} {k:>3} "
                f"{r['plain']:>10.1f} {x['rate']:>11.1f} {x['speedup']:>7.2f}x "
                f"{r['plain_decode']:>12.1f} {x['decode_rate']:>13.1f} "
                f"{x['decode_speedup']:>7.2f}x {x['acceptance']:>9.0%} {x['tokens_per_pass']:>9.2f}"
            )
    counts = ", ".join(f"{name} {r['new_tokens']}" for name, r in results.items())
    print(f"new tokens: {counts}")
    print("greedy outputs token-identical: yes (checked every round)")
    for name, r in results.items():
        print(f"{name} reply: {r['reply'][:200]!r}")
    if args.json is not None:
        summary = {"header": header(), "new": args.new, "prompts": results}
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
