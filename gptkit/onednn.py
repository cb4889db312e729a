"""Linear layers through oneDNN, on machines where it multiplies fp32 faster than MKL.

PyTorch multiplies fp32 matrices on a CPU with MKL. On the 2-core AMD EPYC these sessions run
on, MKL reached 200-234 GFLOP/s on a training step's products where oneDNN, PyTorch's other
CPU library (prompts are already multiplied through it: machine.onednn_linear), reached
360-550 on the same products: a Llama-style model of width 512 trained 1.5x as fast
(bench/train_linear.py), and the sentence embedder indexed SQuAD 1.5x as fast. On an Intel
CPU MKL is at home and may win. So nothing here assumes either: `onednn_is_faster` times both
libraries on a training step's three products once per machine and thread count (cached
beside the decode plan). Where oneDNN won, the Trainer (TrainConfig.cpu_matmul = "auto";
"onednn" or "torch" decide instead) and the sentence embedder (embed.py) make their models'
linear layers `OneDNNLinear`s.

An `OneDNNLinear` is an nn.Linear (same parameters, names, hooks and checkpoints) whose
forward and backward products run through oneDNN: the same results up to float rounding, as
any two GEMM libraries sum in a different order.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import machine
from .machine import onednn_linear


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x @ W.T + b; backward: dx = dy @ W, dW = dy.T @ x, db = sum(dy), each product
    through oneDNN and only those autograd asks for (a frozen weight gets no dW)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # x only where dW is wanted: a frozen layer keeps no activation, as F.linear's doesn't
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t())  # [..., K]
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g = grad.reshape(-1, grad.shape[-1])  # [M, N]
            if ctx.needs_input_grad[1]:
                grad_w = onednn_linear(g.t(), x.reshape(-1, x.shape[-1]).t())  # [N, K]
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU products run through oneDNN (see the module docstring);
    anything else (autocast's bfloat16, another device or dtype) takes F.linear as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type == "cpu"
            and x.numel()  # oneDNN has no primitive for zero rows
            and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            return _OneDNNLinearFunction.apply(x, w, self.bias)
        return F.linear(x, w, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` an OneDNNLinear (same parameters, ties and hooks;
    only forward changes); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            count += 1
    return count


# A training step's products at a small Llama-style width (M = batch x tokens, K -> N, and the
# two backward products of each): big enough that the libraries' kernels, not their call
# overheads, decide. 0.9: oneDNN must win clearly to replace PyTorch's default.
SHAPES = ((2048, 512, 1536), (2048, 1536, 512))
MARGIN = 0.9


def wanted(choice: str) -> bool:
    """Whether TrainConfig.cpu_matmul = `choice` (auto, onednn, torch) trains through oneDNN
    (train.py has refused "onednn" where this torch cannot)."""
    return choice == "onednn" or (choice == "auto" and onednn_is_faster())


def onednn_is_faster() -> bool:
    """Whether this machine (at this thread count) runs a training step's fp32 products (the
    forward one among them) faster through oneDNN than through F.linear: measured once (under a
    second), then cached for good, so a resumed run multiplies as the killed one did (both
    libraries are timed in every round, so a busy machine slows both, not one)."""
    if not machine.can_pack():  # a torch built without oneDNN's linear kernel
        return False
    name = f"onednn-linear-t{torch.get_num_threads()}.json"
    seconds = (machine.read_fact(name) or {}).get("seconds")
    readable = isinstance(seconds, dict) and set(seconds) == {"mkl", "onednn"}
    if not (readable and all(isinstance(s, int | float) for s in seconds.values())):
        seconds = measure()
        machine.write_fact(name, {"seconds": seconds, "cpu": machine.cpu().describe()})
    return seconds["onednn"] <= MARGIN * seconds["mkl"]


def measure(rounds: int = 3) -> dict[str, float]:
    """Seconds each library takes for SHAPES' forward and backward products, the best of
    `rounds` (each round times both, so a busy moment slows one round, not one library)."""
    gen = torch.Generator().manual_seed(0)
    operands = []
    for m, k, n in SHAPES:
        x, w, g = (torch.randn(*shape, generator=gen) for shape in ((m, k), (n, k), (m, n)))
        operands.append((x, w, g))
    libraries = {
        "mkl": lambda x, w, g: (F.linear(x, w), g @ w, g.t() @ x),
        "onednn": lambda x, w, g: (
            onednn_linear(x, w),
            onednn_linear(g, w.t()),
            onednn_linear(g.t(), x.t()),
        ),
    }
    best = dict.fromkeys(libraries, float("inf"))
    for i in range(rounds + 1):
        for name, products in libraries.items():
            start = time.perf_counter()
            for x, w, g in operands:
                products(x, w, g)
            if i:  # round 0 warms up both
                best[name] = min(best[name], time.perf_counter() - start)
    return best
