"""The SQLite database of `gptkit monitor`: items, per-topic windows, alerts, source offsets.

Exactly once: each batch is ONE transaction that inserts the batch's items, updates the
windows they fall in, closes the windows the batch's times have passed (storing any alert
that closing raises), and moves each source file's recorded byte offset to the end of the
lines those items came from. A process killed at any moment leaves either all of that or
none of it, and the next run starts reading at the recorded offset. (The database runs in
WAL mode with synchronous=FULL, so a commit is on disk before an alert goes out.)

Windows close by event time, not by the clock: the watermark is the latest item time seen;
a window [start, end) closes once watermark - lateness reaches `end`, and only then is it
evaluated (monitor_rules.AlertPolicy), with its final counts, against the topic's earlier
closed windows. An item whose window has already closed is late: it is stored and counted in
its window (the `late` column), but the verdict on that window stands. Items are taken one
at a time in stream order, so the verdicts do not depend on how the stream was batched, and
a restart changes nothing.

The tables (docs/MONITOR.md shows queries): meta, sources, items, windows, alerts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .monitor_rules import AlertPolicy, Duration, MonitorError
from .monitor_sources import BadLine, Item, Progress

APPLICATION_ID = 0x67706B6D  # "gpkm": PRAGMA application_id marks the file as a monitor db
SCHEMA_VERSION = 1  # PRAGMA user_version; a database of another version is refused
EXAMPLES = 3  # example texts in an alert
EXAMPLE_CHARS = 300

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (
  source TEXT PRIMARY KEY,        -- a file's absolute path ("stdin <time>" for a pipe)
  byte_offset INTEGER NOT NULL,   -- read up to here; the next run starts here
  done INTEGER NOT NULL DEFAULT 0,     -- 1: a folder's file read to its end
  skipped INTEGER NOT NULL DEFAULT 0   -- bad lines skipped in it
);
CREATE TABLE items (
  seq INTEGER PRIMARY KEY,        -- insertion order
  item_id TEXT,                   -- the item's id field, if it had one
  source TEXT NOT NULL,
  byte_offset INTEGER NOT NULL,   -- where its line starts in the source
  time TEXT NOT NULL,             -- ISO, UTC
  window_start TEXT NOT NULL,
  topic TEXT NOT NULL,
  text TEXT NOT NULL,
  sentiment TEXT NOT NULL,        -- the sentiment field's label
  negative INTEGER NOT NULL,      -- 1 if that label is one of the --negative labels
  labels TEXT NOT NULL,           -- every classifier field's label, a JSON object
  UNIQUE (source, byte_offset)    -- a line stored twice would be a bug: it fails loudly
);
CREATE INDEX items_by_window ON items (topic, window_start);
CREATE TABLE windows (
  topic TEXT NOT NULL,
  window_start TEXT NOT NULL,
  window_end TEXT NOT NULL,
  n INTEGER NOT NULL,             -- items, late ones included
  negatives INTEGER NOT NULL,
  late INTEGER NOT NULL DEFAULT 0,     -- items that arrived after the window closed
  closed INTEGER NOT NULL DEFAULT 0,
  share REAL,                     -- at closing: negatives / n then
  baseline_mean REAL, baseline_std REAL, baseline_windows INTEGER,
  z REAL,
  hit INTEGER,                    -- at closing: 1 if an alert condition held (NULL: not judged)
  PRIMARY KEY (topic, window_start)
);
CREATE TABLE alerts (
  id INTEGER PRIMARY KEY,
  topic TEXT NOT NULL,
  window_start TEXT NOT NULL,
  window_end TEXT NOT NULL,
  n INTEGER NOT NULL,
  negatives INTEGER NOT NULL,
  negative_share REAL NOT NULL,
  baseline_mean REAL, baseline_std REAL, baseline_windows INTEGER NOT NULL,
  z REAL,
  reasons TEXT NOT NULL,          -- JSON list: the conditions that held
  rule TEXT,                      -- the --rule in force (NULL: none)
  z_threshold REAL,               -- the --z in force (NULL: off)
  examples TEXT NOT NULL,         -- JSON list of a few negative texts of the window
  created TEXT NOT NULL,          -- wall-clock UTC time the alert was raised
  written INTEGER NOT NULL DEFAULT 0,  -- 1 once appended to the alerts JSONL file
  webhook TEXT,                   -- NULL: not sent yet, else "sent", "failed: ..." or "off"
  UNIQUE (topic, window_start)
);
"""


def iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Row:
    """An item with what the classifier said about it."""

    item: Item
    topic: str
    sentiment: str
    negative: bool
    labels: dict[str, str]


def connect(path: str | Path, read_only: bool = False) -> sqlite3.Connection:
    """A connection to a monitor database (created when missing, unless read_only), after
    checking it is one of this schema version. Raises MonitorError otherwise."""
    path = Path(path)
    if read_only and not path.is_file():
        raise MonitorError(f"database {path} does not exist")
    if path.is_dir():
        raise MonitorError(f"--db {path} is a folder, not a database file")
    uri = f"{path.resolve().as_uri()}?mode={'ro' if read_only else 'rwc'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        empty = not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if empty and not read_only:
            conn.execute("PRAGMA journal_mode=WAL")  # readers (the report) never block it
            conn.executescript(  # one transaction: a half-made schema is never left behind
                f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        elif (app, version) != (APPLICATION_ID, SCHEMA_VERSION):
            what = "of another schema version" if app == APPLICATION_ID else "not one"
            raise MonitorError(
                f"{path} is not a gptkit monitor database of schema {SCHEMA_VERSION} ({what}: "
                f"application_id {app}, user_version {version}); use a new --db"
            )
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise MonitorError(f"{path} is not a usable SQLite database ({e})") from None
    except BaseException:
        conn.close()
        raise
    return conn


class Store:
    """A monitor database opened for writing, with the windowing and alert policy of a run."""

    def __init__(
        self,
        path: str | Path,
        settings: dict[str, str],
        window: Duration,
        origin: datetime,
        lateness: Duration,
        policy: AlertPolicy,
    ):
        self.path, self.window, self.origin = Path(path), window, origin
        self.lateness, self.policy = lateness, policy
        self.conn = connect(path)
        try:
            with self.transaction():
                for key, value in settings.items():
                    self.settle(key, value)
        except BaseException:
            self.conn.close()
            raise

    def settle(self, key: str, value: str) -> None:
        """Record a setting the stored rows depend on, or check it equals the recorded one:
        items windowed by 7d cannot be continued by 1d windows."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
        elif row[0] != value:
            raise MonitorError(
                f"{self.path} was built with {key} {row[0]}; this run asks for {value} "
                "(use a new --db, or the same setting)"
            )

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _load_clock(self) -> None:
        watermark, closed = self._meta("watermark"), self._meta("closed_through")
        self.watermark = datetime.fromisoformat(watermark) if watermark else None
        self.closed_through = datetime.fromisoformat(closed) if closed else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        self._load_clock()
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- offsets ---------------------------------------------------------------------------

    def offsets(self) -> tuple[dict[str, int], set[str]]:
        """(byte offset of each source file, the files read to their end)."""
        rows = self.conn.execute("SELECT source, byte_offset, done FROM sources").fetchall()
        return {r[0]: r[1] for r in rows}, {r[0] for r in rows if r[2]}

    def _advance(self, p: Progress, skipped: int) -> None:
        row = self.conn.execute(
            "SELECT byte_offset, done FROM sources WHERE source = ?", (p.source,)
        ).fetchone()
        have = (row[0], bool(row[1])) if row else (0, False)
        if have != (p.before, False):
            # two monitors on one database would each insert the same lines
            raise MonitorError(
                f"{p.source} was read up to byte {have[0]:,} by another monitor on "
                f"{self.path}, not {p.before:,}: run one monitor per database"
            )
        self.conn.execute(
            "INSERT INTO sources VALUES (?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
            "byte_offset = excluded.byte_offset, done = excluded.done, "
            "skipped = skipped + excluded.skipped",
            (p.source, p.after, int(p.done), skipped),
        )

    # -- a batch ---------------------------------------------------------------------------

    def record(
        self, rows: list[Row], progress: list[Progress], skipped: dict[str, int]
    ) -> list[int]:
        """One batch, in one transaction: its items, the windows they update and close, the
        new source offsets. Returns the ids of the alerts raised."""
        alerts: list[int] = []
        with self.transaction():
            for p in progress:
                self._advance(p, skipped.get(p.source, 0))
            for row in rows:
                alerts += self._add(row)
        return alerts

    def window_of(self, t: datetime) -> tuple[datetime, datetime]:
        """The (start, end) of the window holding `t`; BadLine when it falls off the calendar
        (a window ending after the year 9999)."""
        try:
            start = self.window.floor(t, self.origin)
            return start, self.window.add(start)
        except (OverflowError, ValueError):
            raise BadLine(f"the time {t.isoformat()} has no {self.window} window") from None

    def _add(self, row: Row) -> list[int]:
        start, end = self.window_of(row.item.time)
        late = self.closed_through is not None and end <= self.closed_through
        self.conn.execute(
            "INSERT INTO items (item_id, source, byte_offset, time, window_start, topic, text, "
            "sentiment, negative, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.item.id,
                row.item.source,
                row.item.offset,
                row.item.time.isoformat(),
                iso(start),
                row.topic,
                row.item.text,
                row.sentiment,
                int(row.negative),
                json.dumps(row.labels, ensure_ascii=False),
            ),
        )
        self.conn.execute(
            "INSERT INTO windows (topic, window_start, window_end, n, negatives, late, closed) "
            "VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT (topic, window_start) DO UPDATE SET "
            "n = n + 1, negatives = negatives + excluded.negatives, late = late + excluded.late",
            (row.topic, iso(start), iso(end), int(row.negative), int(late), int(late)),
        )
        if self.watermark is not None and row.item.time <= self.watermark:
            return []
        self.watermark = row.item.time
        self.conn.execute("REPLACE INTO meta VALUES ('watermark', ?)", (iso(self.watermark),))
        # every window ending at or before the start of the window holding (watermark -
        # lateness) is closed: the grid makes that one comparison
        try:
            line = self.window.floor(self.lateness.add(self.watermark, -1), self.origin)
        except (OverflowError, ValueError):
            return []  # watermark - lateness is before the year 1: nothing can close yet
        if self.closed_through is not None and line <= self.closed_through:
            return []
        self.closed_through = line
        self.conn.execute("REPLACE INTO meta VALUES ('closed_through', ?)", (iso(line),))
        due = self.conn.execute(
            "SELECT topic, window_start, window_end, n, negatives FROM windows "
            "WHERE closed = 0 AND window_end <= ? ORDER BY window_start, topic",
            (iso(line),),
        ).fetchall()
        return [a for w in due if (a := self._close(*w)) is not None]

    def _close(self, topic: str, start: str, end: str, n: int, negatives: int) -> int | None:
        """Judge a window that just closed; the id of the alert it raises, if any."""
        past = self.conn.execute(
            "SELECT n, negatives FROM windows WHERE topic = ? AND window_start < ? "
            "AND closed = 1 ORDER BY window_start DESC LIMIT ?",
            (topic, start, self.policy.baseline),
        ).fetchall()
        verdict = self.policy.evaluate(n, negatives, [neg / k for k, neg in reversed(past)])
        before = self.conn.execute(
            "SELECT hit FROM windows WHERE topic = ? AND window_start < ? AND hit IS NOT NULL "
            "ORDER BY window_start DESC LIMIT 1",
            (topic, start),
        ).fetchone()
        self.conn.execute(
            "UPDATE windows SET closed = 1, share = ?, baseline_mean = ?, baseline_std = ?, "
            "baseline_windows = ?, z = ?, hit = ? WHERE topic = ? AND window_start = ?",
            (
                verdict.share,
                verdict.mean,
                verdict.std,
                verdict.baseline_windows,
                verdict.z,
                int(verdict.hit),
                topic,
                start,
            ),
        )
        # Fire on the rising edge only: a topic whose previous judged window already held
        # the condition has alerted for this surge, and stays quiet until a window ends
        # with the condition false.
        if not verdict.hit or (before is not None and before[0]):
            return None
        examples = [
            r[0] if len(r[0]) <= EXAMPLE_CHARS else r[0][: EXAMPLE_CHARS - 1] + "…"
            for r in self.conn.execute(
                "SELECT text FROM items WHERE topic = ? AND window_start = ? AND negative = 1 "
                "ORDER BY seq LIMIT ?",
                (topic, start, EXAMPLES),
            )
        ]
        p = self.policy
        cursor = self.conn.execute(
            "INSERT INTO alerts (topic, window_start, window_end, n, negatives, negative_share, "
            "baseline_mean, baseline_std, baseline_windows, z, reasons, rule, z_threshold, "
            "examples, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                topic,
                start,
                end,
                n,
                negatives,
                verdict.share,
                verdict.mean,
                verdict.std,
                verdict.baseline_windows,
                verdict.z,
                json.dumps(list(verdict.reasons)),
                p.rule.text if p.rule else None,
                p.z,
                json.dumps(examples, ensure_ascii=False),
                iso(datetime.now(UTC).replace(tzinfo=None)),
            ),
        )
        return cursor.lastrowid

    # -- alerts out ------------------------------------------------------------------------

    def alerts(self, ids: list[int]) -> list[dict[str, Any]]:
        """The records (the JSON the alerts file and the webhook get) of these alerts."""
        marks = ",".join("?" * len(ids))
        sql = f"SELECT * FROM alerts WHERE id IN ({marks}) ORDER BY id"
        return [alert_record(r) for r in self.conn.execute(sql, ids)]

    def pending(self) -> list[tuple[dict[str, Any], bool, str | None]]:
        """(record, written to the alerts file, webhook state) of the alerts a killed run
        raised but did not finish sending out."""
        sql = "SELECT * FROM alerts WHERE written = 0 OR webhook IS NULL ORDER BY id"
        return [(alert_record(r), bool(r["written"]), r["webhook"]) for r in self.conn.execute(sql)]

    def delivered(self, alert_id: int, written: bool, webhook: str) -> None:
        self.conn.execute(
            "UPDATE alerts SET written = ?, webhook = ? WHERE id = ?",
            (int(written), webhook, alert_id),
        )

    def totals(self) -> dict[str, int]:
        one = lambda sql: self.conn.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "items": one("SELECT count(*) FROM items"),
            "alerts": one("SELECT count(*) FROM alerts"),
            "open_windows": one("SELECT count(*) FROM windows WHERE closed = 0"),
            "late": one("SELECT coalesce(sum(late), 0) FROM windows"),
        }

    def close(self) -> None:
        self.conn.close()


def alert_record(row: sqlite3.Row) -> dict[str, Any]:
    """An alerts-table row as the JSON object the alerts file and the webhook get."""
    keys = ["id", "topic", "window_start", "window_end", "n", "negatives", "negative_share"]
    keys += ["baseline_mean", "baseline_std", "baseline_windows", "z", "rule", "z_threshold"]
    record = {key: row[key] for key in keys}
    record["reasons"] = json.loads(row["reasons"])
    record["examples"] = json.loads(row["examples"])
    record["created"] = row["created"]
    return record
