"""`gptkit predict`: label every text of a file (or of stdin's lines) with a fine-tuned
classifier or tagger, results streamed out in input order.

    gptkit predict --model runs/cls/checkpoint --data news.jsonl --out labelled.jsonl
    cat texts.txt | gptkit predict --model runs/cls/checkpoint --data - --top-k 2

JSONL out: each input record with a "prediction" added: {"label", "score", "probs"} (a
classifier of several fields: one such entry per field; a tagger: its entities). CSV/TSV out:
the input columns, then per field F `F_label`, `F_score` and `F_p_<label>` for each label
(a tagger: `entities`, as JSON). Rows are labelled CHUNK at a time, each chunk batched by
length, so output starts long before a large input is done.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from .cli_flags import checked_device, dtype_flag, quantize_flag
from .config import ConfigError
from .taskdata import read_texts

CHUNK = 1024  # rows read, labelled and written at a time


def _rows(data: str, text_field: str) -> tuple[Iterator[tuple[dict[str, Any], str]], int | None]:
    """(record, text) pairs and their count (None for stdin, read line by line)."""
    if data == "-":
        lines = (line.rstrip("\r\n") for line in sys.stdin)
        return (({text_field: line}, line) for line in lines if line.strip()), None
    rows = read_texts(Path(data), text_field, "--text-field")
    return iter(rows), len(rows)


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def flat_columns(prediction: Any, fields: list[str]) -> dict[str, Any]:
    """A prediction as CSV columns (see the module's docstring)."""
    if isinstance(prediction, list):  # a tagger's entities
        return {"entities": json.dumps(prediction, ensure_ascii=False)}
    per_field = prediction if set(prediction) == set(fields) else {fields[0]: prediction}
    columns: dict[str, Any] = {}
    for field, p in per_field.items():
        columns[f"{field}_label"] = p["label"]
        columns[f"{field}_score"] = round(p["score"], 6)
        columns |= {f"{field}_p_{label}": round(v, 6) for label, v in p["probs"].items()}
    return columns


def _output(path: str | None) -> contextlib.AbstractContextManager[TextIO]:
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    return open(path, "w", encoding="utf-8", newline="")  # newline="": csv writes its own


class Writer:
    """JSONL, or CSV/TSV with the header taken from the first row."""

    def __init__(self, out: TextIO, kind: str, fields: list[str]):
        self.out, self.kind, self.fields, self.csv = out, kind, fields, None

    def write(self, record: dict[str, Any], prediction: Any) -> None:
        if self.kind == "jsonl":
            row = {**record, "prediction": prediction}
            self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        row = {**record, **flat_columns(prediction, self.fields)}
        if self.csv is None:
            dialect = "excel-tab" if self.kind == "tsv" else "excel"
            self.csv = csv.DictWriter(self.out, list(row), dialect=dialect, extrasaction="ignore")
            self.csv.writeheader()
        self.csv.writerow(row)


def cmd_predict(args: argparse.Namespace) -> None:
    from . import precision
    from .api import load

    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = checked_device(args)
    lm = load(args.model, device=device, quantize=args.quantize)
    head = lm.config.head
    if head == "lm":
        raise ConfigError(
            f"{args.model} is a language model; predict needs a classifier or tagger (from "
            "`gptkit finetune classify` or `finetune tag`); use `gptkit generate` for text"
        )
    kind = args.format or (Path(args.out).suffix.lstrip(".").lower() if args.out else "jsonl")
    if kind not in ("jsonl", "csv", "tsv"):
        raise ConfigError(f"--out {args.out}: write .jsonl, .csv or .tsv (or set --format)")
    rows, total = _rows(args.data, args.text_field)
    fields = [f for f, _ in lm.config.label_groups()]
    with _output(args.out) as out, precision.compute(args.dtype, device):
        writer = Writer(out, kind, fields)
        with tqdm(total=total, unit="text", desc="predict", disable=total is None) as meter:
            for chunk in _chunks(rows, CHUNK):
                texts = [text for _, text in chunk]
                if head == "classify":
                    found = lm.classify(texts, top_k=args.top_k, batch_size=args.batch_size)
                else:
                    found = lm.tag(texts, batch_size=args.batch_size)
                for (record, _), prediction in zip(chunk, found, strict=True):
                    writer.write(record, prediction)
                out.flush()
                meter.update(len(chunk))


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="label a file's texts with a classifier or tagger")
    p.add_argument("--model", required=True, help="a classify / tag checkpoint (or HF dir)")
    p.add_argument("--data", required=True, help=".jsonl/.json/.csv/.tsv, or - for stdin lines")
    p.add_argument("--text-field", default="text", help="the field holding the text")
    p.add_argument("--out", help="where to write (.jsonl, .csv or .tsv); default stdout")
    p.add_argument("--format", choices=["jsonl", "csv", "tsv"], help="default: from --out")
    p.add_argument("--top-k", type=int, help="keep the k most likely labels (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    quantize_flag(p, classifier=True)
    dtype_flag(p)
    p.set_defaults(func=cmd_predict)
