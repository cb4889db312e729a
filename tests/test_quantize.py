"""int8 quantization: each layer close to fp32 and to its definition, generation
and the CLI flag working end to end, and clear errors."""

import pytest
import torch
import torch.nn as nn
from conftest import tiny_chat_lm

from gptkit.config import ConfigError
from gptkit.quantize import WEIGHT_MAX, Int8Linear, quantize


def reference(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """What Int8Linear computes, in plain float32: 7-bit weights per output row, and each input
    row scaled to [-1, 1], quantized to uint8 over the range fbgemm picks, de-quantized."""
    w = linear.weight
    w_scale = w.abs().amax(1, keepdim=True) / WEIGHT_MAX
    w_q = torch.round(w / w_scale) * w_scale
    r = x.abs().amax(-1, keepdim=True)
    xn = x / r
    lo, hi = xn.min().clamp(max=0), xn.max().clamp(min=0)  # one range for the whole tensor
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale)
    x_q = (torch.clamp(torch.round(xn / scale) + zero, 0, 255) - zero) * scale
    return nn.functional.linear(x_q * r, w_q, linear.bias)


def test_int8_linear_matches_its_definition_and_stays_close_to_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = torch.randn(5, 256) * torch.logspace(-2, 2, 5)[:, None]  # rows 10^4 apart in range
    y = Int8Linear(linear)(x)
    exact = linear(x)
    torch.testing.assert_close(y, reference(x, linear), atol=1e-4, rtol=1e-3)
    relative = (y - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.02  # each row keeps its own precision, the small ones too
    for row in x:  # a single row (a decoding step) takes the kernel's direct path
        one, want = Int8Linear(linear)(row[None]), linear(row[None])
        assert (one - want).norm() / want.norm() < 0.02


def test_quantized_model_generates_what_fp32_does():
    lm = tiny_chat_lm()
    prompt = "hello there, how"
    ids = torch.tensor([lm.prompt_ids(prompt)])
    fp32 = lm.generate(prompt, max_new_tokens=12, temperature=0)[0]
    with torch.no_grad():
        logits = lm.model(ids)
    quantize(lm.model, "int8")
    modules = list(lm.model.modules())
    assert any(isinstance(m, Int8Linear) for m in modules)
    assert not any(type(m) is nn.Linear for m in modules)
    with torch.no_grad():
        int8_logits = lm.model(ids)
    assert (int8_logits - logits).norm() / logits.norm() < 0.08
    int8 = lm.generate(prompt, max_new_tokens=12, temperature=0)[0]
    assert int8[:4] == fp32[:4]  # greedy text agrees until a near-tie flips


def test_bad_modes_and_devices_are_clear_errors():
    lm = tiny_chat_lm()
    with pytest.raises(ConfigError, match="unknown quantization 'int4'"):
        quantize(lm.model, "int4")
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        quantize(meta, "int8")


def test_cli_quantize_flag(char_checkpoint, capsys):
    from gptkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(char_checkpoint), "--quantize", "int4", "--prompt", "x"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    main(
        ["generate", "--model", str(char_checkpoint), "--quantize", "int8"]
        + ["--prompt", "the ", "--max-new-tokens", "5", "--temperature", "0"]
    )
    assert capsys.readouterr().out.startswith("the ")
