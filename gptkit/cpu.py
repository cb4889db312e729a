"""CPU decoding: every linear layer computed as this machine's measured plan says.

A decoding step multiplies one row per sequence by every weight matrix, so it is bound by how
fast the weights stream from memory, and how to stream them fastest depends on the CPU
(cpu_plan.py measures it once and caches the plan). `use_decode_layout` lays a loaded model's
weights out for that plan and makes its linear layers `DecodeLinear`s: same parameters, same
results, faster decoding. Where the plan says so, a layer also keeps a copy of its weight packed
for oneDNN to multiply several rows at once (a prompt, a speculative check, a batch): faster,
for a second copy's memory. Training never uses this (api.load applies it, loading.py does not).

For a Llama-style fp32 model it also sets `model.native_step` (cpu_step.py): the whole pass of
a decoding step, or of a speculative check, in one call into C, which GPT.forward tries first.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from . import cpu_step
from .cpu_plan import DecodePlan, decode_plan, lay_out, plan_linear, row_major_plan
from .machine import pack
from .model import GPT
from .resources import available_bytes


class DecodeLinear(nn.Linear):
    """nn.Linear for CPU decoding, computed as this machine's `DecodePlan` says.

    How to stream the weights fastest depends on the CPU and on how BLAS is asked: on an AMD
    EPYC (AVX-512, 2 cores) one F.linear call on a row-major W streamed ~16 GB/s, a
    column-major W split over K across the threads ~27, and a row-major W split over N with W
    as the left operand ~31. Rather than fix that choice, the layout (column- or row-major),
    the split (none, or K / N in parts per thread), the operand order and up to how many rows
    the split pays are measured once per machine and cached. Every plan computes the same
    numbers up to the rounding of a split sum.
    """

    plan: DecodePlan = DecodePlan()  # use_decode_layout sets the machine's
    _packed: torch.Tensor | None = None  # pack(weight), made on the first call that uses it
    _packed_of: tuple[int, int] | None = None  # the weight's (address, version) it was made of

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = None  # below packed_from rows (a decode step's one), the plan's split serves
        if self.plan.packed_from and x.numel() >= self.plan.packed_from * self.in_features:
            packed = self._packed_weight(x)
        return plan_linear(x, self.weight, self.bias, self.plan, packed)

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The packed copy of the weight, packed again if the weight changed in place; None
        where the dense weight must serve: under autocast (its bfloat16 matmul), for another
        dtype, or when a gradient is wanted (the copy is not part of autograd's graph)."""
        w = self.weight
        grad = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
        if (
            grad
            or torch.is_autocast_enabled("cpu")
            or x.dtype != w.dtype
            or w.dtype != torch.float32
        ):
            return None
        # An inference tensor (a model loaded under torch.inference_mode) has no version
        # counter: only a new tensor is seen there, not one changed in place.
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)
        if self._packed_of != key:
            self._packed, self._packed_of = pack(w.detach()), key
        return self._packed


def use_decode_layout(model: nn.Module, plan: DecodePlan | None = None) -> nn.Module:
    """Make every plain linear layer a `DecodeLinear` and lay every weight out as `plan`
    (default: this machine's, measured on first use) wants: same shapes, names and
    results, faster CPU decoding. Checkpoints are still written row-major.

    By default a model the native step serves is laid out row-major, the layout its products
    read, even where this machine's plan is column-major. The layouts' products streamed
    within a few percent of each other on every CPU measured so far. The native step, though,
    takes the whole pass: on a 2-core AMD EPYC (AVX2) whose plan came out column-major, the
    two layouts' products streamed at 27.1 and 28.0 GB/s in the same process, and a SmolLM2
    decode step took 19.9 ms native against 34.4 ms in PyTorch, column-major."""
    if plan is None:
        plan = decode_plan()
        if plan.column_major and _native_serves(model, any_layout=True):
            plan = row_major_plan()
    if plan.packed_from and not _second_copy_fits(model):
        plan = dataclasses.replace(plan, packed_from=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                # idempotent, so a tied weight seen twice is fine
                module.weight.data = lay_out(module.weight.data, plan)
            if type(module) in (nn.Linear, DecodeLinear):
                # Same parameters, hooks and ties; only forward changes.
                module.__class__ = DecodeLinear
                module.plan = plan
    if _native_serves(model):
        model.native_step = cpu_step.NativeStep(model)
    return model


def _native_serves(model: nn.Module, any_layout: bool = False) -> bool:
    """Whether the native step can take `model`'s passes (any_layout: once laid out
    row-major). The library is built for this CPU on first use."""
    return (
        isinstance(model, GPT)
        and cpu_step.enabled()
        and cpu_step.unsupported(model, any_layout) is None
        and cpu_step.library() is not None
    )


def _second_copy_fits(model: nn.Module) -> bool:
    """Whether the packed copies of the linear weights take at most an eighth of the free
    memory: a small model's copy is cheap beside the machine (SmolLM2-135M: 0.5 GB), a large
    model's is not, and that one decodes without it."""
    linear = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    need = sum(w.numel() * w.element_size() for w in linear.values())
    free = available_bytes("cpu")
    return free is None or 8 * need <= free
