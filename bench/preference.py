"""Preference tuning on real pairs: a reward model and DPO for SmolLM2-135M-Instruct with LoRA,
in English and in Chinese (docs/RESULTS.md, "Preference tuning").

For each language, a seeded split of ../shared/data/preference/dpo_{en,zh}_demo.json (270 pairs
to train on, 30 held out), then, on the held-out pairs:

  longer   the baseline: the longer reply is the chosen one
  before   the untouched model's own preference: its mean log-probability per reply token
  reward   `gptkit finetune reward ...`: how often the reward model ranks the chosen reply first
  dpo      `gptkit finetune dpo ...`: how often the policy's implicit reward beta log(pi/pi_ref)
           ranks it first (pi_ref: the untouched model), its mean per-token KL to the
           reference, and its own mean-log-prob preference (comparable with "before")

and a few held-out prompts answered greedily by the untouched model and by the DPO policy.
Every training and scoring step is the documented command, run as a subprocess.

    .venv/bin/python bench/preference.py [--steps 32] [--lang en,zh] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gptkit import machine  # noqa: E402
from gptkit.api import load  # noqa: E402
from gptkit.chat_template import chat_prompt  # noqa: E402
from gptkit.preference_data import read_pairs  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "preference"
MODEL = "smollm2-135m-instruct"


def gptkit(*args: str) -> str:
    """Run `gptkit ARGS`, echoing the command and its time; its stdout."""
    print("$ gptkit " + shlex.join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:])
        raise SystemExit(f"failed with status {done.returncode}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout


def split(lang: str, out: Path, smoke: bool) -> tuple[Path, Path]:
    """train.json / val.json: a seeded 10% of the pairs held out (as finetune's own
    val_fraction would), written out so that eval reads exactly the held-out pairs."""
    records = json.loads((DATA / f"dpo_{lang}_demo.json").read_text(encoding="utf-8"))
    order = np.random.default_rng(0).permutation(len(records))
    n_val = round(0.1 * len(records))
    val, train = [records[i] for i in order[:n_val]], [records[i] for i in order[n_val:]]
    if smoke:
        val, train = val[:2], train[:8]
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.json", out / "val.json"
    for path, rows in zip(paths, (train, val), strict=True):
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return paths


def score(model: str, val: Path, out: Path, *extra: str) -> dict:
    gptkit("eval", "preference", "--model", model, "--data", str(val), "--out", str(out), *extra)
    return json.loads(out.read_text())


def answers(model: str, prompts: list[list[dict[str, str]]], tokens: int) -> list[str]:
    lm = load(model, device="cpu")
    texts = [chat_prompt(lm.tokenizer, p) for p in prompts]
    return lm.generate(texts, max_new_tokens=tokens, temperature=0.0, skip_special=True)


def run(lang: str, args: argparse.Namespace) -> dict[str, dict]:
    out = args.out / lang
    train, val = split(lang, out, args.smoke)
    # smoke: 1 step of 2 pairs (a batch still pads), 64 tokens
    steps, batch, length = (
        ("1", "2", "64") if args.smoke else (str(args.steps), "4", str(args.max_length))
    )
    common = ["--model", MODEL, "--data", str(train), f"val_data={val}", "peft.method=lora"]
    common += ["peft.r=16", "peft.alpha=32", f"batch_size={batch}", f"max_steps={steps}"]
    common += [f"max_length={length}", "eval_every=0", "progress=false"]
    held_out = read_pairs(str(val))
    longer = [len(p.chosen) > len(p.rejected) for p in held_out]  # the baseline to beat
    results = {
        "longer reply": {"n": len(longer), "accuracy": float(np.mean(longer)), "margin": 0.0}
    }
    results["before"] = score(MODEL, val, out / "before.json", "--max-length", length)
    gptkit("finetune", "reward", *common, "lr=5e-4", f"out_dir={out / 'reward'}", "--overwrite")
    results["reward"] = score(
        str(out / "reward" / "checkpoint"), val, out / "reward.json", "--max-length", length
    )
    gptkit(
        "finetune", "dpo", *common, "lr=5e-4", "beta=0.1", f"out_dir={out / 'dpo'}", "--overwrite"
    )
    policy = str(out / "dpo" / "checkpoint")
    results["dpo"] = score(policy, val, out / "dpo.json", "--ref", MODEL, "--max-length", length)
    if not args.smoke:  # the smoke's "before" runs this scoring (and "dpo" loads this policy)
        own = score(policy, val, out / "dpo-own.json", "--max-length", length)
        results["dpo, own log-prob"] = own
    prompts = [p.prompt for p in held_out[: 1 if args.smoke else 3]]
    tokens = 8 if args.smoke else 64
    before, after = answers(MODEL, prompts, tokens), answers(policy, prompts, tokens)
    for prompt, b, a in zip(prompts, before, after, strict=True):
        print(f"\n[{lang}] user: {prompt[-1]['content'][:200]!r}")
        print(f"  untouched: {b!r}\n  dpo:       {a!r}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="training steps of 4 pairs")
    parser.add_argument("--max-length", type=int, default=256, help="prompt + reply tokens")
    parser.add_argument("--lang", default="en,zh", help="en, zh or both")
    parser.add_argument(
        "--smoke", action="store_true", help="a few pairs, 1 step of 2, one DPO scoring (tests)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "preference")
    args = parser.parse_args()
    args.out = args.out.resolve()
    print(f"machine: {machine.cpu().describe()}", flush=True)
    table = {lang: run(lang, args) for lang in args.lang.split(",")}
    print("\n| pairs | scored by | held-out accuracy | margin | KL/token |\n|---|---|---|---|---|")
    for lang, results in table.items():
        for name, r in results.items():
            kl = f"{r['kl_per_token']:.3f}" if "kl_per_token" in r else ""
            scorer = f"{name}: {r['score']}" if "score" in r else name
            accuracy = f"{100 * r['accuracy']:.1f}"
            print(f"| {lang} ({r['n']}) | {scorer} | {accuracy} | {r['margin']:.3f} | {kl} |")
    (args.out / "results.json").write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
