"""int8 weights for CPU generation and serving: `quantize(model, "int8")`.

Every linear layer becomes an `Int8Linear`: weights stored as int8 with one scale per output
row, multiplied by fbgemm's int8 kernel (`quantized::linear_dynamic`, what
`torch.ao.quantization.quantize_dynamic` runs). Decoding reads a quarter of fp32's bytes, and
fbgemm streams them fast: SmolLM2-135M's linear layers take ~7 ms per token against ~22 ms in
fp32 on 2 cores.

The kernel also quantizes the input, to uint8 with one scale for the whole [rows, K] input.
Two choices keep that accurate (SmolLM2-135M's perplexity on tinyshakespeare; the end result
is in `bench/quantize_quality.py`, +5% over fp32):

- One scale per *row* (token), not per tensor: a prompt's tokens differ in range by orders of
  magnitude, and one shared scale erases the small ones (`quantize_dynamic`'s per-tensor
  scale took the perplexity from 47 to 178). Rows are scaled to a max |x| of 1 before the
  kernel and back after, so the kernel's one range is every row's own. A decoding step has
  one row and needs none of this.
- All 8 bits for the input and 7 for the weights (|q| <= 63). Without AVX-512 VNNI, fbgemm
  sums pairs of uint8 x int8 products in int16, which saturates past 32767; torch's default
  keeps 8-bit weights and gives up a bit of input range instead (`reduce_range`). Input
  precision matters more here: 7-bit inputs cost +11.7% perplexity, 7-bit weights +4.3%
  (each simulated in float32, 12k tokens).

Quantized models generate and serve; they are not saved or trained (quantize a loaded model).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .config import QUANTIZE_CHOICES, ConfigError

WEIGHT_MAX = 63  # 7-bit weights: 255 * 63 * 2 < 2**15, so fbgemm's int16 pair sums never saturate


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per output row scales) on fbgemm's int8 kernel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().contiguous()  # [N, K]
        scale = (w.abs().amax(dim=1) / WEIGHT_MAX).clamp(min=1e-12)  # [N]
        with warnings.catch_warnings():  # "quantized tensors are deprecated": our pin has them
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(
                w, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
            )
        # The bias stays fp32 and is added after the row scales are undone.
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32."""
        if x.numel() == x.shape[-1]:  # one row: the kernel's per-tensor scale is per-row
            y = torch.ops.quantized.linear_dynamic(x, self.packed, False)
        else:
            r = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [..., 1]
            y = torch.ops.quantized.linear_dynamic(x / r, self.packed, False) * r
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check(mode: str, device: torch.device) -> None:
    """A clear error for a mode we do not make or a device it cannot run on."""
    if mode not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown quantization {mode!r}; choose from {list(QUANTIZE_CHOICES)}")
    if device.type != "cpu":
        raise ConfigError(
            f"{mode} quantization runs on the CPU (fbgemm), not {device.type}; load with "
            "--device cpu, or use bf16 on a GPU instead"
        )


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Replace every linear layer of a CPU model by its `mode` version, in place."""
    for p in model.parameters():
        check(mode, p.device)
    with torch.no_grad():
        _replace_linears(model)
    return model.eval()


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child)
