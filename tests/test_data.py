"""Training batches from token shards: windows across shards, resumable randomness, eval order."""

import numpy as np
import pytest

from gptkit.data import DataError, TokenData, batch_rng
from gptkit.prepare import prepare
from gptkit.tokenizer import char_tokenizer

TEXT = "".join(f"{i % 10} the quick brown fox; " for i in range(300))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One document, split 90/10 by position, in shards of 1000 tokens (so windows cross them)."""
    root = tmp_path_factory.mktemp("data")
    (root / "input.txt").write_text(TEXT)
    tok = char_tokenizer(TEXT, special_tokens=["<|endoftext|>"])
    prepare([root / "input.txt"], root / "out", tok, val_fraction=0.1, shard_tokens=1000, workers=1)
    return root / "out", tok


def test_the_split_reads_as_one_stream_across_shards(data_dir):
    out, tok = data_dir
    train, val = TokenData(out, "train"), TokenData(out, "val")
    assert len(train.shards) > 1
    whole = np.concatenate([train.window(0, len(train)), val.window(0, len(val))])
    assert tok.decode(whole.tolist()) == TEXT + "<|endoftext|>"
    crossing = train.window(990, 25)  # 10 tokens from shard 0, 15 from shard 1
    assert np.array_equal(crossing, whole[990:1015])


def test_random_windows_are_a_pure_function_of_seed_step_and_micro_batch(data_dir):
    train = TokenData(data_dir[0], "train")
    w = train.random_windows(batch_rng(1, 7, 0), batch_size=4, block_size=16)
    assert w.shape == (4, 17)  # block_size + 1: inputs plus the next-token target
    whole = train.window(0, len(train))
    stretches = {whole[i : i + 17].tobytes() for i in range(len(whole) - 16)}
    assert all(row.tobytes() in stretches for row in w)  # contiguous stretches of the split
    again = train.random_windows(batch_rng(1, 7, 0), batch_size=4, block_size=16)
    assert np.array_equal(w, again)  # resuming at step 7 reads the same batch
    other_step = train.random_windows(batch_rng(1, 8, 0), batch_size=4, block_size=16)
    other_micro = train.random_windows(batch_rng(1, 7, 1), batch_size=4, block_size=16)
    assert not np.array_equal(w, other_step) and not np.array_equal(w, other_micro)


def test_eval_windows_cover_the_split_in_order(data_dir):
    val = TokenData(data_dir[0], "val")
    indexed = list(val.eval_windows(batch_size=2, block_size=32))
    assert [b for b, _ in indexed] == list(range(len(indexed)))
    batches = [w for _, w in indexed]
    assert len(batches) == (len(val) - 1) // 32 // 2
    flat = np.concatenate([w[:, :-1].reshape(-1) for w in batches])  # inputs, in order
    assert np.array_equal(flat, val.window(0, len(flat)))
    targets = np.concatenate([w[:, 1:].reshape(-1) for w in batches])  # shifted by one
    assert np.array_equal(targets, val.window(1, len(flat)))
    assert len(list(val.eval_windows(2, 32, max_batches=3))) == 3
    # two ranks split 3 batches as 0 | 1 (the odd one is dropped so both run the same count)
    ranks = [[b for b, _ in val.eval_windows(2, 32, 3, rank=r, world_size=2)] for r in (0, 1)]
    assert ranks == [[0], [1]]
    # a cap below the number of ranks still gives each rank a batch (`eval_batches=1` on 2)
    ranks = [[b for b, _ in val.eval_windows(2, 32, 1, rank=r, world_size=2)] for r in (0, 1)]
    assert ranks == [[0], [1]]


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="run `gptkit prepare` first"):
        TokenData(tmp_path)
    with pytest.raises(DataError, match="no 'test' split"):
        TokenData(data_dir[0], "test")
    val = TokenData(data_dir[0], "val")
    with pytest.raises(DataError, match="fewer than one window"):
        val.random_windows(batch_rng(0, 0, 0), 2, block_size=len(val))
    with pytest.raises(DataError, match="fewer than 1 batch"):
        next(val.eval_windows(batch_size=10_000, block_size=16))
