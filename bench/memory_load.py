"""Peak memory of loading SmolLM2-135M-Instruct and generating with it, against its weights.

Each case runs in a fresh process that records its resident memory after `import gptkit`
(torch alone is ~230 MB), its peak (VmHWM) after loading, and after generating 32 tokens,
beside the weights it holds (int8 rows and their scales for an int8 layer). Three cases:
fp32; int8 quantized as it loads (`--quantize int8`: the fp32 weights first); and an
int8 checkpoint saved by `gptkit convert smollm2-135m-instruct DIR --quantize int8`, which
loads already quantized.

    .venv/bin/python bench/memory_load.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, gptkit
def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
start = mb("VmRSS")
lm = gptkit.load(sys.argv[1], device="cpu", quantize=sys.argv[2] or None)
loaded = mb("VmHWM")
lm.generate("The capital of France is", max_new_tokens=32, temperature=0)
peak = mb("VmHWM")  # before the sizes below: an int8 layer's state dict unpacks its rows
fp32 = sum(p.numel() * 4 for p in lm.model.parameters()) / 2**20 if not sys.argv[2] else None
# the weights as held: an int8 layer's saved tensors are its int8 rows and their scales
tensors = {t.data_ptr(): t for t in lm.model.state_dict().values()}.values()  # tied: once
own = sum(t.numel() * t.element_size() for t in tensors) / 2**20
# and the copies packed for oneDNN that decoding made (cpu.DecodeLinear), held beside them
own += sum(m.weight.numel() * 4 for m in lm.model.modules()
           if getattr(m, "_packed", None) is not None) / 2**20
print(json.dumps({"start": start, "load_peak": loaded, "peak": peak, "fp32_mb": fp32,
                  "own_mb": own}))
"""


def measure(model: str, quantize: str = "") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, quantize], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here (python -m bench)")
    args = parser.parse_args()
    name = "smollm2-135m-instruct"
    with tempfile.TemporaryDirectory() as tmp:
        saved = str(Path(tmp) / "int8")
        convert = [sys.executable, "-m", "gptkit", "convert", name, saved, "--quantize", "int8"]
        subprocess.run(convert, capture_output=True, check=True)
        rows = {
            "fp32": measure(name),
            "int8": measure(name, "int8"),
            "int8 saved": measure(saved),
        }
    weights = rows["fp32"]["fp32_mb"]
    print(f"SmolLM2-135M-Instruct, fp32 weights {weights:.0f} MiB; MiB of resident memory")
    print(
        f"{'weights':<10} {'held MiB':>9} {'after import':>13} {'load peak':>10} {'peak':>7} "
        f"{'peak - import':>14} {'/ fp32':>7} {'load / held':>12}"
    )
    for name, r in rows.items():
        grown = r["peak"] - r["start"]
        load = (r["load_peak"] - r["start"]) / r["own_mb"]
        print(
            f"{name:<10} {r['own_mb']:>9.0f} {r['start']:>13.0f} {r['load_peak']:>10.0f} "
            f"{r['peak']:>7.0f} {grown:>14.0f} {grown / weights:>6.2f}x {load:>11.2f}x"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"weights_mb": weights, **rows}, indent=2))


if __name__ == "__main__":
    main()
