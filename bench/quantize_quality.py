"""What `--quantize int8` costs in quality: SmolLM2-135M-Instruct's perplexity on held-out text
(the last 10% of tinyshakespeare, nanoGPT's val split), fp32 next to int8, same windows.

    .venv/bin/python bench/quantize_quality.py [--tokens 8000] [--window 512]

Perplexity uses sliding windows of `--window` tokens, stride half of it (gptkit.evaluate).
Prompts of many rows take Int8Linear's per-row-scaled path; decoding steps the one-row path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import gptkit
from gptkit.evaluate import perplexity

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
NAME = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8000, help="held-out tokens scored")
    parser.add_argument("--window", type=int, default=512, help="tokens of context per window")
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    if not TEXT.exists():
        raise SystemExit(f"{TEXT} is missing: this benchmark reads ../shared/data")
    text = TEXT.read_text(encoding="utf-8")
    rows = {}
    for quantize in (None, "int8"):
        lm = gptkit.load(NAME, device="cpu", quantize=quantize)
        ids = lm.tokenizer.encode(text[int(len(text) * 0.9) :])[: args.tokens]
        lm.model.config = dataclasses.replace(lm.model.config, block_size=args.window)
        start = time.perf_counter()
        result = perplexity(lm.model, ids, stride=args.window // 2)
        name = quantize or "fp32"
        rows[name] = {**result, "seconds": time.perf_counter() - start}
    fp32 = rows["fp32"]["perplexity"]
    print(
        f"SmolLM2-135M-Instruct perplexity, tinyshakespeare val split, {args.tokens} tokens, "
        f"windows of {args.window}, stride {args.window // 2}"
    )
    print(f"{'weights':<8} {'perplexity':>11} {'vs fp32':>8} {'seconds':>8}")
    for name, r in rows.items():
        print(
            f"{name:<8} {r['perplexity']:>11.2f} {r['perplexity'] / fp32 - 1:>+8.1%} "
            f"{r['seconds']:>8.1f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
