"""Running under torchrun: process group, device, DDP/FSDP wrapping, full state dicts.

gptkit has no distributed layer of its own: torchrun starts the processes and sets RANK,
LOCAL_RANK and WORLD_SIZE; PyTorch's DistributedDataParallel replicates the model (gradients
all-reduced), and FSDP2's `fully_shard` shards parameters, gradients and optimizer state
across ranks for models that do not fit one device. Without torchrun everything here is a
single process and the wrappers are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str) -> Distributed:
        """Join torchrun's process group (if launched by torchrun) and pick this rank's device:
        `device` = "auto" takes cuda:LOCAL_RANK when CUDA is there, else the CPU."""
        size = world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and size > 1:
            device = f"cuda:{local_rank}"
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        rank = dist.get_rank() if size > 1 else 0
        return cls(rank, size, dev)

    def wrap(self, model: nn.Module, fsdp: bool) -> nn.Module:
        """DDP (replicated) or FSDP2 (each block, then the root, sharded) under torchrun."""
        if not self.enabled:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            return fully_shard(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sync_gradients(self, model: nn.Module, sync: bool):
        """Context for one micro-batch's backward: only the last of a step all-reduces."""
        if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a tensor over ranks (a copy; the input is left alone)."""
        if self.enabled:
            value = value.detach().clone()
            dist.all_reduce(value)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.sum(value) / self.world_size

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, on every rank (e.g. per-rank RNG states for a checkpoint)."""
        if not self.enabled:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def finish(self) -> None:
        """Meet the other ranks at the end of a run that succeeded on this rank, so none leaves
        while another still talks to it. After an error do not call this (a rank that died
        never comes): the process exits and torchrun ends the job.

        The group is not destroyed here. PyTorch 2.13's gloo group joins its worker threads
        in its destructor while the caller holds the GIL, and a worker may at that moment be
        freeing the last collectives' tensors, which needs the GIL: a deadlock (gdb showed
        `~ProcessGroupGloo` in `thread.join` against a gloo thread in `gil_scoped_acquire`).
        The group lives until the process ends; `end_worker` ends the CLI's processes
        without tearing it down (a script calling `train` under torchrun can end so too).
        """
        self.barrier()


def world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def torchrun_worker() -> bool:
    """Whether this process is one of several that torchrun started."""
    return world_size() > 1


def end_worker(code: int) -> NoReturn:
    """End a torchrun worker now, with `code`: flush what it printed and skip the interpreter's
    teardown, which would destroy the process group (see Distributed.finish). Its files are
    closed by then (checkpoints are written to a temporary folder and renamed, logs closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts on the CPU, keyed by parameter name (the same
    for a plain module, DDP and FSDP). A collective: every rank must call it."""
    return get_state_dict(model, optimizer, options=_FULL)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """The inverse of full_state: every rank passes the full dicts, each keeps its shard."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )
