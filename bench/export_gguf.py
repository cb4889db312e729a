"""gptkit -> GGUF: how long SmolLM2-135M-Instruct takes to export, and how fast llama.cpp then
decodes the exported files beside gptkit's own decode, in one process on this machine.

The model is SmolLM2 as gptkit reads it (its Q4_1 file dequantized to fp32), written with
`export_gguf` as f32, q8_0 and q4_0 (`gptkit convert smollm2-135m-instruct out.gguf --to gguf
--type T` does the same). Then `common.race` times a prompt pass and a greedy decode, batch 1,
for gptkit fp32 and int8 and for llama.cpp (2 threads) on each exported file and on the
original Q4_1 file.

    .venv/bin/python bench/export_gguf.py [--prompt 256] [--new 128] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from common import Machine, add_smoke, gptkit_peer, race, write_json
from decode_smollm2 import NAME, llama_cpp_peer

import gptkit
from gptkit.export_gguf import export_gguf

TYPES = ("f32", "q8_0", "q4_0")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="keep the exported files here")
    add_smoke(parser)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    print(Machine.measure(args.smoke).header(), flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="gptkit-export-"))

    lm = gptkit.load(NAME, device="cpu", decode_layout=False)
    exports = {}
    print(f"{'type':<6} {'export s':>9} {'MB':>7}")
    for kind in TYPES:
        start = time.perf_counter()
        path = export_gguf(lm.model, lm.tokenizer, out / f"smollm2-{kind}.gguf", kind)
        seconds = time.perf_counter() - start
        exports[kind] = {"seconds": seconds, "mb": path.stat().st_size / 1e6}
        print(f"{kind:<6} {seconds:>9.1f} {exports[kind]['mb']:>7.1f}", flush=True)
    del lm

    torch.manual_seed(0)
    prompt = torch.randint(100, 49000, (args.prompt,)).tolist()
    peers = {
        "gptkit fp32": gptkit_peer(gptkit.load(NAME, device="cpu").model, prompt, args.new),
        "gptkit int8": gptkit_peer(
            gptkit.load(NAME, device="cpu", quantize="int8").model, prompt, args.new
        ),
    }
    for kind in TYPES:
        peers[f"llama.cpp {kind} (ours)"] = llama_cpp_peer(
            prompt, args.new, out / f"smollm2-{kind}.gguf", args.smoke
        )
    peers["llama.cpp Q4_1 (orig)"] = llama_cpp_peer(prompt, args.new, smoke=args.smoke)
    rate = race("SmolLM2-135M-Instruct, exported", peers, args)
    write_json(args, {"export": exports, "rate": rate})
    if args.out is None:
        for kind in TYPES:
            (out / f"smollm2-{kind}.gguf").unlink()
        out.rmdir()


if __name__ == "__main__":
    sys.exit(main())
