"""--dtype bfloat16 for batch inference (precision.py): autocast runs the matmuls in bfloat16,
the results stay close to float32's, and bad or pointless requests are refused or warned of."""

from __future__ import annotations

import pytest
import torch

from gptkit import machine, precision
from gptkit.config import ConfigError


def test_bfloat16_runs_the_matmuls_in_bfloat16_and_float32_does_not():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with precision.compute("bfloat16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with precision.compute("float32", "cpu"):
        assert (a @ b).dtype == torch.float32


def test_check_refuses_what_it_cannot_compute_in_one_line():
    with pytest.raises(ConfigError, match="dtype 'float16': use one of float32, bfloat16"):
        precision.check("float16", "cpu")
    with pytest.raises(ConfigError, match="--dtype bfloat16 with --quantize int8: pick one"):
        precision.check("bfloat16", "cpu", quantize="int8")
    precision.check("float32", "cpu", quantize="int8")  # int8 weights compute as they do
    with pytest.raises(ConfigError, match="dtype 'float16'"):  # never silently bfloat16
        precision.compute("float16", "cpu")


def test_check_warns_where_this_cpu_runs_bfloat16_slower(monkeypatch, capsys):
    # A CPU without AVX-512-BF16 or AMX emulates bfloat16 matmuls: measured slower, it warns.
    speeds = {torch.float32: 150e9, torch.bfloat16: 2e9}
    monkeypatch.setattr(machine, "peak_flops", lambda device, dtype: speeds[dtype])
    precision.check("bfloat16", "cpu")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 GFLOP/s on this CPU against float32's 150" in err
    speeds[torch.bfloat16] = 600e9  # one with them: nothing to say
    precision.check("bfloat16", "cpu")
    assert capsys.readouterr().err == ""


def test_a_bfloat16_embedder_gives_the_float32_vectors_to_rounding():
    pytest.importorskip("sentence_transformers")
    from gptkit.embed import load_embedder

    texts = ["How do I reset my card PIN?", "Wire transfers abroad cost 25 dollars."] * 3
    full = load_embedder("minilm").encode(texts)
    half = load_embedder("minilm", dtype="bfloat16").encode(texts)
    cosine = (full * half).sum(1)  # [N]; both are unit vectors
    assert not (full == half).all()  # bfloat16 really ran
    assert cosine.min() > 0.999
