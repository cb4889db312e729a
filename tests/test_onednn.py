"""OneDNNLinear: the same products as nn.Linear forward and backward, swapped in only where
this machine measured oneDNN faster, and a training run through it that matches F.linear's."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit import machine, onednn
from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.onednn import OneDNNLinear, onednn_is_faster, use_onednn_linears

pytestmark = pytest.mark.skipif(not machine.can_pack(), reason="this torch has no oneDNN linear")


def _pair(bias: bool, freeze: bool = False) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias)
    ours = nn.Linear(48, 40, bias=bias)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = OneDNNLinear
    for m in (plain, ours):
        m.weight.requires_grad_(not freeze)
    return plain, ours


@pytest.mark.parametrize("bias, freeze", [(True, False), (False, False), (True, True)])
def test_forward_and_every_gradient_equal_nn_linear(bias, freeze):
    plain, ours = _pair(bias, freeze)
    x = torch.randn(3, 7, 48)
    grad = torch.randn(3, 7, 40)
    results = []
    for m in (plain, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(grad)
        results.append((y, xi.grad, m.weight.grad, m.bias.grad if bias else None))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    if freeze:
        assert gw0 is None and gw1 is None  # a frozen weight costs no dW product
    else:
        torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(gb1, gb0)


def test_autocast_and_other_dtypes_take_f_linear():
    _, ours = _pair(bias=True)
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        expected = F.linear(x, ours.weight, ours.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    ours.double()
    assert ours(x.double()).dtype == torch.float64


def test_the_swap_keeps_names_ties_and_other_linear_kinds():
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, tie_embeddings=True
    )
    model = GPT(config)
    names = list(model.state_dict())
    n = use_onednn_linears(model)
    assert n == sum(1 for m in model.modules() if isinstance(m, nn.Linear)) == 2 * 4 + 1
    assert all(type(m) is OneDNNLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == names
    assert model.lm_head.weight is model.tok_emb.weight
    assert use_onednn_linears(model) == 0  # nothing plain is left


def test_the_choice_is_measured_once_and_follows_the_timings(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timings = {"mkl": 1.0, "onednn": 0.5}
    calls = []
    monkeypatch.setattr(onednn, "measure", lambda: calls.append(1) or dict(timings))
    assert onednn_is_faster() is True
    timings["onednn"] = 2.0  # a later measurement would say otherwise: the cache is kept
    assert onednn_is_faster() is True
    assert len(calls) == 1
    cached = next((tmp_path / "gptkit").rglob("onednn-linear-t*.json"))
    cached.write_text('{"seconds": {"mkl": "fast", "onednn": 1}}')  # damaged: measured again
    timings["onednn"] = 0.5
    assert onednn_is_faster() is True
    assert len(calls) == 2
    (tmp_path / "gptkit").rename(tmp_path / "old")  # a new machine: measured afresh
    timings["onednn"] = 0.95  # within the margin: PyTorch's default stays
    assert onednn_is_faster() is False
    assert len(calls) == 3


def test_a_real_measurement_times_both_libraries():
    seconds = onednn.measure(rounds=1)
    assert set(seconds) == {"mkl", "onednn"}
    assert all(0 < s < 60 for s in seconds.values())


def test_a_frozen_layer_keeps_no_activation_and_zero_rows_work():
    _, ours = _pair(bias=True, freeze=True)
    saved = []
    x = torch.randn(5, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        ours(x).sum().backward()
    assert torch.Size([5, 48]) not in saved  # only the weight: no dW is wanted
    assert ours(torch.randn(0, 48)).shape == (0, 40)  # F.linear's answer, not oneDNN's error
