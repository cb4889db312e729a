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

Quantized models generate and serve, and save (`gptkit convert CKPT OUT --quantize int8`): such a
checkpoint loads already quantized. Their weights are not trained, but gradients flow through
them to what is: `peft.quantize=int8` keeps a fine-tune's frozen layers in int8 under LoRA
(`quantize_frozen`), QLoRA's idea on a CPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .config import QUANTIZE_CHOICES, ConfigError

WEIGHT_MAX = 63  # 7-bit weights: 255 * 63 * 2 < 2**15, so fbgemm's int16 pair sums never saturate


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per output row scales) on fbgemm's int8 kernel.

    Saved as `weight_int8` (int8 [N, K]) and `weight_scale` (float32 [N]) beside the fp32
    `bias`, so a quantized checkpoint loads without an fp32 copy of the weights. `empty` makes
    one awaiting those tensors (a checkpoint's skeleton): loading its state packs them.
    """

    TENSORS = ("weight_int8", "weight_scale")  # what it saves beside the bias

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        """q: int8 [N, K] with |q| <= WEIGHT_MAX; scale: [N]; bias: [N] or None."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.packed = _pack(q, scale) if q.device.type != "meta" else None
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # [N, K]
        scale = (w.abs().amax(dim=1) / WEIGHT_MAX).clamp(min=1e-12)  # [N]
        zero = torch.zeros_like(scale, dtype=torch.long)
        with warnings.catch_warnings():  # "quantized tensors are deprecated": our pin has them
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8).int_repr()
        # The bias stays fp32 and is added after the row scales are undone.
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q, scale, bias)

    @classmethod
    def empty(cls, linear: nn.Linear) -> Int8Linear:
        """The layer `linear` (on the meta device) becomes once its saved tensors are loaded."""
        meta = torch.device("meta")
        q = torch.empty(linear.weight.shape, dtype=torch.int8, device=meta)
        bias = None if linear.bias is None else torch.empty(linear.out_features, device=meta)
        return cls(q, torch.empty(linear.out_features, device=meta), bias)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], scale float32 [N]) as packed (meta tensors while empty)."""
        if self.packed is None:
            n, meta = self.out_features, torch.device("meta")
            q = torch.empty(n, self.in_features, dtype=torch.int8, device=meta)
            return q, torch.empty(n, device=meta)
        q, _ = torch.ops.quantized.linear_unpack(self.packed)
        return q.int_repr(), q.q_per_channel_scales().float()

    # The saved tensors as attributes too: torch.distributed.checkpoint (a training run's
    # checkpoints) finds each state-dict entry by its name.
    @property
    def weight_int8(self) -> torch.Tensor:
        return self.int8()[0]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.int8()[1]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination[prefix + "weight_int8"], destination[prefix + "weight_scale"] = self.int8()

    def _load_from_state_dict(
        self, state_dict, prefix, metadata, strict, missing, unexpected, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, metadata, strict, missing, unexpected, errors
        )  # the bias
        names = [prefix + name for name in self.TENSORS]
        q, scale = (state_dict.get(name) for name in names)
        if q is not None and scale is not None:
            self.load_int8(q, scale)
        unexpected[:] = [k for k in unexpected if k not in names]  # they were expected

    def load_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Take saved weights: q int8 [N, K], scale [N] (packed: q itself is not kept)."""
        self.packed = _pack(q, scale)

    def to_linear(self) -> nn.Linear:
        """The float32 nn.Linear these int8 weights stand for (q * scale)."""
        q, scale = self.int8()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(q.float() * scale[:, None])
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 -> [..., N] float32."""
        if torch.is_grad_enabled() and x.requires_grad:  # training what comes before or beside
            y = _BackToInput.apply(x, self)
        else:
            y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N] on the int8 kernel, without the bias."""
        if x.numel() == x.shape[-1]:  # one row: the kernel's per-tensor scale is per-row
            y = torch.ops.quantized.linear_dynamic(x, self.packed, False)
        else:
            r = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # [..., 1]
            y = torch.ops.quantized.linear_dynamic(x / r, self.packed, False) * r
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class _BackToInput(torch.autograd.Function):
    """x W^T on the int8 kernel, with the gradient to x through W dequantized a layer at a time
    (the kernel has no backward; the weights themselves are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, scale = ctx.layer.int8()  # [N, K], [N]
        return dy @ (q.to(dy.dtype) * scale.to(dy.dtype)[:, None]), None  # [..., K]


def _pack(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's packed form of int8 rows q [N, K] with scales [N]: the integers as they are
    (torch.quantize_per_channel would round float values again)."""
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # "quantized tensors are deprecated": our pin has them
        warnings.simplefilter("ignore", UserWarning)
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qt, None)


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
        _replace_linears(model, Int8Linear.from_linear)
    return model.eval()


def quantized(model: nn.Module) -> str | None:
    """The mode `model` was quantized to ("int8"), or None."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None


def quantized_skeleton(model: nn.Module, mode: str) -> nn.Module:
    """A meta-device model (GPT.skeleton) with the layers a `mode` checkpoint holds: loading
    that checkpoint's state then fills them (`GPT.assign`)."""
    check(mode, torch.device("cpu"))
    _replace_linears(model, Int8Linear.empty)
    return model


def quantize_frozen(module: nn.Module) -> None:
    """Make every frozen linear layer under `module` int8, in place (an empty one awaiting its
    tensors on the meta device); the layers that train stay as they are."""
    weight = next(module.parameters())
    if weight.device.type != "meta":
        check("int8", weight.device)

    def make(linear: nn.Linear) -> Int8Linear:
        if linear.weight.device.type == "meta":
            return Int8Linear.empty(linear)
        with torch.no_grad():
            return Int8Linear.from_linear(linear)

    _replace_linears(module, make, lambda linear: not linear.weight.requires_grad)


def dequantize(module: nn.Module) -> None:
    """Every int8 layer under `module` back to a float32 nn.Linear, in place."""
    for name, child in module.named_children():
        if isinstance(child, Int8Linear):
            setattr(module, name, child.to_linear())
        else:
            dequantize(child)


def _replace_linears(module: nn.Module, make, which=lambda linear: True) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and which(child):
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make, which)
