"""GPT-2 124M fp32 on this machine: prompt processing and greedy decoding, gptkit vs transformers.

Both run the same random weights (transformers builds them, gptkit loads its saved directory)
in the same process, alternating, and we report the median of several rounds.

    .venv/bin/python bench/decode_gpt2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from gptkit.config import SampleConfig
from gptkit.convert import load_hf
from gptkit.generate import generate


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as directory:
        ref.save_pretrained(directory)
        ours = load_hf(directory)
    prompt = torch.randint(0, 50257, (1, args.prompt))
    ones = torch.ones_like(prompt)

    def ref_prefill():
        with torch.inference_mode():
            ref(prompt)

    def our_prefill():
        with torch.inference_mode():
            ours(prompt, last_only=True)

    def ref_decode():
        ref.generate(
            prompt,
            attention_mask=ones,
            do_sample=False,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            pad_token_id=0,
        )

    sample = SampleConfig(temperature=0, max_new_tokens=args.new)

    def our_decode():
        generate(ours, [prompt[0].tolist()], sample)

    ref_decode(), our_decode()  # warm up both
    rows = {"prefill": [], "decode": []}
    for _ in range(args.rounds):
        rows["prefill"].append((timed(our_prefill), timed(ref_prefill)))
        # decode time = whole generation minus its prefill
        ours_t, ref_t = timed(our_decode), timed(ref_decode)
        rows["decode"].append((ours_t - rows["prefill"][-1][0], ref_t - rows["prefill"][-1][1]))

    print(
        f"GPT-2 124M fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(f"{'phase':<10} {'gptkit tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
    for phase, tokens in (("prefill", args.prompt), ("decode", args.new)):
        ours_s = statistics.median(t[0] for t in rows[phase])
        ref_s = statistics.median(t[1] for t in rows[phase])
        print(
            f"{phase:<10} {tokens / ours_s:>13.1f} {tokens / ref_s:>19.1f} {ref_s / ours_s:>6.2f}x"
        )


if __name__ == "__main__":
    main()
