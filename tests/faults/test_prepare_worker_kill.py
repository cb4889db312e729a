"""A tokenizer worker of `gptkit prepare` SIGKILLed mid-corpus (what the out-of-memory killer
does to a worker given a huge row): the run ends with one `gptkit: error:` line naming the file
and line the worker was encoding, exit status 2, and no meta.json (the output is unfinished).

Before, with multiprocessing.Pool, the pool silently replaced the dead worker and the parent
waited for its result for ever at 0% CPU.
"""

import json
import subprocess

import pytest
from faultkit import TEXT, start_gptkit

from gptkit.sources import PIECE_BYTES
from gptkit.tokenizer import char_tokenizer

POISON = "POISON"  # fault_run.py kills the worker given the piece that holds it


def test_a_killed_worker_is_one_line_naming_the_file_not_a_hang(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"a{i}.txt").write_text(TEXT)
    # Rows longer than a batch: the batches in flight when the worker dies (all of which
    # fail, and are named as a span) are the JSONL file's.
    long = TEXT * (PIECE_BYTES // len(TEXT) + 2)
    rows = [{"text": long}, {"text": f"{POISON} {long}"}, {"text": long}]
    (corpus / "b.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    char_tokenizer(TEXT + POISON, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    out = tmp_path / "out"
    argv = ["prepare", str(corpus), "--out", str(out), "--tokenizer", str(tmp_path / "tok")]

    proc = start_gptkit(*argv, "--workers", "2", fault=f"worker:{POISON}")
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("gptkit prepare hung after a worker was killed")
    assert proc.returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]  # the lines before are the progress bar's
    assert line.startswith("gptkit: error: a tokenizer worker process died"), line
    assert f"{corpus / 'b.jsonl'} line " in line, line
    assert not (out / "meta.json").exists()

    # The control: without the fault the same corpus prepares (so the death was the kill's).
    proc = start_gptkit(*argv, "--workers", "2")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert (out / "meta.json").is_file()
