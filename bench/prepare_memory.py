"""`gptkit prepare`'s peak memory at 1x and 10x the corpus: it streams, so the two should match.

Builds two corpora from tinyshakespeare (../shared/data/tinyshakespeare/input.txt, 1.1 MB) in a
temporary folder, each at 1x and --scale times its size: one text file of N copies (a single
document, split by position) and a folder of N files (one document each, split by document).
Runs `python -m gptkit prepare SOURCE --workers 1` on each in a fresh process through a small
wrapper that reports the process's resident memory as `prepare()` starts (after the imports
and the tokenizer) and its peak at exit (VmHWM, Linux).

    .venv/bin/python bench/prepare_memory.py [--scale 10] [--tokenizer gpt2]

Prints a markdown table: corpus, MB, tokens, RSS at start, peak RSS, the peak above the start
(what prepare itself holds), and per kind the --scale/1x ratio of the peak and of that growth.
`main()` returns the rows as dicts, for a report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare/input.txt"
KINDS = ("one file", "folder")

# Runs `gptkit prepare ARGS` and prints one JSON line last: RSS as prepare() starts, and peak.
# Memory at the start is mostly imports (gptkit imports torch), the same at any corpus size, so
# the peak above it is the part that could grow with the corpus.
CHILD = """
import json, sys
import gptkit.prepare as prep
from gptkit.cli import main

def kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

inner, start = prep.prepare, []
def prepare(*args, **kwargs):
    start.append(kb("VmRSS"))
    return inner(*args, **kwargs)
prep.prepare = prepare  # cmd_prepare imports it when called, so it gets this one
code = main(["prepare", *sys.argv[1:]])
print(json.dumps({"start_kb": start[0], "peak_kb": kb("VmHWM")}))
sys.exit(code)
"""


def build(kind: str, copies: int, root: Path) -> Path:
    """`copies` of tinyshakespeare as one text file or as a folder of one file per copy."""
    text = SHAKESPEARE.read_bytes()
    if kind == "one file":
        path = root / f"one_{copies}.txt"
        with path.open("wb") as f:
            for _ in range(copies):
                f.write(text)
        return path
    folder = root / f"folder_{copies}"
    folder.mkdir()
    for i in range(copies):
        (folder / f"copy_{i:04d}.txt").write_bytes(text)
    return folder


def measure(source: Path, out: Path, tokenizer: str) -> dict[str, Any]:
    """One `gptkit prepare` run in a fresh process: its memory, and the corpus from meta.json."""
    args = [str(source), "--out", str(out), "--tokenizer", tokenizer, "--workers", "1"]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"gptkit prepare {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    start, peak = rss["start_kb"] / 1024, rss["peak_kb"] / 1024
    return {
        "mb": meta["bytes"] / 1e6,
        "tokens": sum(split["tokens"] for split in meta["splits"].values()),
        "start_rss_mb": round(start, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - start, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| corpus | MB | tokens | RSS at start MB | peak RSS MB | peak - start MB | peak ratio "
        "| growth ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = [f"{r[k]:.2f}" if r[k] is not None else "" for k in ("peak_ratio", "growth_ratio")]
        lines.append(
            f"| {r['corpus']} | {r['mb']:.1f} | {r['tokens']:,} | {r['start_rss_mb']:.1f} "
            f"| {r['peak_rss_mb']:.1f} | {r['growth_mb']:.1f} | {' | '.join(ratios)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="the large corpus, in copies")
    parser.add_argument("--tokenizer", default="gpt2", help="as `gptkit prepare --tokenizer`")
    parser.add_argument("--json", type=Path, help="also write the rows here (python -m bench)")
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        sys.exit(f"no corpus at {SHAKESPEARE}: this benchmark needs tinyshakespeare there")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prepare_memory_") as tmp:
        root = Path(tmp)
        for kind in KINDS:
            base: dict[str, Any] | None = None
            for copies in (1, args.scale):
                source = build(kind, copies, root)
                row = {"corpus": f"{kind} x{copies}", "kind": kind, "copies": copies}
                row |= measure(
                    source, root / f"out_{kind.replace(' ', '_')}_{copies}", args.tokenizer
                )
                # Each kind's large run against its 1x run; the 1x row has no ratio.
                row["peak_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"] if base else None
                growth = base["growth_mb"] if base else 0
                row["growth_ratio"] = row["growth_mb"] / growth if base and growth > 0 else None
                base = base or row
                rows.append(row)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
