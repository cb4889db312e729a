"""GPT-2 124M fp32 on this machine: prompt processing and greedy decoding, gptkit vs transformers.

Both run the same random weights (transformers builds them; gptkit loads the saved directory
with `gptkit.load`, as a user would) in the same process. Bounds as in decode_smollm2.py: from
this machine's measured matmul peak and GEMV bandwidth.

    .venv/bin/python bench/decode_gpt2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from common import (
    Machine,
    decode_bounds,
    gptkit_peer,
    parse_args,
    print_bounds,
    race,
    transformers_peer,
    write_json,
)

import gptkit


def main() -> None:
    args = parse_args(__doc__)
    limits = Machine.measure(args.smoke)  # first: gptkit.load takes the decode plan it finds
    print(limits.header(), flush=True)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as directory:
        ref.save_pretrained(directory)
        gptkit.load_tokenizer("gpt2").save(directory)
        ours = gptkit.load(directory, device="cpu").model
    prompt = torch.randint(0, 50257, (args.prompt,)).tolist()
    peers = {
        "gptkit fp32": gptkit_peer(ours, prompt, args.new),
        "transformers fp32": transformers_peer(ref, prompt, args.new),
    }
    rate = race("GPT-2 124M", peers, args)
    if not args.smoke:  # the better of two samples; a smoke's one is enough
        limits = limits.best(Machine.measure())
    bounds = decode_bounds(ours, args.prompt, limits)
    print_bounds("gptkit fp32", rate["gptkit fp32"], bounds, limits)
    write_json(args, {"rate": rate, **bounds, "machine": limits.to_json()})


if __name__ == "__main__":
    main()
