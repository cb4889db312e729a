"""The KV cache (kv_cache.py): rows of their own lengths, left padding, views, and the row
operations the engine, beam search and speculative decoding use. Each ragged or padded pass is
checked against the same sequence run alone through the plain forward."""

import pytest
import torch
from test_model import VARIANTS, tiny


def alone(model, seq: list[int]) -> torch.Tensor:
    """The last position's logits [V] of seq run by itself, no cache."""
    return model(torch.tensor([seq]))[0, -1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_of_different_lengths_decode_as_if_alone(variant):
    model = tiny(**VARIANTS[variant])
    torch.manual_seed(1)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11, 8)]
    cache = model.new_cache(3, 24)
    for r, s in enumerate(seqs):  # each row prefilled alone, through a view
        logits = model(torch.tensor([s]), cache=cache.rows(r, 1))
        torch.testing.assert_close(logits[0, -1], alone(model, s), atol=1e-5, rtol=1e-5)
    assert cache.lengths == [5, 11, 8]
    for _ in range(6):  # then all rows together, one token each, each at its own column
        tokens = torch.randint(0, 97, (3, 1))
        logits = model(tokens, cache=cache)  # [3, 1, V]
        for r, s in enumerate(seqs):
            s.append(int(tokens[r, 0]))
            torch.testing.assert_close(logits[r, -1], alone(model, s), atol=1e-5, rtol=1e-5)
    assert cache.lengths == [11, 17, 14]


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "gpt3-sparse"])
def test_left_padding_is_hidden_and_skipped_by_positions(variant):
    model = tiny(**VARIANTS[variant])
    short, long = [3, 1, 4], [1, 5, 9, 2, 6, 5, 3]
    cache = model.new_cache(2, 12, pad=[4, 0])
    assert cache.positions(7)[0].tolist() == [0, 0, 0, 0, 0, 1, 2]
    idx = torch.tensor([[0] * 4 + short, long])
    logits = model(idx, cache=cache)
    torch.testing.assert_close(logits[0, -1], alone(model, short), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, -1], alone(model, long), atol=1e-5, rtol=1e-5)
    logits = model(torch.tensor([[7], [8]]), cache=cache)
    torch.testing.assert_close(logits[0, -1], alone(model, short + [7]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, -1], alone(model, long + [8]), atol=1e-5, rtol=1e-5)


def test_move_clear_and_grow_keep_rows_intact():
    model = tiny(**VARIANTS["llama-gqa"])
    a, b = [1, 2, 3, 4, 5, 6], [9, 8, 7]
    cache = model.new_cache(2, 4)
    cache.grow(6, limit=32)  # doubles: 4 -> 8 columns
    assert cache.max_len == 8
    model(torch.tensor([a]), cache=cache.rows(0, 1))
    model(torch.tensor([b]), cache=cache.rows(1, 1))
    cache.move(1, 0)  # row 1 (3 columns) over row 0 (6 columns)
    assert cache.lengths == [3, 3]
    cache.grow(20, limit=16)  # at most the limit
    assert cache.max_len == 16
    logits = model(torch.tensor([[4]]), cache=cache.rows(0, 1))
    torch.testing.assert_close(logits[0, -1], alone(model, b + [4]), atol=1e-5, rtol=1e-5)
    cache.clear(1)
    assert cache.lengths == [4, 0]
    logits = model(torch.tensor([a[:2]]), cache=cache.rows(1, 1))
    torch.testing.assert_close(logits[0, -1], alone(model, a[:2]), atol=1e-5, rtol=1e-5)


def test_reorder_and_truncate():
    model = tiny(**VARIANTS["gpt2"])
    cache = model.new_cache(2, 16)
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
    cache.reorder(torch.tensor([1, 1, 0]))  # three rows now: two copies of row 1
    assert cache.batch == 3 and cache.lengths == [3, 3, 3]
    logits = model(torch.tensor([[7], [8], [9]]), cache=cache)
    torch.testing.assert_close(logits[1, -1], alone(model, [4, 5, 6, 8]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2, -1], alone(model, [1, 2, 3, 9]), atol=1e-5, rtol=1e-5)
    cache.truncate(2)  # forget two tokens: the next pass writes over them
    logits = model(torch.tensor([[6], [6], [3]]), cache=cache)
    torch.testing.assert_close(logits[0, -1], alone(model, [4, 5, 6]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate a cache of 3 positions to 4"):
        cache.truncate(4)


def test_misuse_is_refused_with_a_reason():
    model = tiny(**VARIANTS["gpt2"])
    cache = model.new_cache(2, 8)
    model(torch.tensor([[1, 2]]), cache=cache.rows(0, 1))
    with pytest.raises(ValueError, match="one token at a time"):
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)  # rows of 2 and 0, two tokens each
    with pytest.raises(ValueError, match="takes its positions and mask from it"):
        model(torch.tensor([[1]]), cache=cache.rows(0, 1), positions=torch.tensor([[2]]))
    with pytest.raises(ValueError, match="rows 1..2 of a 2-row cache"):
        cache.rows(1, 2)
