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
    y = Int8Linear.from_linear(linear)(x)
    exact = linear(x)
    torch.testing.assert_close(y, reference(x, linear), atol=1e-4, rtol=1e-3)
    relative = (y - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.02  # each row keeps its own precision, the small ones too
    for row in x:  # a single row (a decoding step) takes the kernel's direct path
        one, want = Int8Linear.from_linear(linear)(row[None]), linear(row[None])
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


# ------------------------------------------------------------------------------ saved int8


@pytest.mark.parametrize("tied", [True, False])
def test_an_int8_checkpoint_loads_as_the_model_it_saved(tmp_path, tied):
    from gptkit.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from gptkit.config import preset
    from gptkit.model import GPT

    torch.manual_seed(0)
    model = quantize(GPT(preset("tiny-llama", tie_embeddings=tied)).eval(), "int8")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = model(ids)
    save_checkpoint(tmp_path / "q", model)
    assert read_meta(tmp_path / "q")["quantize"] == "int8"
    back, _, _ = load_checkpoint(tmp_path / "q")
    assert sum(isinstance(m, Int8Linear) for m in back.modules()) == 2 * 4 + 1  # 4 per block
    assert not any(type(m) is nn.Linear for m in back.modules())
    for (name, a), (_, b) in zip(model.named_modules(), back.named_modules(), strict=True):
        if isinstance(a, Int8Linear):  # the very same int8 weights and scales
            assert all(torch.equal(x, y) for x, y in zip(a.int8(), b.int8(), strict=True)), name
    with torch.no_grad():
        assert torch.equal(back(ids), want)


def test_the_cli_saves_an_int8_checkpoint_that_generates(tmp_path, char_checkpoint, capsys):
    from gptkit.cli import main

    main(["convert", str(char_checkpoint), str(tmp_path / "q"), "--quantize", "int8"])
    assert "wrote an int8 gptkit checkpoint" in capsys.readouterr().out
    args = ["--prompt", "the ", "--max-new-tokens", "5", "--temperature", "0"]
    main(["generate", "--model", str(char_checkpoint), "--quantize", "int8", *args])
    quantized_on_load = capsys.readouterr().out
    main(["generate", "--model", str(tmp_path / "q"), *args])
    assert capsys.readouterr().out == quantized_on_load
    bad = ["convert", str(char_checkpoint), str(tmp_path / "h"), "--to", "hf", "--quantize", "int8"]
    assert main(bad) == 2
    assert "gptkit: error: --quantize int8 writes a gptkit checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_an_int8_checkpoint_is_not_trained(tmp_path, char_checkpoint):
    from gptkit.checkpoint import CheckpointError
    from gptkit.cli import main
    from gptkit.loading import load_trainable

    main(["convert", str(char_checkpoint), str(tmp_path / "q"), "--quantize", "int8"])
    with pytest.raises(CheckpointError, match="int8 checkpoint, for generation only"):
        load_trainable(tmp_path / "q")
