"""Pretraining race on character-level tinyshakespeare, on CPU: gptkit vs karpathy/nanoGPT.

The peer is nanoGPT's own published CPU run (its README's "I only have a macbook" line: 4
layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after
100 warmup steps, beta2 0.99, no dropout), run unchanged as a subprocess of this script on the
same machine, with its data written in its own format (train.bin / val.bin / meta.pkl, the
first 90% of the characters for training) from the same input.txt. gptkit trains on the same
text through `gptkit.prepare` (its last 10% of tokens are the val split) with a recipe from
RECIPES below: "nanogpt-cpu" is nanoGPT's run knob for knob, "fast" is gptkit's own.

The goal is time-to-quality: val loss <= 1.886 (what nanoGPT's run ends at here) in at most
half of nanoGPT's wall time. The table gives tokens/s, ms/iter, MFU (FLOPs counted the same way
for both, against this machine's fp32 matmul peak measured in this process), final val loss
and wall time for both, with gptkit/nanoGPT ratios.

    .venv/bin/python bench/pretrain_shakespeare_char.py [--recipe fast] [--repeats 3]
        [--iters N]  (a short smoke run of both) [--only-nanogpt | --skip-nanogpt]
        [--nanogpt DIR]  (a nanoGPT checkout or git directory; default $NANOGPT_DIR, else
                          ../.mirror/karpathy+nanoGPT/repo from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptkit import machine

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_NANOGPT = ROOT.parent / ".mirror" / "karpathy+nanoGPT" / "repo"

# nanoGPT on the 2-core AMD EPYC, measured before (median of 3): the target to beat when this
# run skips nanoGPT. The quiet matmul peak is this machine's own (machine.peak_flops, cached).
REFERENCE = {"wall_s": 136.0, "ms_per_iter": 62.0, "val_loss": 1.886}

# nanoGPT's README CPU command, flag for flag (after `python train.py`).
NANOGPT_CONFIG = "config/train_shakespeare_char.py"
NANOGPT_FLAGS = {
    "device": "cpu",
    "compile": False,
    "eval_iters": 20,
    "log_interval": 1,
    "block_size": 64,
    "batch_size": 12,
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 128,
    "max_iters": 2000,
    "lr_decay_iters": 2000,
    "dropout": 0.0,
}


def nanogpt_recipe(flags: dict[str, Any]) -> dict[str, str]:
    """What nanoGPT trains with under `flags`, from its config file and train.py's defaults."""
    steps, warmup = flags["max_iters"], flags.get("warmup_iters", 100)
    every = flags.get("eval_interval", 250)
    return {
        "model": f"{flags['n_layer']} layers, {flags['n_head']} heads, n_embd {flags['n_embd']}, "
        f"block {flags['block_size']}, no bias, GELU, LayerNorm, tied head, "
        f"dropout {flags['dropout']}",
        "steps": f"iters 0..{steps} ({steps + 1} optimizer steps)",
        "batch": f"{flags['batch_size']} x {flags['block_size']} tokens, no grad accumulation",
        "lr": f"1e-3, linear warmup {warmup}, cosine to 1e-4 at {flags['lr_decay_iters']}",
        "adamw": "betas (0.9, 0.99), weight_decay 0.1 on 2-D params, grad_clip 1.0",
        "eval": f"every {every} iters: {flags['eval_iters']} random train + "
        f"{flags['eval_iters']} random val batches; checkpoint when val improves",
    }


MODEL = {"preset": "tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
RECIPES: dict[str, dict[str, Any]] = {
    # nanoGPT's CPU run, knob for knob (its model has no biases and exact-erf GELU).
    "nanogpt-cpu": {
        "model": {**MODEL, "dropout": 0.0, "bias": False, "activation": "gelu"},
        "batch_size": 12,
        "grad_accum": 1,
        "max_steps": 2000,
        "lr": 1e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "beta1": 0.9,
        "beta2": 0.99,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
    },
    # gptkit's recipe for time-to-quality: the same size (4 x 128, context 64, batch 12) made
    # Llama-style (RoPE, RMSNorm, SwiGLU with a parameter-matched 344 hidden), 4x the peak
    # learning rate with a short warmup, beta2 0.95, 800 steps instead of 2000. Sweep on this
    # machine (val loss on the whole split): GPT-2 style, lr 2e-3 / 3e-3 / 5e-3 at 1200 steps
    # 1.951 / 1.901 / 1.862, lr 5e-3 at 900 1.950, lr 8e-3 at 900 1.976; at 900 steps, lr 5e-3,
    # warmup 50: RoPE + GELU 1.886, RoPE + SwiGLU 1.872, Llama-style 1.860 (1.923 at 700);
    # Llama-style, warmup 20, min_lr 1e-4: lr 5e-3 beta2 0.99 at 800 1.897, lr 4e-3 beta2 0.95
    # at 800 1.858, at 700 1.893.
    "fast": {
        "model": {
            **MODEL,
            "dropout": 0.0,
            "bias": False,
            "positions": "rope",
            "norm": "rmsnorm",
            "activation": "swiglu",
            "intermediate_size": 344,
        },
        "batch_size": 12,
        "grad_accum": 1,
        "max_steps": 800,
        "lr": 4e-3,
        "min_lr": 1e-4,
        "warmup_steps": 20,
        "beta1": 0.9,
        "beta2": 0.95,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
    },
}

ITER_LINE = re.compile(r"^iter (\d+): loss ([-\d.naninf]+), time ([\d.]+)ms")
EVAL_LINE = re.compile(r"^step (\d+): train loss ([-\d.naninf]+), val loss ([-\d.naninf]+)")
PARAMS_LINE = re.compile(r"^number of parameters: ([\d.]+)M")

# Run by a second python with nanoGPT's directory on sys.path: nanoGPT's last checkpoint on
# the whole val split in fixed, non-overlapping windows, batched and ordered as gptkit's
# TokenData.eval_windows reads them (a partial last batch dropped).
FULL_VAL = """
import json, sys
import numpy as np, torch
src, ckpt_path, val_path, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path.insert(0, src)
from model import GPT, GPTConfig
ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
data = np.fromfile(val_path, dtype=np.uint16).astype(np.int64)
T = model.config.block_size
n_batches = ((len(data) - 1) // T) // batch
losses = []
with torch.no_grad():
    for b in range(n_batches):
        starts = (np.arange(batch) + b * batch) * T
        rows = torch.from_numpy(np.stack([data[s : s + T + 1] for s in starts]))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        losses.append(model(x, y)[1].item())
print(json.dumps({"iter": ckpt["iter_num"], "val_loss": sum(losses) / len(losses),
                  "tokens": n_batches * batch * T}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="fast")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (medians)")
    parser.add_argument(
        "--iters", type=int, default=None, help="shorten both sides to N steps (smoke run)"
    )
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--only-nanogpt", action="store_true")
    side.add_argument("--skip-nanogpt", action="store_true")
    parser.add_argument(
        "--nanogpt",
        type=Path,
        default=Path(os.environ.get("NANOGPT_DIR", DEFAULT_NANOGPT)),
        help="nanoGPT: a checkout, or a git directory (its HEAD is extracted to a temp dir)",
    )
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="tinyshakespeare")
    parser.add_argument("--target-loss", type=float, default=REFERENCE["val_loss"])
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------
# nanoGPT


def nanogpt_source(path: Path, scratch: Path) -> tuple[Path, str]:
    """(a directory holding nanoGPT's train.py, its commit) from a checkout or a git dir."""
    if (path / "train.py").is_file():
        git = ["git", "-C", str(path)]
    elif (path / "HEAD").is_file() and (path / "objects").is_dir():
        git = ["git", f"--git-dir={path}"]
        out = scratch / "nanogpt"
        out.mkdir()
        archive = subprocess.run([*git, "archive", "HEAD"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    else:
        sys.exit(
            f"no nanoGPT at {path}: pass --nanogpt DIR (a checkout of "
            "https://github.com/karpathy/nanoGPT, or its git directory) or set NANOGPT_DIR"
        )
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    source = path if git[1] == "-C" else scratch / "nanogpt"
    return source, commit.stdout.strip() if commit.returncode == 0 else "unknown"


def write_nanogpt_data(text: str, data_dir: Path) -> None:
    """data/shakespeare_char as nanoGPT's prepare.py writes it, from a local input.txt (its
    prepare.py downloads the file): sorted characters, the first 90% to train, uint16 ids."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = dict(enumerate(chars))
    n = len(text)
    data_dir.mkdir(parents=True)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data_dir / f"{name}.bin")
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def nanogpt_flags(iters: int | None) -> dict[str, Any]:
    """The README's flags; a smoke run shortens the schedule (and evaluates at its end)."""
    flags = dict(NANOGPT_FLAGS)
    if iters is not None:
        flags.update(max_iters=iters, lr_decay_iters=iters)
        warmup = smoke_warmup(iters)
        if warmup != 100:  # train.py divides by lr_decay_iters - warmup_iters
            flags["warmup_iters"] = warmup
        if iters % 250:  # the config evaluates every 250 iters; also evaluate at the end
            flags["eval_interval"] = iters
    return flags


def smoke_warmup(iters: int) -> int:
    return min(100, max(1, iters // 10))


def nanogpt_command(source: Path, flags: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        str(source / "train.py"),
        NANOGPT_CONFIG,
        *(f"--{k}={v}" for k, v in flags.items()),
    ]


def run_nanogpt(source: Path, text: str, scratch: Path, iters: int | None) -> dict[str, Any]:
    """One nanoGPT run in a fresh working directory; its stdout parsed into numbers."""
    work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    write_nanogpt_data(text, work / "data" / "shakespeare_char")
    # train.py exec()s configurator.py and the config file from its working directory.
    (work / "configurator.py").symlink_to(source / "configurator.py")
    (work / "config").symlink_to(source / "config")
    flags = nanogpt_flags(iters)
    command = nanogpt_command(source, flags)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = (proc.stdout + proc.stderr)[-3000:]
        sys.exit(f"nanoGPT failed (exit {proc.returncode}):\n{tail}")
    iters_ms: dict[int, float] = {}
    evals: list[tuple[int, float, float]] = []
    n_params_m = None
    for line in proc.stdout.splitlines():
        if m := ITER_LINE.match(line):
            iters_ms[int(m[1])] = float(m[3])
        elif m := EVAL_LINE.match(line):
            evals.append((int(m[1]), float(m[2]), float(m[3])))
        elif m := PARAMS_LINE.match(line):
            n_params_m = float(m[1])
    if not iters_ms or not evals:
        sys.exit(f"could not parse nanoGPT's output:\n{proc.stdout[-3000:]}")
    # An iteration that ran an eval has the eval in its time: the median leaves them out.
    eval_steps = {step for step, _, _ in evals}
    steady = [ms for it, ms in iters_ms.items() if it not in eval_steps]
    flags_used = {**flags, "eval_interval": flags.get("eval_interval", 250)}
    tokens_per_step = flags_used["batch_size"] * flags_used["block_size"]
    ms = statistics.median(steady)
    full = full_val_nanogpt(source, work, flags_used["batch_size"])
    return {
        "command": command,
        "wall_s": wall,
        "iter_sum_s": sum(iters_ms.values()) / 1000,
        "steadiness": statistics.mean(steady) / ms,
        "steps": len(iters_ms),
        "tokens_per_step": tokens_per_step,
        "ms_per_iter": ms,
        "tokens_per_s": tokens_per_step / ms * 1000,
        "val_loss": evals[-1][2],
        "train_loss": evals[-1][1],
        "last_eval_step": evals[-1][0],
        "evals": len(evals),
        "full_val": full,
        "flops_per_token": nanogpt_flops_per_token(flags_used, n_params_m),
    }


def full_val_nanogpt(source: Path, work: Path, batch: int) -> dict[str, Any] | None:
    """nanoGPT's saved checkpoint (its best eval; the last one when val kept improving) on the
    whole val split, in a separate python, after the timed run."""
    ckpt = work / "out-shakespeare-char" / "ckpt.pt"
    if not ckpt.exists():  # it saves only after an eval past iter 0 that improved val
        return None
    val = work / "data" / "shakespeare_char" / "val.bin"
    proc = subprocess.run(
        [sys.executable, "-c", FULL_VAL, str(source), str(ckpt), str(val), str(batch)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        print(f"warning: nanoGPT's full-val eval failed:\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nanogpt_flops_per_token(flags: dict[str, Any], n_params_m: float | None) -> float:
    """nanoGPT's model is gptkit's GPT-2 shape without biases and with exact GELU over its 65
    characters; FLOPs are counted on that model, the same way as for gptkit."""
    from gptkit.config import GPTConfig
    from gptkit.model import GPT
    from gptkit.train_needs import flops_per_token

    shape = dict(n_layer=flags["n_layer"], n_head=flags["n_head"], n_embd=flags["n_embd"])
    config = GPTConfig(vocab_size=65, block_size=flags["block_size"], bias=False, **shape)
    model = GPT(config)
    n = model.num_params() - model.pos_emb.weight.numel()
    if n_params_m is not None and abs(n / 1e6 - n_params_m) > 0.01:
        print(f"warning: nanoGPT reports {n_params_m}M parameters, counted {n}", flush=True)
    return flops_per_token(model)


def python_startup_s() -> float:
    """What a subprocess spends starting python and importing numpy and torch."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, torch"], check=True)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# gptkit


def prepare_gptkit(text_path: Path, data_dir: Path):
    from gptkit.prepare import prepare
    from gptkit.tokenizer import char_tokenizer

    tok = char_tokenizer(text_path.read_text(encoding="utf-8"), special_tokens=("<|endoftext|>",))
    prepare([text_path], data_dir, tok, val_fraction=0.1, progress=False)
    return tok


def gptkit_recipe(name: str, iters: int | None) -> dict[str, Any]:
    recipe = json.loads(json.dumps(RECIPES[name]))  # a deep copy
    if iters is not None:
        recipe["max_steps"] = iters
        recipe["warmup_steps"] = min(recipe["warmup_steps"], smoke_warmup(iters))
    return recipe


def gptkit_flops_per_token(config, vocab_size: int) -> float:
    from gptkit.model import GPT
    from gptkit.train_needs import flops_per_token

    return flops_per_token(GPT(config.model_config(vocab_size)))


def run_gptkit(recipe: dict[str, Any], data_dir: Path, scratch: Path, seed: int, vocab: int):
    from gptkit.train_config import TrainConfig

    config = TrainConfig(
        data_dir=str(data_dir),
        out_dir=tempfile.mkdtemp(prefix="gptkit-run-", dir=scratch),  # fresh: no resuming
        eval_every=0,  # evaluate once, at the end,
        eval_batches=0,  # on the whole val split
        checkpoint_every=0,  # checkpoint once, at the end
        tensorboard=False,  # nanoGPT logs to stdout only (metrics.jsonl is still written)
        progress=False,
        seed=seed,
        **recipe,
    )
    from gptkit.train import train

    start = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - start
    block_size = config.model_config(vocab).block_size
    tokens_per_step = config.batch_size * config.grad_accum * block_size
    return {
        "wall_s": wall,
        "train_s": result.seconds,
        "steps": result.steps,
        "tokens_per_step": tokens_per_step,
        "ms_per_iter": result.ms_per_step,
        "tokens_per_s": tokens_per_step / result.ms_per_step * 1000,
        "own_tokens_per_s": result.tokens_per_s,
        "own_mfu": result.mfu,
        "val_loss": result.val_loss,
        "train_loss": result.train_loss,
        "flops_per_token": gptkit_flops_per_token(config, vocab),
    }


# ---------------------------------------------------------------------------------------------
# the race


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(runs: list[dict[str, Any]], peak: float) -> dict[str, Any]:
    if not runs:
        return {}
    keys = ("wall_s", "iter_sum_s", "train_s", "steps", "ms_per_iter", "tokens_per_s")
    out = {k: median_of(runs, k) for k in (*keys, "val_loss", "own_mfu", "own_tokens_per_s")}
    out["tokens_per_step"] = runs[0]["tokens_per_step"]
    # Mean over median step time (evals left out): near 1 on a quiet machine, far above when
    # something else ran.
    if out["train_s"] is not None:
        out["steadiness"] = 1000 * out["train_s"] / out["steps"] / out["ms_per_iter"]
    else:
        out["steadiness"] = median_of(runs, "steadiness")
    out["command"] = runs[0].get("command")
    out["mfu"] = out["tokens_per_s"] * runs[0]["flops_per_token"] / peak
    fulls = [r["full_val"]["val_loss"] for r in runs if r.get("full_val")]
    out["full_val"] = statistics.median(fulls) if fulls else None
    if "full_val" in runs[0]:  # nanoGPT: its own estimate is the random-batch one
        out["own_val"] = out["val_loss"]
        out["full_iter"] = runs[-1]["full_val"]["iter"] if runs[-1]["full_val"] else None
    else:  # gptkit: its own estimate is the whole val split
        out["own_val"] = out["full_val"] = out["val_loss"]
    return out


def report(args, ours, theirs, peaks, startup, commit, recipe) -> None:
    peak = max(peaks)
    n = args.repeats
    print(
        f"Pretraining race: char-level tinyshakespeare on CPU, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, median of {n} run{'s' * (n > 1)} per side"
        + (f", SMOKE RUN of {args.iters} steps" if args.iters else "")
    )
    print(
        f"MFU denominator: this machine's fp32 matmul peak, {peak / 1e9:.1f} GFLOP/s (1024x1024 "
        f"matmuls in this process, the best of {len(peaks)} samples around the runs; the "
        f"worst was {min(peaks) / 1e9:.1f})"
    )
    rows = [
        ("optimizer steps", "steps", "{:.0f}", None),
        ("tokens per step", "tokens_per_step", "{:.0f}", None),
        ("tokens/s (median step)", "tokens_per_s", "{:.0f}", "higher"),
        ("ms/iter (median)", "ms_per_iter", "{:.1f}", "lower"),
        ("MFU", "mfu", "{:.1%}", "higher"),
        ("val loss, own estimate", "own_val", "{:.4f}", "lower"),
        ("val loss, whole val split", "full_val", "{:.4f}", "lower"),
        ("wall s", "wall_s", "{:.1f}", "lower"),
    ]
    print(f"{'':<27} {'gptkit':>10} {'nanoGPT':>10} {'gptkit/nanoGPT':>15}  better")
    for label, key, fmt, better in rows:
        a, b = ours.get(key), theirs.get(key)
        cells = [fmt.format(v) if v is not None else "-" for v in (a, b)]
        ratio = f"{a / b:.2f}x" if better and a is not None and b else "-"
        print(f"{label:<27} {cells[0]:>10} {cells[1]:>10} {ratio:>15}  {better or ''}")

    print("\nwhat each number covers:")
    if theirs:
        print(
            f"  nanoGPT wall: the whole `python train.py` subprocess: python start and torch "
            f"import (~{startup:.1f} s alone), data memmap, model build, "
            f"{theirs['steps']:.0f} steps, its evals and checkpoint saves; its per-iter timer "
            f"sums to {theirs['iter_sum_s']:.1f} s (eval and checkpoint time included)"
        )
        print(
            "  nanoGPT val loss, own estimate: its last `step N` line, the mean of "
            f"{NANOGPT_FLAGS['eval_iters']} random val batches of 12 x 64 (~15k tokens); "
            "whole val split: its saved checkpoint"
            + (f" (iter {theirs['full_iter']})" if theirs.get("full_iter") is not None else "")
            + " on every fixed 64-token window of its val.bin, in a second python, untimed"
        )
        print("  nanoGPT ms/iter: median of its `iter N: ... time` lines, eval iterations left out")
    if ours:
        print(
            f"  gptkit wall: the train() call: model build, {ours['steps']:.0f} steps, one eval "
            f"on the whole val split and the final checkpoint (its own training time: "
            f"{ours['train_s']:.1f} s); python start, imports and prepare are outside it"
        )
        own = ours.get("own_mfu")
        print(
            "  gptkit tokens/s and MFU: from its median step time, as for nanoGPT (train() "
            f"reports {ours['own_tokens_per_s']:.0f} tokens/s"
            + (f", MFU {own:.1%} against its own one-off peak" if own is not None else "")
            + ")"
        )
    print("  MFU for both: (6 N + 12 L H Q T) FLOPs per token x tokens/s / peak, N without wpe")
    steady = {
        name: side.get("steadiness") for name, side in (("gptkit", ours), ("nanoGPT", theirs))
    }
    steady = {name: v for name, v in steady.items() if v}
    print(
        "  mean / median step time: "
        + ", ".join(f"{name} {v:.2f}x" for name, v in steady.items())
        + " (evals left out)"
    )
    uneven = max(steady.values()) > 1.25 or min(peaks) < 0.7 * max(peaks)
    slow = max(peaks) < 0.7 * machine.peak_flops(torch.device("cpu")) or (
        theirs and theirs["ms_per_iter"] > 1.3 * REFERENCE["ms_per_iter"]
    )
    if uneven or slow:
        print(
            "  WARNING: the CPU was busy with other work during these runs (step times or matmul "
            "peak samples vary, or fall short of this machine's quiet figures in REFERENCE); "
            "the timings are contended, compare with care"
        )

    print("\nrecipes:")
    if theirs:
        print(f"  nanoGPT {commit[:12]}: {' '.join(theirs['command'][1:])}")
        for k, v in nanogpt_recipe(nanogpt_flags(args.iters)).items():
            print(f"    {k}: {v}")
    if ours:
        print(f"  gptkit --recipe {args.recipe}: {json.dumps(recipe)}")

    if ours:
        # Both sides without python start and imports: gptkit's wall never includes them.
        base = theirs["wall_s"] - startup if theirs else REFERENCE["wall_s"]
        where = "this run's (minus python start)" if theirs else "the reference"
        budget = base / 2
        met = ours["full_val"] <= args.target_loss and ours["wall_s"] <= budget
        print(
            f"\ntime-to-quality: gptkit val {ours['full_val']:.4f} in {ours['wall_s']:.1f} s; "
            f"goal val <= {args.target_loss} within half of {where} nanoGPT wall "
            f"({budget:.1f} s): {'MET' if met else 'NOT MET'}"
        )
        if theirs.get("full_val") is not None:
            print(
                f"  (gptkit's val loss is on the whole val split; there nanoGPT's own final model "
                f"scores {theirs['full_val']:.4f}, vs {theirs['own_val']:.4f} on its 20 batches)"
            )


def main() -> None:
    args = parse_args()
    if args.repeats < 1 or (args.iters is not None and args.iters < 2):
        sys.exit("--repeats must be >= 1 and --iters >= 2")
    text = args.input.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        scratch = Path(tmp)
        source = commit = None
        if not args.skip_nanogpt:
            source, commit = nanogpt_source(args.nanogpt.resolve(), scratch)
        vocab = recipe = None
        if not args.only_nanogpt:
            tok = prepare_gptkit(args.input, scratch / "gptkit-data")
            vocab, recipe = tok.vocab_size, gptkit_recipe(args.recipe, args.iters)
        # The peak is the best of samples taken before, between and after the runs: a busy
        # moment can only make a sample lower.
        peaks = [machine.measure_matmul_flops(torch.device("cpu"))]
        startup = python_startup_s() if source else 0.0
        ours_runs, theirs_runs = [], []
        for r in range(args.repeats):  # alternate the sides, so that load hits both alike
            if recipe is not None:
                print(f"[run {r + 1}/{args.repeats}] gptkit --recipe {args.recipe} ...", flush=True)
                peaks.append(machine.measure_matmul_flops(torch.device("cpu")))
                ours_runs.append(
                    run_gptkit(recipe, scratch / "gptkit-data", scratch, args.seed, vocab)
                )
            if source is not None:
                print(f"[run {r + 1}/{args.repeats}] nanoGPT ...", flush=True)
                peaks.append(machine.measure_matmul_flops(torch.device("cpu")))
                theirs_runs.append(run_nanogpt(source, text, scratch, args.iters))
        peaks.append(machine.measure_matmul_flops(torch.device("cpu")))
        peak = max(peaks)
        print()
        report(
            args,
            summary(ours_runs, peak),
            summary(theirs_runs, peak),
            peaks,
            startup,
            commit or "",
            recipe,
        )


if __name__ == "__main__":
    main()
