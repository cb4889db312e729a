"""Where `gptkit monitor` reads dated texts: a growing JSONL file, a folder that files arrive
in, or stdin; and how one line becomes an item.

A source hands out complete lines with their byte positions, never more than asked for, and
says how far each file has been read (`Progress`). The monitor stores that position in the
same SQLite transaction as the rows made from those lines, which is what makes a restart
resume exactly where the last committed batch ended (monitor_store.py).

- A single file may still be being written: a last line without its newline is left alone
  until the writer finishes it, even when the file is read without --follow.
- A folder's files are taken to be complete when they appear (writers write elsewhere, or
  to a name that does not end in .jsonl, and rename into place), so a file's unterminated
  last line is read as a line. Files are read in name order, each once.
- stdin has no position to go back to: it is read, but a restart cannot resume it.
"""

from __future__ import annotations

import json
import os
import re
import select
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .monitor_rules import MonitorError

READ_BYTES = 1 << 16


@dataclass(frozen=True)
class Line:
    source: str  # the key the offsets table knows this file by
    start: int  # byte offset of the line's first byte
    data: bytes  # without its newline


@dataclass(frozen=True)
class Progress:
    """A source file read from byte `before` up to `after` (done: the whole of it)."""

    source: str
    before: int
    after: int
    done: bool = False


@dataclass
class Chunk:
    """Lines read now, and the file positions after them; both empty: nothing new yet."""

    lines: list[Line] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)


class _Splitter:
    """Bytes in, complete lines out, each with its byte offset; keeps a partial last line."""

    def __init__(self, source: str, offset: int):
        self.source, self.offset, self.buffer = source, offset, bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def take(self, limit: int, final: bool = False) -> list[Line]:
        """Up to `limit` complete lines; with `final`, an unterminated rest is a line too."""
        lines: list[Line] = []
        while len(lines) < limit and self.buffer:
            end = self.buffer.find(b"\n")
            if end < 0 and not final:
                break
            end = len(self.buffer) if end < 0 else end
            lines.append(Line(self.source, self.offset, bytes(self.buffer[:end]).rstrip(b"\r")))
            consumed = min(end + 1, len(self.buffer))
            del self.buffer[:consumed]
            self.offset += consumed
        return lines


class FileSource:
    """One JSONL file from a byte offset; with `follow`, waits for what is appended."""

    def __init__(self, path: Path, offset: int = 0, follow: bool = False, key: str = ""):
        self.path, self.follow = path, follow
        self.key = key or str(path.resolve())
        try:
            self.file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            raise MonitorError(f"source {path} does not exist") from None
        size = os.fstat(self.file.fileno()).st_size
        if size < offset:
            self.file.close()
            raise MonitorError(
                f"source {path} has {size:,} bytes but {offset:,} were read before: was it "
                "truncated or replaced? (use a new --db to read it from the start)"
            )
        self.file.seek(offset)
        self.splitter = _Splitter(self.key, offset)
        self.eof = False

    def read(self, limit: int, final: bool = False) -> Chunk | None:
        """Up to `limit` lines; None when the file has ended (never, when followed)."""
        before = self.splitter.offset
        lines = self.splitter.take(limit)
        while len(lines) < limit:
            data = self.file.read(READ_BYTES)
            self.eof = not data
            if not data:
                break
            self.splitter.feed(data)
            lines += self.splitter.take(limit - len(lines))
        if self.eof and len(lines) < limit and final:
            lines += self.splitter.take(limit - len(lines), final=True)
        if self.eof and self.follow:
            self._check_not_replaced()
        if not lines and self.splitter.offset == before:
            return None if self.eof and not self.follow else Chunk()
        return Chunk(lines, [Progress(self.key, before, self.splitter.offset)])

    @property
    def unfinished(self) -> int:
        """Bytes of an unterminated last line left unread."""
        return len(self.splitter.buffer)

    def _check_not_replaced(self) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return  # deleted while followed: what was appended before still reads
        mine = os.fstat(self.file.fileno())
        if now.st_ino != mine.st_ino or now.st_size < self.file.tell():
            raise MonitorError(
                f"source {self.path} was truncated or replaced while followed; exactly-once "
                "reading needs an append-only file (a rotating log: use a folder source)"
            )

    def close(self) -> None:
        self.file.close()


class FolderSource:
    """The *.jsonl files of a folder, in name order, each read once and to its end."""

    def __init__(self, folder: Path, done: set[str], offsets: dict[str, int], follow: bool = False):
        self.folder, self.done, self.offsets, self.follow = folder, set(done), offsets, follow
        self.key = str(folder.resolve())
        self.current: FileSource | None = None

    def _next_file(self) -> Path | None:
        names = sorted(p.name for p in self.folder.glob("*.jsonl") if p.is_file())
        pending = [n for n in names if str(self.folder.resolve() / n) not in self.done]
        return self.folder / pending[0] if pending else None

    def read(self, limit: int) -> Chunk | None:
        if self.current is None:
            path = self._next_file()
            if path is None:
                return Chunk() if self.follow else None
            key = str(path.resolve())
            self.current = FileSource(path, self.offsets.get(key, 0), key=key)
        chunk = self.current.read(limit, final=True) or Chunk()
        if self.current.eof and not self.current.unfinished:
            # the file is finished: say so with its last lines, so it is never read again
            end = self.current.splitter.offset
            before = chunk.progress[0].before if chunk.progress else end
            chunk.progress = [Progress(self.current.key, before, end, done=True)]
            self.done.add(self.current.key)
            self.current.close()
            self.current = None
        return chunk

    @property
    def unfinished(self) -> int:
        return 0

    def close(self) -> None:
        if self.current is not None:
            self.current.close()


class StdinSource:
    """Lines from a pipe. Its positions are kept for the record but cannot be resumed."""

    def __init__(self, stream: BinaryIO):
        self.fd = stream.fileno()
        started = datetime.now(UTC).replace(tzinfo=None).isoformat()
        self.key = f"stdin {started}"  # a new source each run: offsets restart at 0
        self.splitter = _Splitter(self.key, 0)
        self.eof = False

    def read(self, limit: int) -> Chunk | None:
        before = self.splitter.offset
        lines = self.splitter.take(limit, final=self.eof)
        if len(lines) < limit and not self.eof and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, READ_BYTES)
            self.eof = not data
            self.splitter.feed(data)
            lines += self.splitter.take(limit - len(lines), final=self.eof)
        if not lines and self.splitter.offset == before:
            return None if self.eof else Chunk()
        return Chunk(lines, [Progress(self.key, before, self.splitter.offset)])

    @property
    def unfinished(self) -> int:
        return 0

    def close(self) -> None:
        pass


Source = FileSource | FolderSource | StdinSource


def open_source(
    spec: str,
    follow: bool,
    offsets: dict[str, int],
    done: set[str],
    stdin: BinaryIO | None = None,
) -> Source:
    """`-` (stdin), a folder, or a file; offsets/done: what earlier runs recorded."""
    if spec == "-":
        import sys

        return StdinSource(stdin or sys.stdin.buffer)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, done, offsets, follow)
    return FileSource(path, offsets.get(str(path.resolve()), 0), follow)


# -- items -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """The names of an item's fields in the JSON lines."""

    text: str = "text"
    time: str = "date"
    id: str = "id"
    topic: str = "topic"


@dataclass(frozen=True)
class Item:
    source: str
    offset: int
    id: str | None
    time: datetime  # naive UTC
    topic: str | None  # the item's own topic, if it has one
    text: str


class BadLine(ValueError):
    """Why one input line is not an item (the monitor reports it and goes on)."""


def parse_time(value: object) -> datetime:
    """An ISO date or datetime (with a zone: converted to UTC), or a bare year like 1999."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 9999:
        return datetime(value, 1, 1)
    if not isinstance(value, str):
        raise BadLine(f"the time {value!r} is not an ISO date or a year")
    text = value.strip()
    if re.fullmatch(r"\d{1,4}", text) and int(text) >= 1:
        return datetime(int(text), 1, 1)
    try:
        t = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadLine(f"the time {value!r} is not an ISO date or a year") from None
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def parse_item(line: Line, fields: Fields) -> Item:
    try:
        row = json.loads(line.data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadLine("not UTF-8") from None
    except ValueError as e:
        raise BadLine(f"not JSON ({str(e).split(':')[0]})") from None
    if not isinstance(row, dict):
        raise BadLine(f"a JSON {type(row).__name__}, not an object")
    for name in (fields.text, fields.time):
        if row.get(name) is None:
            raise BadLine(f"no {name!r} field")
    text = row[fields.text]
    if not isinstance(text, str):
        raise BadLine(f"the {fields.text!r} field is not a string")
    item_id, topic = row.get(fields.id), row.get(fields.topic)
    return Item(
        source=line.source,
        offset=line.start,
        id=None if item_id is None else str(item_id),
        time=parse_time(row[fields.time]),
        topic=None if topic in (None, "") else str(topic),
        text=text,
    )
