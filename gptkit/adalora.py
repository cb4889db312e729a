"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, with the rank budget moved during training to
the layers whose updates matter.

Each adapted weight W gets W x + (alpha / r) B (E * (A x)): A [r, in] and B [out, r] play the
singular vectors P and Q, E [r] the singular values (zero at the start, so a fresh adapter
changes nothing). Training adds two things to LoRA's:

- a penalty `orth_reg * mean ||A A^T - I||_F + ||B^T B - I||_F` that keeps A's rows and B's
  columns near-orthonormal, so E's entries act as singular values (`penalty`);
- after each optimizer step, every triplet (A's row i, E_i, B's column i) is scored by the
  sensitivity |w * dL/dw| of its weights, smoothed over steps (an exponential average, times
  an average of its variation: the paper's uncertainty), and the triplets below this step's
  budget have their E_i set to zero (`allocate`). The budget stays at r per layer for `tinit`
  steps, falls as a cube to `target_r` per layer until `tfinal` steps before the end, then the
  ranks reached are kept.

The scores are buffers of each layer, so a checkpoint carries them and `--resume` continues
the allocation exactly. The zeroed singular values cost nothing once merged; `ranks` reports
each layer's rank. Constants as the paper's and PEFT's: beta1 = beta2 = 0.85.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train_config import PeftConfig

BETA1 = BETA2 = 0.85  # the smoothing of the sensitivity and of its uncertainty


class AdaLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        out, inp = base.out_features, base.in_features
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(r, inp, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_B = nn.Parameter(torch.randn(out, r, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, device=w.device, dtype=w.dtype))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        # Per weight: the smoothed sensitivity and its uncertainty (see `_update_scores`);
        # `keep` marks the triplets the final allocation kept.
        for name, p in (("A", self.lora_A), ("B", self.lora_B), ("E", self.lora_E)):
            self.register_buffer(f"ipt_{name}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"unc_{name}", torch.zeros_like(p, dtype=torch.float32))
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        h = F.linear(self.dropout(x), self.lora_A) * self.lora_E  # [..., r]
        return y + F.linear(h, self.lora_B) * self.scale

    def delta(self) -> torch.Tensor:
        """The update [out, in] this layer adds to its base weight."""
        return (self.lora_B * self.lora_E) @ self.lora_A * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False

    @torch.no_grad()
    def _update_scores(self) -> None:
        """Smooth each weight's sensitivity |w * grad| and its uncertainty (the paper's Eq. 8-9)."""
        for name, p in (("A", self.lora_A), ("B", self.lora_B), ("E", self.lora_E)):
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs().float()
            avg, unc = getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}")
            avg.mul_(BETA1).add_(ipt, alpha=1 - BETA1)
            unc.mul_(BETA2).add_((ipt - avg).abs(), alpha=1 - BETA2)

    def triplet_scores(self) -> torch.Tensor:
        """[r]: each triplet's importance, E_i's score plus the mean score of A's row i and of
        B's column i (the paper's Eq. 10)."""
        a = (self.ipt_A * self.unc_A).mean(dim=1)  # [r]
        b = (self.ipt_B * self.unc_B).mean(dim=0)  # [r]
        return self.ipt_E * self.unc_E + a + b

    def rank(self) -> int:
        return int((self.lora_E != 0).sum())


def layers(model: nn.Module) -> list[tuple[str, AdaLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)]


def penalty(model: nn.Module, weight: float) -> torch.Tensor | None:
    """weight x the mean over AdaLoRA's A and B matrices of ||P P^T - I||_F (A's rows and B's
    columns orthonormal); None for a model without AdaLoRA layers or a zero weight."""
    found = layers(model)
    if not found or weight == 0:
        return None
    total = 0.0
    for _, m in found:
        for p in (m.lora_A, m.lora_B.T):  # [r, n] each
            gram = p @ p.T  # [r, r]
            total = total + torch.linalg.matrix_norm(gram - torch.eye(len(gram), device=p.device))
    return weight * total / (2 * len(found))


def budget(step: int, total_steps: int, r: int, target_r: int, tinit: int, tfinal: int) -> float:
    """The mean rank allowed after `step` optimizer steps: r for tinit steps, then a cubic fall
    to target_r, reached tfinal steps before the end."""
    if step <= tinit:
        return r
    span = total_steps - tfinal - tinit
    if span <= 0 or step >= total_steps - tfinal:
        return target_r
    left = 1 - (step - tinit) / span
    return target_r + (r - target_r) * left**3


@torch.no_grad()
def allocate(model: nn.Module, step: int, total_steps: int, config: PeftConfig) -> None:
    """AdaLoRA's update after optimizer step `step` (1-based, gradients still in place): score
    every triplet, then zero the singular values of those below the budget (every delta_t
    steps while it falls, and at its end), or keep the final ranks (after)."""
    found = [m for _, m in layers(model)]
    if not found:
        return
    final = total_steps - config.tfinal
    if step > final:  # the ranks are fixed: the optimizer must not revive a dropped triplet
        for m in found:
            m.lora_E.masked_fill_(~m.keep, 0.0)
        return
    for m in found:
        m._update_scores()
    if step <= config.tinit or (step % config.delta_t and step != final):
        return
    mean_rank = budget(step, total_steps, config.r, config.target_r, config.tinit, config.tfinal)
    scores = [m.triplet_scores() for m in found]
    every = torch.cat(scores)
    keep = math.floor(mean_rank * len(found))
    if keep < len(every):  # below the k-th largest score: dropped
        threshold = torch.kthvalue(every, len(every) - keep).values
        for m, s in zip(found, scores, strict=True):
            m.lora_E.masked_fill_(s <= threshold, 0.0)
            if step == final:
                m.keep.copy_(s > threshold)


def ranks(model: nn.Module) -> dict[str, int]:
    """Each AdaLoRA layer's rank now (its nonzero singular values)."""
    return {name: m.rank() for name, m in layers(model)}


def describe_ranks(model: nn.Module) -> str:
    """One line per block: `block 3: attn.qkv 5, attn.proj 2, ...`, then the total."""
    found, per_block = ranks(model), {}
    for name, rank in found.items():
        _, index, layer = name.split(".", 2)  # blocks.3.attn.qkv
        per_block.setdefault(index, []).append(f"{layer} {rank}")
    lines = [f"block {i}: {', '.join(parts)}" for i, parts in per_block.items()]
    return "\n".join(lines + [f"total rank {sum(found.values())} over {len(found)} layers"])
