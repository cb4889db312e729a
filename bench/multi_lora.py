"""Many LoRA adapters in one batch vs the merged base model: SmolLM2-135M-Instruct, 4 requests.

What `gptkit serve --adapter NAME=DIR ...` costs over serving one merged model. Four random
LoRA adapters (r=16 on attn.qkv and attn.proj: q, k, v and o) on SmolLM2-135M-Instruct, fp32
and row-major as `gptkit serve` loads it for batching; 4 concurrent requests of 64 greedy
tokens (EOS banned, so every one makes all 64) through the serving engine, timed from
submission to the last token (prefill included):

- 4 adapters, one per request, all 4 in the same decoding steps: each linear layer runs
  the base matmul once for the batch, then each row's update gathered and batched
  (MultiLoRALinear: torch.bmm);
- the same, with the rows grouped by adapter instead (a pair of matmuls per adapter): the
  alternative MultiLoRALinear's docstring weighs, patched in here;
- the base model with one of the adapters merged into its weights (peft.merge_peft): what
  serving a single fine-tune costs, 4 requests in the same steps.

Medians of --rounds, the peers interleaved in each round after a warm-up one; target: the
batched adapters at >= 0.8x the merged model's tokens/s. The output starts with the machine
(lscpu's CPU model, SIMD flags, cores; fp32 matmul peak and GEMV bandwidth measured in this
run, skipped by --smoke).

    .venv/bin/python bench/multi_lora.py [--rounds 3] [--new 64] [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import Machine

import gptkit
from gptkit import machine
from gptkit.engine import Engine, Sequence
from gptkit.generation import SampleConfig
from gptkit.multi_lora import MultiLoRALinear, load_loras
from gptkit.peft import apply_peft, merge_peft, save_adapter
from gptkit.train_config import PeftConfig

NAME = "smollm2-135m-instruct"
ADAPTERS = 4
LORA = PeftConfig(method="lora", r=16, alpha=32.0, targets=["attn.qkv", "attn.proj"])
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue, for a ten-year-old.",
    "List three uses of a paperclip.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=64, help="greedy tokens per request")
    parser.add_argument("--smoke", action="store_true", help="4 tokens, 1 round, no warm-up")
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.new = 1, 4
    return args


def random_adapters(lm, directory: Path) -> list[Path]:
    """ADAPTERS random LoRA adapters on lm.model, saved; lm.model keeps the last one applied.
    Drawn at the scale of trained ones (B is zero only before training)."""
    apply_peft(lm.model, LORA)
    dirs = []
    for i in range(ADAPTERS):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in lm.model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        dirs.append(save_adapter(lm.model, directory / f"lora{i + 1}", base=NAME))
    return dirs


_groups: dict = {"rows": None, "groups": []}  # grouped_forward's groups for the rows now


def grouped_forward(layer: MultiLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """MultiLoRALinear.forward with the rows grouped by adapter instead: for each adapter in
    the batch, its rows' x through its own A and B, added back to those rows. The groups are
    found once per forward pass (every layer sees the same rows tensor)."""
    y = layer.base(x)  # [B, T, out]
    rows = layer.loras.rows
    if rows is None:
        return y
    if rows is not _groups["rows"]:
        groups = [(a, (rows == a).nonzero()[:, 0]) for a in rows.unique().tolist() if a]
        _groups.update(rows=rows, groups=groups)
    for a, index in _groups["groups"]:
        h = x.index_select(0, index) @ layer.lora_A[a]  # [b, T, in] @ [in, r] -> [b, T, r]
        y.index_add_(0, index, h @ layer.lora_B[a])  # [b, T, out] (lora_B holds alpha / r)
    return y


def timed_batch(engine: Engine, adapters: list[int], new: int) -> float:
    """Seconds for the engine to generate `new` tokens for each of 4 requests submitted at
    once (request i uses adapters[i])."""
    tok = engine.lm.tokenizer
    done = threading.Semaphore(0)
    sample = SampleConfig(max_new_tokens=new, temperature=0, logit_bias={tok.eos_id: -100.0})

    def emit(event):
        if event[0] in ("done", "error"):
            assert event[0] == "done", event
            done.release()

    start = time.perf_counter()
    for prompt, adapter in zip(PROMPTS, adapters, strict=True):
        engine.submit(Sequence(tok.encode(prompt), sample, emit, adapter=adapter))
    for _ in PROMPTS:
        done.acquire()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.smoke:
        print(f"machine: {machine.cpu().describe()} (--smoke: limits not measured)", flush=True)
        limits = None
    else:
        limits = Machine.measure()
        print(limits.header(), flush=True)
    with tempfile.TemporaryDirectory(prefix="multi-lora-") as tmp:
        merged = gptkit.load(NAME, device="cpu", decode_layout=False)
        dirs = random_adapters(merged, Path(tmp))
        merge_peft(merged.model)  # the last adapter, folded into the weights
        multi = gptkit.load(NAME, device="cpu", decode_layout=False)
        load_loras(multi.model, {d.name: d for d in dirs})
    engines = {
        "4 adapters, one per row (bmm)": Engine(multi, max_batch=ADAPTERS),
        "4 adapters, rows grouped": Engine(multi, max_batch=ADAPTERS),
        "merged base (1 adapter)": Engine(merged, max_batch=ADAPTERS),
    }
    one_each = list(range(1, ADAPTERS + 1))
    plans = {name: one_each for name in list(engines)[:2]} | {"merged base (1 adapter)": [0] * 4}
    bmm = MultiLoRALinear.forward
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.start()
    try:
        for round in range(args.rounds + (0 if args.smoke else 1)):  # round 0: warm-up
            for name, engine in engines.items():
                MultiLoRALinear.forward = grouped_forward if "grouped" in name else bmm
                seconds = timed_batch(engine, plans[name], args.new)
                if round or args.smoke:
                    times[name].append(seconds)
    finally:
        MultiLoRALinear.forward = bmm
        for engine in engines.values():
            engine.close()
    tokens = ADAPTERS * args.new
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    base = rate["merged base (1 adapter)"]
    print(
        f"SmolLM2-135M-Instruct fp32, {ADAPTERS} LoRA adapters r={LORA.r} on "
        f"{', '.join(LORA.targets)}; {ADAPTERS} requests x {args.new} greedy tokens in one "
        f"batch, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"medians of {args.rounds}"
    )
    print(f"{'peer':<32} {'tok/s':>7} {'rows/step':>9} {'vs merged':>9}")
    for name, engine in engines.items():
        print(
            f"{name:<32} {rate[name]:>7.1f} {engine.stats.max_batch:>9} {rate[name] / base:>8.2f}x"
        )
    ratio = rate["4 adapters, one per row (bmm)"] / base
    verdict = "met" if ratio >= 0.8 else "NOT MET"
    print(f"target: 4 adapters in one batch >= 0.8x the merged model's tokens/s: {verdict}")
    if args.json is not None:
        results = {"rate": rate, "ratio": ratio, "new": args.new, "rounds": args.rounds}
        if limits is not None:
            results["machine"] = limits.to_json()
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
