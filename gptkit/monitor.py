"""`gptkit monitor`: dated texts -> a classifier -> per-topic windows in SQLite -> alerts.

    run_monitor(MonitorConfig(source="posts.jsonl", db="posts.db", window="1d"), classify)

`classify` is any function texts -> per text {field: label}, such as
`gptkit.predict.label_function(gptkit.load("runs/sentiment/checkpoint"))`. The loop reads a
batch of lines from the source (monitor_sources.py), classifies them, and stores the items,
their windows' counts and the sources' new read offsets in one transaction
(monitor_store.py), which is what makes a restart after a crash resume exactly. Windows are
judged when they close (monitor_rules.py); an alert is then appended to the alerts JSONL
file, printed, and POSTed to the webhook, after its transaction has committed. An alert a
killed run had stored but not yet sent out is sent when the next run starts: the JSONL file
gets it exactly once (the file is checked for it first), the webhook at least once (its
receiver can tell repeats by the alert's `id`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO

from .config import first_line
from .monitor_rules import AlertPolicy, Duration, MonitorError, Rule, parse_origin
from .monitor_sources import BadLine, Fields, Item, open_source, parse_item
from .monitor_store import Row, Store

Classifier = Callable[[list[str]], list[dict[str, str]]]


@dataclass
class MonitorConfig:
    """Everything a monitor run needs besides the classifier (the `gptkit monitor` flags)."""

    source: str  # a JSONL file, a folder of *.jsonl files, or "-" for stdin
    db: str  # the SQLite database; created when missing
    follow: bool = False  # keep waiting for new lines (files), instead of stopping at the end
    poll: float = 1.0  # seconds between looks for new lines when there are none
    batch_size: int = 32  # texts classified together
    # Lines read, labelled and committed as one transaction. The classifier sorts them by
    # length into batches, so a long line pads few others: on the SOTU sentences, 256 at a
    # time pads to 1.7x the tokens where 32 padded to 3.4x.
    read_size: int = 256
    text_field: str = "text"
    time_field: str = "date"
    id_field: str = "id"
    topic_field: str = "topic"  # the item's own, else the classifier's field of this name
    sentiment_field: str | None = None  # None: "sentiment", or the classifier's only field
    negative: tuple[str, ...] = ("negative",)  # the labels that count as negative
    window: str = "1d"
    origin: str = "1970-01-01"  # the start of one window, so of all of them
    lateness: str = "0"  # how long after a window's end its items may still arrive
    baseline: int = 8  # past windows of a topic the z-score compares against
    z: float | None = 3.0  # alert at this z-score (None: no z-score alerts)
    rule: str | None = None  # e.g. "negative>0.4 and n>=20"
    std_floor: float = 0.02
    alerts: str | None = None  # the alerts JSONL file; default <db>.alerts.jsonl
    webhook: str | None = None  # POST each alert here as JSON
    webhook_timeout: float = 5.0

    @property
    def alerts_path(self) -> Path:
        return Path(self.alerts or f"{self.db}.alerts.jsonl")

    def checked(self) -> tuple[Duration, datetime, Duration, AlertPolicy]:
        """(window, origin, lateness, policy), or MonitorError naming the bad setting."""
        window = Duration.parse(self.window, "--window")
        origin = parse_origin(self.origin, window)
        lateness = Duration.parse(self.lateness, "--lateness", zero_ok=True)
        rule = Rule.parse(self.rule) if self.rule is not None else None
        policy = AlertPolicy(self.z, rule, self.baseline, self.std_floor)
        if self.batch_size < 1:
            raise MonitorError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.read_size < 1:
            raise MonitorError(f"read_size must be at least 1, got {self.read_size}")
        if not self.poll > 0:
            raise MonitorError(f"--poll must be a positive number of seconds, got {self.poll}")
        if not self.negative or not all(isinstance(x, str) and x for x in self.negative):
            raise MonitorError(f"--negative needs a label, got {self.negative!r}")
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise MonitorError(f"--webhook {self.webhook!r} must be an http:// or https:// URL")
        if self.source != "-" and not Path(self.source).exists():
            raise MonitorError(f"--source {self.source} does not exist")
        return window, origin, lateness, policy


@dataclass
class MonitorResult:
    items: int  # items this run stored
    skipped: int  # bad lines this run skipped
    alerts: int  # alerts this run raised
    seconds: float
    unfinished: int  # bytes of an unterminated last line left for later
    totals: dict[str, int]  # the database's: items, alerts, open_windows, late

    def summary(self, source: str, db: str) -> str:
        rate = self.items / self.seconds if self.seconds > 0 else 0.0
        t = self.totals
        return (
            f"monitored {self.items:,} items from {source} in {self.seconds:.1f} s "
            f"({rate:,.0f} items/s): {self.skipped:,} bad lines skipped, {self.alerts:,} alerts; "
            f"{db} holds {t['items']:,} items, {t['alerts']:,} alerts, {t['late']:,} late items, "
            f"{t['open_windows']:,} open windows"
        )


class Labeller:
    """The classifier's answers for a batch of items -> store rows (topic, sentiment)."""

    def __init__(
        self,
        classify: Classifier,
        config: MonitorConfig,
        store: Store,
        known: dict[str, list[str]] | None,
    ):
        self.classify, self.config, self.store, self.known = classify, config, store, known
        self.field = config.sentiment_field
        self.negative = set(config.negative)
        self.chosen = False
        if known:  # the model says which fields it has: check the flags before any reading
            self._choose_field(list(known))

    def _choose_field(self, fields: list[str]) -> None:
        """Settle the sentiment field (and check --negative against its labels, when known)."""
        if self.field is None:
            others = [f for f in fields if f != self.config.topic_field]
            if "sentiment" in fields or len(others) != 1:
                self.field = "sentiment"
            else:
                self.field = others[0]
        if self.field not in fields:
            raise MonitorError(
                f"the classifier gives no {self.field!r} label (its fields: "
                f"{', '.join(fields)}); name the sentiment field with --sentiment-field"
            )
        labels = (self.known or {}).get(self.field)
        missing = sorted(self.negative - set(labels)) if labels else []
        if missing:
            raise MonitorError(
                f"--negative {missing[0]!r} is not a label of the {self.field!r} field "
                f"(its labels: {', '.join(labels or [])})"
            )
        with self.store.transaction():  # a later run must read the same field
            self.store.settle("sentiment_field", self.field)
        self.chosen = True

    def rows(self, items: list[Item]) -> list[Row]:
        if not items:
            return []
        answers = self.classify([item.text for item in items])
        if not isinstance(answers, list) or len(answers) != len(items):
            got = len(answers) if isinstance(answers, list) else type(answers).__name__
            raise MonitorError(f"the classifier returned {got} answers for {len(items)} texts")
        if not self.chosen:
            self._choose_field(list(answers[0]))
        rows = []
        for item, labels in zip(items, answers, strict=True):
            if self.field not in labels:
                raise MonitorError(f"the classifier gave no {self.field!r} label for a text")
            topic = item.topic or labels.get(self.config.topic_field) or "all"
            sentiment = str(labels[self.field])
            labels = {str(k): str(v) for k, v in labels.items()}
            rows.append(Row(item, str(topic), sentiment, sentiment in self.negative, labels))
        return rows


class AlertOutputs:
    """Sends a stored alert out: one JSON line in the alerts file, one printed line, and a
    POST to the webhook. A failing webhook is reported and recorded, never fatal."""

    def __init__(
        self,
        path: Path,
        webhook: str | None,
        timeout: float,
        echo: Callable[[str], None],
        warn: Callable[[str], None],
    ):
        self.path, self.webhook, self.timeout = path, webhook, timeout
        self.echo, self.warn = echo, warn

    def _recover_file(self) -> set[tuple[Any, Any, Any]]:
        """(id, topic, window) of the alerts already in the file, after cutting off a last
        line that a killed run left half-written (lines are written whole, newline last)."""
        if not self.path.is_file():
            return set()
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        seen = set()
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                a = json.loads(line)
                seen.add((a["id"], a["topic"], a["window_start"]))
            except (ValueError, TypeError, KeyError):
                continue  # not an alert record
        return seen

    def deliver(self, store: Store, alerts: list[tuple[dict[str, Any], bool, str | None]]) -> None:
        in_file = self._recover_file() if any(not written for _, written, _ in alerts) else set()
        for record, written, webhook in alerts:
            if not written:
                if (record["id"], record["topic"], record["window_start"]) not in in_file:
                    self._append(json.dumps(record, ensure_ascii=False))
                self.echo(describe_alert(record))
            if webhook is None:
                webhook = self._post(record) if self.webhook else "off"
            store.delivered(record["id"], True, webhook)

    def _append(self, line: str) -> None:
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the database says it is

    def _post(self, record: dict[str, Any]) -> str:
        request = urllib.request.Request(
            self.webhook or "",
            data=json.dumps(record, ensure_ascii=False).encode("utf-8"),
            headers={"Content-Type": "application/json", "User-Agent": "gptkit-monitor"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read()
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as e:
            self.warn(f"gptkit monitor: alert {record['id']}: webhook failed: {first_line(e)}")
            return f"failed: {first_line(e, 200)}"
        return "sent"


def describe_alert(a: dict[str, Any]) -> str:
    """One printed line for an alert."""
    base = ""
    if a["baseline_mean"] is not None:
        base = (
            f" (baseline {a['baseline_mean']:.0%} ± {a['baseline_std']:.0%} over "
            f"{a['baseline_windows']} windows, z {a['z']:.1f})"
        )
    return (
        f"ALERT {a['topic']} {a['window_start']} .. {a['window_end']}: "
        f"{a['negative_share']:.0%} negative of {a['n']:,} items{base}: {'; '.join(a['reasons'])}"
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_store(config: MonitorConfig) -> Store:
    """The run's database, after checking every setting (MonitorError names a bad one)."""
    window, origin, lateness, policy = config.checked()
    settings = {
        "window": str(window),
        "origin": origin.isoformat(),
        "negative": json.dumps(sorted(set(config.negative))),
    }
    if config.sentiment_field is not None:
        settings["sentiment_field"] = config.sentiment_field
    return Store(config.db, settings, window, origin, lateness, policy)


def run_monitor(
    config: MonitorConfig,
    classify: Classifier,
    *,
    known_labels: dict[str, list[str]] | None = None,
    stop: threading.Event | None = None,
    stdin: BinaryIO | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = _stderr,
) -> MonitorResult:
    """Monitor `config.source` until it ends (or, with follow, until `stop` is set or
    Ctrl-C). known_labels: {field: its labels}, to check --negative against the model."""
    stop = stop or threading.Event()
    store = open_store(config)
    fields = Fields(config.text_field, config.time_field, config.id_field, config.topic_field)
    outputs = AlertOutputs(
        config.alerts_path, config.webhook, config.webhook_timeout, echo=echo, warn=warn
    )
    items = skipped = alerts = 0
    source = None
    start = time.perf_counter()
    try:
        try:
            outputs.deliver(store, store.pending())  # what a killed run left unsent
            offsets, done = store.offsets()
            source = open_source(config.source, config.follow, offsets, done, stdin)
            labeller = Labeller(classify, config, store, known_labels)
            while not stop.is_set():
                chunk = source.read(config.read_size)
                if chunk is None:
                    break
                if not chunk.progress:
                    stop.wait(config.poll)
                    continue
                batch, bad = [], Counter[str]()
                for line in chunk.lines:
                    if not line.data.strip():
                        continue  # blank lines are not items, nor errors
                    try:
                        item = parse_item(line, fields)
                        store.window_of(item.time)
                        batch.append(item)
                    except BadLine as e:
                        bad[line.source] += 1
                        where = f"the line at byte {line.start} of {line.source}"
                        warn(f"gptkit monitor: skipped {where}: {e}")
                raised = store.record(labeller.rows(batch), chunk.progress, bad)
                items, skipped = items + len(batch), skipped + sum(bad.values())
                alerts += len(raised)
                if raised:
                    outputs.deliver(store, [(a, False, None) for a in store.alerts(raised)])
        except KeyboardInterrupt:
            pass  # a batch not committed yet is read again by the next run
        unfinished = source.unfinished if source is not None else 0
        if unfinished:
            warn(
                f"gptkit monitor: {config.source} ends in an unfinished line ({unfinished} "
                "bytes without a newline); it is read once its newline is written"
            )
        seconds = time.perf_counter() - start
        return MonitorResult(items, skipped, alerts, seconds, unfinished, store.totals())
    finally:
        if source is not None:
            source.close()
        store.close()
