"""A training state as files: the nested state (step, optimizer, RNGs) split into a JSON
skeleton plus a safetensors file of its tensors (no pickle), and the checks a state must pass
before a resume trusts it. checkpoint.py reads and writes the files and names the errors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MAX_STEP = 1 << 53  # steps are counted in float64 elsewhere (tqdm, TensorBoard)


def split_tensors(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` for JSON: each tensor moved into `tensors` under its path, {"tensor": path} left
    in its place."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):  # JSON would turn 0 into "0"
            raise TypeError(f"train state keys must be strings at {path}: {list(value)[:4]}")
        return {k: split_tensors(v, f"{path}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors (tuples come back as lists)."""
    if isinstance(value, dict):
        if value.keys() == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def train_state_problem(state: Any) -> str | None:
    """What is wrong with a training state's fields (types and ranges), or None."""
    if not isinstance(state, dict) or set(state) != {"step", "optimizer", "rng"}:
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        return f"expected the keys optimizer, rng and step, found {keys}"
    step = state["step"]
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        return f"step must be an integer in [0, 2**53], got {step!r}"
    rng = state["rng"]
    if not isinstance(rng, list | tuple) or not rng:
        return "rng must be a list of every rank's (cpu, cuda) RNG states"
    size = torch.get_rng_state().numel()
    for rank, pair in enumerate(rng):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            return f"rng[{rank}] must be a (cpu, cuda) pair, got {type(pair).__name__}"
        cpu, cuda = pair
        if not is_byte_vector(cpu) or cpu.numel() != size:
            return f"rng[{rank}][0] must be torch's CPU RNG state ({size} uint8), got {cpu!r:.40}"
        if cuda is not None and not is_byte_vector(cuda):
            return f"rng[{rank}][1] must be a CUDA RNG state or null, got {cuda!r:.40}"
    return optimizer_problem(state["optimizer"], step)


def is_byte_vector(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def optimizer_problem(optimizer: Any, step: int) -> str | None:
    """AdamW's state dict: per-parameter moments (finite; the second one >= 0) and groups."""
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups"}:
        return "optimizer must hold state and param_groups"
    moments, groups = optimizer["state"], optimizer["param_groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return "optimizer param_groups must be a list of tables with params"
    for group in groups:
        for key, value in group.items():
            if isinstance(value, float) and not math.isfinite(value):
                return f"optimizer param_groups {key} = {value}"
    if not isinstance(moments, dict):
        return "optimizer state must be a table"
    if step > 0 and not moments and any(g["params"] for g in groups):
        return f"no AdamW moments at step {step}"
    for name, entry in moments.items():
        if not isinstance(entry, dict) or not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
            return f"optimizer state of {name} lacks exp_avg, exp_avg_sq or step"
        if not all(isinstance(v, torch.Tensor) for v in entry.values()):
            return f"optimizer state of {name} holds a value that is no tensor"
        avg, avg_sq, count = entry["exp_avg"], entry["exp_avg_sq"], entry["step"]
        if avg.shape != avg_sq.shape or count.numel() != 1:
            return f"optimizer state of {name} has mismatched shapes"
        if not (avg.is_floating_point() and avg_sq.is_floating_point()):
            return f"optimizer moments of {name} are not floating point"
        if not (bool(torch.isfinite(avg).all()) and bool(torch.isfinite(avg_sq).all())):
            return f"optimizer moments of {name} hold NaN or infinity"
        if avg_sq.numel() and float(avg_sq.min()) < 0:
            return f"optimizer exp_avg_sq of {name} is negative (moments swapped?)"
        if not 0 <= float(count) <= step:
            return f"optimizer step of {name} is {float(count)}, outside [0, {step}]"
    return None
