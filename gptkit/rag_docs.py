"""Documents for an index: read from files and folders, then cut into overlapping chunks.

Formats, by suffix (each may also be gzipped, `.json.gz`):
- .txt, .md: one document; its title is the first Markdown heading, else the file name;
- .html, .htm: the visible text (scripts and styles dropped), titled by <title>;
- .jsonl, .json (a list of objects, or one object): one document per object, with the text in
  `text_field` (default "text", else "content"), and `id` / `title` when present.

A folder is read recursively; files of other kinds in it are skipped (and counted). A
document's id is its `id` field, else its path (plus the row number for JSON rows); ids must
be unique, since deleting and evaluating name documents by id.

Chunks hold about `chunk_tokens` tokens of the embedder's tokenizer, the last `overlap` of
them repeated at the start of the next, and always end between words: a sentence cut
mid-word embeds as noise and reads badly as a cited source.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
JSON_SUFFIXES = (".json", ".jsonl")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + JSON_SUFFIXES


class DocumentError(ConfigError):
    """Documents that cannot be read or indexed: one line naming the file."""


class NotDocumentsError(DocumentError):
    """A JSON file whose first row has no text field: data of another kind (a folder's
    tasks.json beside its documents), skipped in a folder, refused when named."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str  # the file it came from
    text: str


@dataclass(frozen=True)
class Chunk:
    id: str  # f"{doc_id}#{n}"
    doc_id: str
    title: str
    source: str
    start: int  # character offsets of the chunk in its document's text
    end: int
    text: str

    def embedded_text(self) -> str:
        """What is embedded and searched: the title carries words the chunk may lack."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def _suffix(path: Path) -> str:
    """The format suffix, looking through .gz."""
    return Path(path.stem).suffix.lower() if path.suffix == ".gz" else path.suffix.lower()


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (EOFError, gzip.BadGzipFile) as e:
        raise DocumentError(f"{path} is a damaged gzip file ({e})") from None


class _HTMLText(HTMLParser):
    """The visible text of a page and its <title>."""

    SKIP = {"script", "style", "noscript", "template"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self._stack:
            while self._stack.pop() != tag:
                pass

    def handle_data(self, data):
        if "title" in self._stack:
            self.title += data
        elif not self.SKIP.intersection(self._stack):
            self.parts.append(data)


def _markdown_title(text: str) -> str | None:
    match = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
    return match.group(1) if match else None


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each row of a .json or .jsonl file."""
    if _suffix(path) == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{path}:{n}: not JSON ({e.msg})") from None
            yield f"{path}:{n}", row
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DocumentError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    rows = data if isinstance(data, list) else [data]
    for n, row in enumerate(rows, 1):
        yield f"{path}[{n}]", row


def _json_documents(path: Path, name: str, text_field: str | None) -> Iterator[Document]:
    for n, (where, row) in enumerate(_json_rows(path, _read_text(path)), 1):
        if not isinstance(row, dict):
            raise DocumentError(f"{where}: a document must be a JSON object")
        field = text_field or ("text" if "text" in row else "content")
        text = row.get(field)
        if not isinstance(text, str):
            error = NotDocumentsError if n == 1 else DocumentError
            raise error(f"{where}: no text in field {field!r}; name the field with --text-field")
        doc_id = str(row["id"]) if row.get("id") is not None else f"{name}:{n}"
        yield Document(doc_id, str(row.get("title") or ""), str(path), text)


def read_file(path: Path, name: str, text_field: str | None = None) -> Iterator[Document]:
    """The documents of one file; `name` is its id when the file is one document."""
    suffix = _suffix(path)
    if suffix in JSON_SUFFIXES:
        yield from _json_documents(path, name, text_field)
    elif suffix in HTML_SUFFIXES:
        page = _HTMLText()
        page.feed(_read_text(path))
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(page.parts)).strip()
        yield Document(name, " ".join(page.title.split()) or path.stem, str(path), text)
    elif suffix in TEXT_SUFFIXES:
        text = _read_text(path)
        yield Document(name, _markdown_title(text) or path.stem, str(path), text)
    else:
        raise DocumentError(f"{path}: cannot index {suffix or 'a file without a suffix'} files; "
                            f"known: {', '.join(SUFFIXES)} (optionally .gz)")  # fmt: skip


def read_documents(
    paths: list[Path], text_field: str | None = None
) -> tuple[list[Document], list[Path]]:
    """Every document under `paths` (files and folders), and the files of folders skipped:
    of other kinds, hidden, or JSON without text (NotDocumentsError)."""
    documents: list[Document] = []
    skipped: list[Path] = []
    for root in map(Path, paths):
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
            for path in files:
                if _suffix(path) not in SUFFIXES or path.name.startswith("."):
                    skipped.append(path)
                    continue
                try:
                    documents += read_file(path, path.relative_to(root).as_posix(), text_field)
                except NotDocumentsError:
                    skipped.append(path)
        elif root.is_file():
            documents += read_file(root, root.name, text_field)
        else:
            raise DocumentError(f"{root}: no such file or folder")
    seen: dict[str, str] = {}
    for doc in documents:
        if doc.id in seen:
            raise DocumentError(
                f"document id {doc.id!r} appears twice ({seen[doc.id]} and {doc.source}); "
                "ids must be unique"
            )
        seen[doc.id] = doc.source
    return documents, skipped


def chunk_document(
    doc: Document, count_tokens: Callable[[list[str]], list[int]], size: int, overlap: int
) -> list[Chunk]:
    """`doc` cut into chunks of at most `size` tokens (a longer single word stands alone),
    consecutive chunks sharing about `overlap` tokens, every cut between words."""
    words = [m.span() for m in re.finditer(r"\S+", doc.text)]  # (start, end) in the text
    if not words:
        return []
    # Counting word by word is exact for a WordPiece tokenizer (it splits at spaces first)
    # and within a token or so per chunk for byte-level BPE, which merges across the space.
    counts = count_tokens([doc.text[a:b] for a, b in words])
    chunks: list[Chunk] = []
    first = 0
    while True:
        last, total = first, counts[first]  # the chunk is words[first..last]
        while last + 1 < len(words) and total + counts[last + 1] <= size:
            last += 1
            total += counts[last]
        start, end = words[first][0], words[last][1]
        chunk_id = f"{doc.id}#{len(chunks)}"
        chunks.append(
            Chunk(chunk_id, doc.id, doc.title, doc.source, start, end, doc.text[start:end])
        )
        if last + 1 == len(words):
            return chunks
        # The next chunk starts `overlap` tokens back, but always after this one's start.
        nxt, shared = last + 1, 0
        while nxt - 1 > first and shared + counts[nxt - 1] <= overlap:
            nxt -= 1
            shared += counts[nxt]
        first = nxt


def check_chunking(size: int, overlap: int, max_tokens: int) -> None:
    if size < 1:
        raise ConfigError(f"--chunk-tokens must be at least 1, got {size}")
    if not 0 <= overlap < size:
        raise ConfigError(f"--overlap must be in [0, chunk tokens), got {overlap} for {size}")
    if size > max_tokens:
        raise ConfigError(
            f"--chunk-tokens {size} is more than the embedder reads ({max_tokens} tokens): "
            "the rest of each chunk would be ignored"
        )
