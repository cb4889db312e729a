"""A corpus's sources -> text pieces, in order: what prepare.py tokenizes.

Plain-text files (one file is one document), JSONL / CSV / Parquet rows (one row is one
document, its text column), folders (recursively, sorted), or a Hugging Face `datasets` name
(streamed). Long files and rows are cut into pieces of about PIECE_BYTES after a newline, so
no piece is ever large; bytes that are not UTF-8 become U+FFFD and are counted per file.
"""

from __future__ import annotations

import codecs
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

TEXT_SUFFIXES = (".txt", ".md")
ROW_SUFFIXES = (".jsonl", ".csv", ".parquet")
PIECE_BYTES = 1 << 18  # text is tokenized in pieces (and batches) of about 256 KB


class PrepareError(ValueError):
    """A user-facing corpus problem (no documents, missing column, unreadable source)."""


Piece = tuple[str, bool, int, str]  # text, ends a document, raw bytes consumed, where from


class Reader:
    """Yields (text piece, ends a document, raw bytes consumed, where) from every source, in
    order; `where` names the file (and line or row) for error messages."""

    def __init__(self, text_column: str) -> None:
        self.text_column = text_column
        self.decode_errors: list[dict[str, Any]] = []

    def pieces(self, files: list[Path]) -> Iterator[Piece]:
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                yield from _row_pieces(_parquet_rows(path, self.text_column), self.text_column)
            elif suffix in (".jsonl", ".csv"):
                yield from _row_pieces(self._table_rows(path, suffix), self.text_column)
            else:
                yield from self._text(path)

    def dataset(self, name: str, split: str) -> Iterator[Piece]:
        try:
            import datasets
        except ImportError as e:
            raise PrepareError(
                f"--dataset {name} needs the `datasets` package; pip install datasets"
            ) from e
        try:
            rows = datasets.load_dataset(name, split=split, streaming=True)
            column = self.text_column
            yield from _row_pieces(
                (
                    (_column(r, column, f"dataset {name} row {n}"), f"dataset {name} row {n}")
                    for n, r in enumerate(rows)
                ),
                column,
            )
        except (ConnectionError, OSError) as e:
            raise PrepareError(f"cannot stream dataset {name!r} ({e}); is the network up?") from e

    def _text(self, path: Path) -> Iterator[Piece]:
        """One document, in pieces cut after a newline (in a huge line: before a character)."""
        pending: tuple[str, int] | None = None
        offset, carry = 0, b""
        with path.open("rb") as f:
            while data := carry + f.read(PIECE_BYTES):
                data += b"" if data.endswith(b"\n") else f.readline(PIECE_BYTES)
                carry = b""
                if not data.endswith(b"\n") and f.peek(1):
                    starts = range(len(data) - 1, max(len(data) - 5, 0), -1)
                    cut = next((i for i in starts if data[i] & 0xC0 != 0x80), len(data))
                    data, carry = data[:cut], data[cut:]
                if pending is not None:
                    yield pending[0], False, pending[1], _at_byte(path, offset - pending[1])
                pending = self._decode(data, path, offset), len(data)
                offset += len(data)
        if pending is not None:
            yield pending[0], True, pending[1], _at_byte(path, offset - pending[1])

    def _table_rows(self, path: Path, suffix: str) -> Iterator[tuple[str | None, str]]:
        lines = self._lines(path)
        if suffix == ".csv":
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # default: 128 KB
            reader = csv.DictReader(lines)
            try:
                for row in reader:
                    where = f"{path} line {reader.line_num}"
                    yield _column(row, self.text_column, where), where
            except csv.Error as e:
                raise PrepareError(f"{path} line {reader.line_num} is not CSV: {e}") from e
            return
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path} line {n} is not JSON: {e}") from e
                yield _column(row, self.text_column, f"{path} line {n}"), f"{path} line {n}"

    def _lines(self, path: Path) -> Iterator[str]:
        offset = 0
        with path.open("rb") as f:
            for line in f:
                yield self._decode(line, path, offset)
                offset += len(line)

    def _decode(self, data: bytes, path: Path, offset: int) -> str:
        """UTF-8 with replacement; the first bad byte of each file and a count are recorded."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            first = offset + e.start
        _BAD_BYTES[0] = 0
        text = data.decode("utf-8", errors=_count_errors_handler())
        errors = self.decode_errors
        if not errors or errors[-1]["file"] != str(path):
            errors.append({"file": str(path), "offset": first, "bad_bytes": 0})
            tqdm.write(
                f"gptkit prepare: warning: {path}: bytes that are not UTF-8 at offset "
                f"{first}; replaced with U+FFFD",
                file=sys.stderr,
            )
        errors[-1]["bad_bytes"] += _BAD_BYTES[0]
        return text


_BAD_BYTES = [0]


def _at_byte(path: Path, offset: int) -> str:
    return f"{path} (from byte {offset})" if offset else str(path)


def _count_errors_handler() -> str:
    """The name of a codecs error handler that replaces like "replace" and counts bad bytes."""

    def handler(e: UnicodeError) -> tuple[str, int]:
        assert isinstance(e, UnicodeDecodeError)
        _BAD_BYTES[0] += e.end - e.start
        return "\ufffd", e.end

    name = "gptkit-prepare-count"
    try:
        codecs.lookup_error(name)
    except LookupError:
        codecs.register_error(name, handler)
    return name


def _row_pieces(rows: Iterator[tuple[str | None, str]], column: str) -> Iterator[Piece]:
    """Each non-empty row (text, where) is a whole document, in pieces of at most PIECE_BYTES
    characters cut after a newline where there is one (as text files are read)."""
    for text, where in rows:
        start = 0
        while text and start < len(text):
            cut = len(text)
            if cut - start > PIECE_BYTES:
                cut = text.rfind("\n", start, start + PIECE_BYTES) + 1 or start + PIECE_BYTES
            piece = text[start:cut]
            try:
                nbytes = len(piece.encode("utf-8"))
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape makes a lone surrogate
                at = start + e.start
                raise PrepareError(
                    f"{where}: column {column!r} holds a lone surrogate "
                    f"({ascii(text[at])} at character {at}), which is not text; fix that row"
                ) from None
            yield piece, cut == len(text), nbytes, where
            start = cut


def _column(row: Any, column: str, where: str) -> str | None:
    if not isinstance(row, dict) or column not in row:
        keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise PrepareError(
            f"{where} has no {column!r} column (it has: {keys}); choose one with --text-column"
        )
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise PrepareError(f"{where}: column {column!r} holds {type(text).__name__}, not text")
    return text


def _parquet_rows(path: Path, column: str) -> Iterator[tuple[str | None, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise PrepareError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from e
    parquet = pq.ParquetFile(path)
    if column not in parquet.schema_arrow.names:
        names = ", ".join(parquet.schema_arrow.names)
        raise PrepareError(
            f"{path} has no {column!r} column (it has: {names}); choose one with --text-column"
        )
    kind = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise PrepareError(f"{path}: column {column!r} holds {kind}, not text")
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for text in batch.column(0).to_pylist():
            yield text, f"{path} row {row}"
            row += 1


def source_files(sources: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(
                p
                for p in source.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + ROW_SUFFIXES
            )
            if not found:
                raise PrepareError(f"folder {source} holds no .txt/.md/.jsonl/.csv/.parquet files")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise PrepareError(f"no such file or folder: {source}")
    return files
