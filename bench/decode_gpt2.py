"""GPT-2 124M fp32 on this machine: prompt processing and greedy decoding, gptkit vs transformers.

Both run the same random weights (transformers builds them; gptkit loads the saved directory
with `gptkit.load`, as a user would) in the same process.

    .venv/bin/python bench/decode_gpt2.py [--prompt 256] [--new 128] [--rounds 3]
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from common import parse_args, race

import gptkit
from gptkit.config import SampleConfig
from gptkit.generate import generate


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as directory:
        ref.save_pretrained(directory)
        gptkit.load_tokenizer("gpt2").save(directory)
        ours = gptkit.load(directory, device="cpu").model
    ids = torch.randint(0, 50257, (1, args.prompt))
    sample = SampleConfig(temperature=0, max_new_tokens=args.new)

    def our_prefill():
        with torch.inference_mode():
            ours(ids, last_only=True)

    def our_decode():
        generate(ours, [ids[0].tolist()], sample)

    def ref_prefill():
        with torch.inference_mode():
            ref(ids)

    def ref_decode():
        ref.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            pad_token_id=0,
        )

    peers = {
        "gptkit fp32": (our_prefill, our_decode),
        "transformers fp32": (ref_prefill, ref_decode),
    }
    race("GPT-2 124M", peers, args)


if __name__ == "__main__":
    main()
