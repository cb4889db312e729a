"""Pretraining objectives: the batch transforms are what the papers describe, and a tiny model
learns each (fill-in-the-middle and bidirectional masked-token prediction)."""

import numpy as np
import pytest
import torch

from gptkit.checkpoint import load_checkpoint
from gptkit.config import ConfigError
from gptkit.data import TokenData
from gptkit.objectives import FillInTheMiddle, MaskedLM, make_objective
from gptkit.prepare import prepare
from gptkit.tokenizer import char_tokenizer
from gptkit.train import train
from gptkit.train_config import TrainConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<mask>"]


@pytest.fixture(scope="module")
def alphabet(tmp_path_factory):
    """A corpus whose every window is a stretch of the repeating alphabet: a middle is fully
    determined by its prefix and suffix, and a token by its right-hand neighbour."""
    root = tmp_path_factory.mktemp("alphabet")
    (root / "a.txt").write_text(ALPHABET * 400)
    tok = char_tokenizer(ALPHABET, special_tokens=SPECIALS)
    prepare([root / "a.txt"], root / "data", tok, val_fraction=0.1, workers=1, progress=False)
    return root, tok


def run(root, objective: str, **overrides):
    settings = dict(
        data_dir=str(root / "data"),
        out_dir=str(root / objective),
        objective=objective,
        model={"preset": "tiny", "block_size": 32},
        batch_size=32,
        max_steps=400,
        lr=5e-3,
        min_lr=5e-4,
        warmup_steps=10,
        eval_every=0,
        eval_batches=4,
        checkpoint_every=0,
        progress=False,
        tensorboard=False,
    )
    train(TrainConfig(**{**settings, **overrides}), overwrite=True)
    model, _, meta = load_checkpoint(root / objective / "checkpoint")
    assert meta["train"]["objective"] == objective
    return model


def test_fim_rearranges_windows_into_prefix_suffix_middle(alphabet):
    _, tok = alphabet
    fim = FillInTheMiddle(TrainConfig(data_dir="d", fim_rate=1.0), tok)
    windows = np.array([tok.encode((ALPHABET * 2)[s : s + 33]) for s in range(8)])
    rows = fim.rearrange(windows, np.random.default_rng(0))
    assert rows.shape == windows.shape
    for window, row in zip(windows.tolist(), rows.tolist(), strict=True):
        p, s, m = (row.index(i) for i in (fim.prefix, fim.suffix, fim.middle))
        assert p == 0 < s < m and row[-1] == tok.eos_id
        prefix, suffix, middle = row[1:s], row[s + 1 : m], row[m + 1 : -1]
        assert prefix + middle + suffix == window[:29]  # the same tokens, rearranged
    untouched = FillInTheMiddle(TrainConfig(data_dir="d", fim_rate=0.0), tok)
    assert np.array_equal(untouched.rearrange(windows, np.random.default_rng(0)), windows)


def test_mlm_corrupts_15_percent_as_80_10_10_and_scores_only_those(alphabet):
    _, tok = alphabet
    mlm = MaskedLM(TrainConfig(data_dir="d", objective="mlm"), tok)
    windows = np.random.default_rng(1).integers(0, 26, size=(200, 513))
    inputs, targets = mlm.batch(windows, np.random.default_rng(2))
    original = torch.from_numpy(windows[:, :-1])
    chosen = targets != -100
    assert torch.equal(targets[chosen], original[chosen])  # the original token, unshifted
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.005)
    masked = (inputs == mlm.mask)[chosen].float().mean().item()
    kept = (inputs == original)[chosen].float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 31, abs=0.01)  # 10% kept, plus random hits
    assert torch.equal(inputs[~chosen], original[~chosen])


def test_objectives_name_the_missing_special_tokens():
    plain = char_tokenizer(ALPHABET, special_tokens=["<|endoftext|>"])
    for objective, missing in (
        ("fim", "<fim_prefix> <fim_suffix> <fim_middle>"),
        ("mlm", "<mask>"),
    ):
        with pytest.raises(ConfigError, match=f"lacks {missing}; train the tokenizer"):
            make_objective(TrainConfig(data_dir="d", objective=objective), plain)


def test_a_tiny_model_learns_to_fill_in_the_middle(alphabet):
    root, tok = alphabet
    model = run(root, "fim", fim_rate=0.9)
    fim = FillInTheMiddle(TrainConfig(data_dir="d", fim_rate=1.0), tok)
    _, windows = next(TokenData(root / "data", "val").eval_windows(20, 32))
    exact = 0
    for row in fim.rearrange(windows, np.random.default_rng(5)).tolist():
        start = row.index(fim.middle) + 1
        ids, truth = row[:start], row[start : row.index(tok.eos_id)]
        while len(ids) < 33:  # greedy, until the model closes the middle
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
        exact += ids[start:] == truth
    assert exact / len(windows) >= 0.7  # measured 0.9; an untrained model gets 0


def test_a_tiny_model_learns_masked_tokens_from_both_sides(alphabet):
    root, tok = alphabet
    model = run(root, "mlm")
    # Mask the first token of held-out windows: only the right-hand context can tell it.
    _, windows = next(TokenData(root / "data", "val").eval_windows(32, 32))
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))
    first = inputs[:, 0].clone()
    inputs[:, 0] = tok.special_tokens["<mask>"]
    with torch.no_grad():
        both = model(inputs, causal=False)[:, 0].argmax(-1)
        left_only = model(inputs, causal=True)[:, 0].argmax(-1)
    assert (both == first).float().mean().item() >= 0.9  # measured 1.0
    assert (left_only == first).float().mean().item() <= 0.2  # chance is 1/26
