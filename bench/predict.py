"""Classifier throughput: `gptkit predict`'s path (lm.classify) vs transformers'
`pipeline("text-classification")`, on the same weights, in the same process.

The classifier: SmolLM2-135M-Instruct with a 2-label classify head and a LoRA (r=16, random
B so that merging changes the weights), merged (peft.merge_peft) and saved as a gptkit
checkpoint; the peer loads that checkpoint exported by `gptkit convert CKPT OUT --to hf`
(LlamaForSequenceClassification). Inputs: the first --texts sentences of SST-2's test split
(../shared/data/sst2; about 25 tokens each), each given its EOS as gptkit appends it, batch
32 for both. Both give the same labels (checked; the largest probability difference is
printed). gptkit runs as `gptkit predict` loads it: fp32, length-sorted batches, no
attention mask (causal attention keeps right padding from reaching the text).

`gptkit predict --quantize int8` (int8 weights) and `--dtype bfloat16` (bfloat16 matmuls under
autocast) run too, their labels compared the same way; so does the pipeline under the same
autocast, the same-precision peer of the bfloat16 run.
Medians of --rounds, the peers interleaved after a warm-up; target: gptkit >= 1.5x the
pipeline's texts/s. The output starts with the machine (CPU, SIMD flags, cores; load).

    .venv/bin/python bench/predict.py [--texts 256] [--rounds 3] [--smoke] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gptkit  # noqa: E402
from gptkit import machine, precision  # noqa: E402
from gptkit.checkpoint import save_checkpoint  # noqa: E402
from gptkit.loading import load_pretrained  # noqa: E402
from gptkit.peft import apply_peft, merge_peft  # noqa: E402
from gptkit.surgery import set_head  # noqa: E402
from gptkit.train_config import PeftConfig  # noqa: E402

SST2 = ROOT.parent / "shared" / "data" / "sst2" / "stsa.binary.test"
BATCH = 32


def make_classifier(out: Path) -> Path:
    """SmolLM2 + classify head + LoRA (random B), merged, saved as a gptkit checkpoint."""
    torch.manual_seed(0)
    lm = load_pretrained("smollm2-135m-instruct", "cpu")
    set_head(lm.model, "classify", ["negative", "positive"])
    apply_peft(lm.model, PeftConfig(method="lora", r=16, alpha=32))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    save_checkpoint(out, merge_peft(lm.model).eval(), lm.tokenizer)
    return out


def as_ours(entries: list[dict]) -> dict:
    """A pipeline answer ([{label, score}] for every label) as lm.classify gives it."""
    return {
        "label": max(entries, key=lambda e: e["score"])["label"],
        "probs": {e["label"]: e["score"] for e in entries},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="16 texts, 1 round, no warm-up (tests)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.rounds = 16, 1
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    texts = [line.split(" ", 1)[1].strip() for line in SST2.read_text().splitlines()]
    texts = texts[: args.texts]
    load = os.getloadavg()[0]
    print(f"machine: {machine.cpu().describe()}; load {load:.1f}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_classifier(Path(tmp) / "cls")
        exported = Path(tmp) / "hf"
        convert = [sys.executable, "-m", "gptkit", "convert", str(checkpoint), str(exported)]
        subprocess.run([*convert, "--to", "hf"], check=True, capture_output=True)
        ours = gptkit.load(checkpoint, device="cpu")
        int8 = gptkit.load(checkpoint, device="cpu", quantize="int8")  # predict --quantize int8
        eos = ours.tokenizer.eos_token
        hf_tok = AutoTokenizer.from_pretrained(exported)
        hf_model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
        hf_tok.pad_token_id = hf_model.config.pad_token_id  # padding read as "not the text"
        theirs = pipeline(
            "text-classification", model=hf_model, tokenizer=hf_tok, device="cpu", top_k=None
        )
        with_eos = [t + eos for t in texts]  # the position gptkit reads the class at

        def run_ours():
            return ours.classify(texts, batch_size=BATCH)

        def run_int8():
            return int8.classify(texts, batch_size=BATCH)

        def run_bf16():
            with precision.compute("bfloat16", "cpu"):  # predict --dtype bfloat16
                return ours.classify(texts, batch_size=BATCH)

        def run_theirs(dtype: torch.dtype = torch.float32):
            with torch.inference_mode(), torch.autocast("cpu", dtype, dtype != torch.float32):
                return theirs(with_eos, batch_size=BATCH)

        runs = {
            "gptkit": run_ours,
            "gptkit int8": run_int8,
            "gptkit bf16": run_bf16,
            "transformers": run_theirs,
            "transformers bf16": lambda: run_theirs(torch.bfloat16),
        }
        found: dict[str, list] = {}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up, and the agreement check
            start = time.perf_counter()
            found[name] = run()
            if args.smoke:  # a smoke's one round is its warm-up: a check, not a measurement
                times[name].append(time.perf_counter() - start)
        peer = [{e["label"]: e["score"] for e in p} for p in found["transformers"]]
        agree, diff = {}, {}
        for name in ("gptkit", "gptkit int8", "gptkit bf16", "transformers bf16"):
            pairs = list(zip(found[name], peer, strict=True))
            if name == "transformers bf16":  # the pipeline's shape: as gptkit's answers
                pairs = [(as_ours(m), p) for m, p in pairs]
            agree[name] = sum(m["label"] == max(p, key=p.get) for m, p in pairs)
            diff[name] = max(abs(m["probs"][k] - v) for m, p in pairs for k, v in p.items())
        for _ in range(0 if args.smoke else args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    ratio = {name: r / rate["transformers"] for name, r in rate.items()}
    print(f"{len(texts)} SST-2 test sentences, batch {BATCH}, {args.rounds} rounds (medians)")
    print("| peer | texts/s | / transformers | labels as transformers | max prob. diff |")
    print("|---|---|---|---|---|")
    for name, r in rate.items():
        same = f"{agree[name]}/{len(texts)} | {diff[name]:.1e}" if name in agree else "- | -"
        print(f"| {name} | {r:.1f} | {ratio[name]:.2f}x | {same} |")
    print(f"gptkit fp32 / transformers: {ratio['gptkit']:.2f}x (target >= 1.5x)")
    bf16 = rate["gptkit bf16"] / rate["transformers bf16"]
    print(f"gptkit bf16 / transformers bf16: {bf16:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"texts_per_s": rate, "ratio": ratio, "agree": agree}))


if __name__ == "__main__":
    main()
