"""Training batches from token shards: windows across shards, resumable randomness, eval order."""

import numpy as np
import pytest
import torch

from gptkit.data import DataError, TokenData
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


def test_random_batches_are_next_token_pairs_and_a_pure_function_of_step(data_dir):
    train = TokenData(data_dir[0], "train")
    x, y = train.random_batch(7, batch_size=4, block_size=16, seed=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    again, _ = train.random_batch(7, batch_size=4, block_size=16, seed=1)
    assert torch.equal(x, again)  # resuming at step 7 reads the same batch
    other_step, _ = train.random_batch(8, batch_size=4, block_size=16, seed=1)
    other_rank, _ = train.random_batch(7, batch_size=4, block_size=16, seed=1, rank=1)
    assert not torch.equal(x, other_step) and not torch.equal(x, other_rank)


def test_eval_batches_cover_the_split_in_order(data_dir):
    val = TokenData(data_dir[0], "val")
    batches = list(val.eval_batches(batch_size=2, block_size=32))
    assert len(batches) == (len(val) - 1) // 32 // 2
    flat = torch.cat([x.reshape(-1) for x, _ in batches])
    assert np.array_equal(flat.numpy(), val.window(0, len(flat)))
    assert len(list(val.eval_batches(2, 32, max_batches=3))) == 3


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="run `gptkit prepare` first"):
        TokenData(tmp_path)
    with pytest.raises(DataError, match="no 'test' split"):
        TokenData(data_dir[0], "test")
    val = TokenData(data_dir[0], "val")
    with pytest.raises(DataError, match="fewer than one window"):
        val.random_batch(0, 2, block_size=len(val))
    with pytest.raises(DataError, match="fewer than one batch"):
        next(val.eval_batches(batch_size=10_000, block_size=16))
