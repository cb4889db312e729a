"""The Trainer: one loop for pretraining and every fine-tuning objective, on one CPU or many
GPUs, resumable to the bit.

What is trained comes from a Task: the model, its tokenizer, and (inputs, targets) batches
with -100 on unscored targets. PretrainTask (here) cuts windows from token shards; the
fine-tuning tasks (finetune.py) batch labelled examples. One optimizer step:
    for each of this rank's micro-batches m (of grad_accum, dealt out over the ranks):
        inputs, targets  <- task.train_batch(step, m)   (a pure function of seed, step, m)
        task.loss / n_micro  .backward()  (gradients all-reduced on the last micro-batch only)
    clip the gradient norm; AdamW step with the schedule's learning rate for this step

Everything a step depends on is either in the checkpoint (weights, AdamW moments, RNG states
of every rank) or a pure function of the step number (batches, corruption, learning rate), so
`--resume` after a SIGKILL continues exactly where the last checkpoint stood: on a CPU the
resumed run's weights are bit-identical to an unbroken run's.

Run directory (out_dir):
    checkpoint/          a gptkit checkpoint (loadable by gptkit.load) + train_state/
    metrics.jsonl        one JSON line per log step (train/loss, lr, tokens_per_s, mfu, ...)
    tensorboard/         the same scalars for TensorBoard
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from . import adalora, machine, onednn
from .checkpoint import (
    CheckpointError,
    check_tokenizer_fits,
    check_train_state_fits,
    is_checkpoint,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from .config import ConfigError
from .data import TokenData, batch_rng
from .distributed import Distributed, full_state, load_full_state, world_size
from .loading import load_trainable, resolve_device
from .metrics import MetricsLogger
from .model import GPT
from .objectives import make_objective
from .tokenizer import Tokenizer
from .tokenizer_files import load_tokenizer
from .train_config import TrainConfig
from .train_needs import check_training_memory, flops_per_token, uses_autocast

# inputs [B, T] token ids, targets [B, T] (-100: skip), then whatever else the task's loss takes
# (a preference task: the reference model's log-probabilities)
Batch = tuple[torch.Tensor, ...]

CHECKPOINT = "checkpoint"


@dataclass
class TrainResult:
    steps: int  # optimizer steps the model has taken in total
    seconds: float  # wall time of this call's training steps (evaluation and saving excluded)
    tokens_per_s: float  # training tokens per second, all ranks together
    ms_per_step: float  # median step time
    mfu: float  # model FLOPs utilisation per device, against its measured matmul peak
    train_loss: float  # mean loss of the last logged steps
    val_loss: float | None  # validation loss at the end (None when max_steps was already done)
    checkpoint: Path


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at decay_steps (nanoGPT's schedule,
    so recipes carry over)."""
    decay_steps = config.decay_steps or config.max_steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    if step > decay_steps:
        return config.min_lr
    ratio = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - config.min_lr)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """This device's matmul FLOP/s at `dtype`, so MFU means the same on a laptop CPU and an
    H100 without a table of vendor figures: the best of several short runs, cached per
    machine and torch version (machine.peak_flops)."""
    return machine.peak_flops(device, dtype)


class Task(Protocol):
    """What the Trainer trains. Batches must be pure functions of their arguments (and the
    seed), which is what makes a resumed run exact."""

    name: str  # shown on the progress bar
    tokenizer: Tokenizer
    causal: bool  # attention while training (False: the masked-LM objective)

    def build_model(self, device: torch.device) -> GPT: ...

    def train_batch(self, step: int, micro: int) -> Batch: ...

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]: ...

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    # Optional (preference.py has both):
    #   val_loss(model, *batch) -> (loss sum, count): the validation loss, when plain
    #     cross-entropy over the targets is not what the task minimises
    #   step_values() -> {name: tensor}: what to log beside the loss, averaged since the last
    #     log line


class PretrainTask:
    """Random windows of block_size + 1 tokens from a `gptkit prepare` directory, rearranged
    by the objective (lm / fim / mlm)."""

    name = "pretrain"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.train_data = TokenData(config.data_dir, "train")
        self.val_data = TokenData(config.data_dir, "val")
        self.tokenizer = load_tokenizer(Path(config.data_dir) / "tokenizer")
        self.objective = make_objective(config, self.tokenizer)
        self.causal = self.objective.causal
        self.block_size = 0  # the model's, known once it is built

    def build_model(self, device: torch.device) -> GPT:
        config = self.config
        if config.init_from:  # any model gptkit reads: checkpoint, HF, GGUF, named
            model = load_trainable(config.init_from, device).model.train()
        else:
            model_config = config.model_config(self.tokenizer.vocab_size)
            check_training_memory(model_config, config, device)  # before allocating
            model = GPT(model_config).to(device).train()
        self.block_size = model.config.block_size
        return model

    def train_batch(self, step: int, micro: int) -> Batch:
        rng = batch_rng(self.config.seed, step, micro)
        windows = self.train_data.random_windows(rng, self.config.batch_size, self.block_size)
        return self.objective.batch(windows, rng)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]:
        """The same windows every time (fim/mlm corrupt them with generators seeded by the
        batch index)."""
        c = self.config
        batches = self.val_data.eval_windows(
            c.batch_size, self.block_size, c.eval_batches, rank=rank, world_size=world_size
        )
        for b, windows in batches:
            yield self.objective.batch(windows, np.random.default_rng([c.seed, 1 << 32, b]))

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y, causal=self.causal)[1]


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        task: Task | None = None,
    ):
        self.config = config
        _check_machine(config)  # before torch acts on it: threads=100000 crashed libgomp
        if config.threads:
            torch.set_num_threads(config.threads)
        self.out = Path(config.out_dir)
        self.checkpoint_dir = self.out / CHECKPOINT
        if resume and not is_checkpoint(self.checkpoint_dir):
            raise ConfigError(
                f"--resume: no checkpoint in {self.out}; run without --resume to start a run"
            )
        if not resume and not overwrite and self.checkpoint_dir.exists():
            raise ConfigError(
                f"{self.out} already holds a checkpoint; pass --resume to continue it, "
                "--overwrite to start over, or choose another out_dir"
            )
        self.task = task or PretrainTask(config)
        self.tokenizer = self.task.tokenizer
        if config.grad_accum % world_size():
            raise ConfigError(
                f"grad_accum={config.grad_accum} must be a multiple of the "
                f"{world_size()} processes, so each takes the same share of a step"
            )
        # Only now join the other processes: a bad setting or missing data above ends every
        # rank with its one line (a rank still joining when another left got gloo's traceback).
        self.dist = Distributed.setup(config.device)

        device = self.dist.device
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = self.task.build_model(device)  # the plain GPT; self.wrapped runs forward
        # The weights are in memory now (a loaded or fine-tuned model is checked as it loads);
        # gradients, AdamW moments and activations are still to come.
        check_training_memory(
            self.model.config,
            config,
            device,
            # fine-tuning tasks know the longest example they batch; windows are block_size
            seq_len=getattr(self.task, "seq_len", None),
            rows_per_example=getattr(self.task, "rows_per_example", 1),
            trainable=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            weights_allocated=True,
        )
        check_tokenizer_fits(self.tokenizer, self.model.config)
        self.autocast = uses_autocast(config, device)
        # fp32 products through oneDNN where this machine measured it the faster library
        # (onednn.py); torch.compile picks its own kernels
        cpu_fp32 = device.type == "cpu" and not self.autocast and not config.compile
        if cpu_fp32 and onednn.wanted(config.cpu_matmul):
            onednn.use_onednn_linears(self.model)
        if config.compile:
            self.model.compile()  # in place: parameter names stay those of the plain model
        self.wrapped = self.dist.wrap(self.model, config.fsdp)
        self.optimizer = self._build_optimizer()
        peft = getattr(self.model, "peft", None)
        self.adalora = peft if peft is not None and peft.method == "adalora" else None

        self.step = 0
        torch.manual_seed(config.seed + self.dist.rank)  # dropout masks differ across ranks
        if resume:
            self._load_state()
        self.metrics = MetricsLogger(
            self.out, enabled=self.dist.is_main, tensorboard=config.tensorboard
        )
        self.metrics.resume(self.step)  # drop lines a killed run logged after its checkpoint
        # FLOPs per token = dense + attention x sequence length (see flops_per_token)
        self.dense_flops = flops_per_token(self.model, 0)
        self.attention_flops = flops_per_token(self.model, 1) - self.dense_flops
        self.step_flops = 0.0  # this rank's FLOPs in the last train_step
        self.peak_dtype = torch.bfloat16 if self.autocast else torch.float32
        self.peak_flops = measure_peak_flops(device, self.peak_dtype)

    # -- setup ---------------------------------------------------------------------------

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices (and embeddings), none on biases and norm gains."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for p in params if p.dim() >= 2],
                "weight_decay": self.config.weight_decay,
            },
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel (one launch for all tensors) exists for CPU and CUDA; FSDP's sharded
        # parameters take the default multi-tensor path.
        fused = not (self.config.fsdp and self.dist.enabled)
        return torch.optim.AdamW(
            groups,
            lr=self.config.lr,
            betas=(self.config.beta1, self.config.beta2),
            fused=fused or None,
        )

    # -- checkpoints -----------------------------------------------------------------------

    def save(self, val_loss: float | None) -> Path:
        """Write checkpoint/ (atomically; rank 0 writes, every rank helps gather)."""
        model_state, optim_state = full_state(self.wrapped, self.optimizer)
        rng = self.dist.gather(_rng_state())
        if self.dist.is_main:
            train_state = {"step": self.step, "optimizer": optim_state, "rng": rng}
            extra = {
                "train": {
                    "step": self.step,
                    "objective": self.config.objective,
                    "val_loss": val_loss,
                    "config": self.config.to_dict(),
                }
            }
            save_checkpoint(
                self.checkpoint_dir,
                self.model,
                self.tokenizer,
                extra=extra,
                train_state=train_state,
                state=model_state,
            )
        self.metrics.flush()  # TensorBoard buffers events; land them with the checkpoint
        self.dist.barrier()
        return self.checkpoint_dir

    def _load_state(self) -> None:
        # First the state: its manifest vouches for the weights read next (safetensors + JSON,
        # every field checked, nothing to execute).
        state = load_train_state(self.checkpoint_dir)
        model, _, _ = load_checkpoint(self.checkpoint_dir)
        if model.config != self.model.config:
            raise CheckpointError(
                f"{self.checkpoint_dir} holds a different model shape than this config; "
                "resume with the config that started the run"
            )
        check_train_state_fits(state, self.model, str(self.checkpoint_dir))
        load_full_state(self.wrapped, self.optimizer, model.state_dict(), state["optimizer"])
        self.step = state["step"]
        if len(state["rng"]) == self.dist.world_size:  # else: dropout masks start afresh
            cpu, cuda = state["rng"][self.dist.rank]
            torch.set_rng_state(cpu)
            if cuda is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(cuda)

    # -- the loop --------------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, int]:
        """One optimizer step; returns this step's mean loss over this rank's micro-batches
        and the number of input tokens (padding included) it processed."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, config)
        micros = range(self.dist.rank, config.grad_accum, self.dist.world_size)
        total = torch.zeros((), device=self.dist.device)
        tokens, self.step_flops = 0, 0.0
        for i, m in enumerate(micros):
            x, y, *extra = (t.to(self.dist.device) for t in self.task.train_batch(self.step, m))
            with self.dist.sync_gradients(self.wrapped, i == len(micros) - 1), self._autocast():
                loss = self.task.loss(self.wrapped, x, y, *extra)
            scaled = loss / len(micros)
            if self.adalora and i == len(micros) - 1:  # once per step, with the synced micro
                reg = adalora.penalty(self.model, self.adalora.orth_reg)
                scaled = scaled if reg is None else scaled + reg
            scaled.backward()
            total += loss.detach()
            tokens += x.numel()
            self.step_flops += x.numel() * (self.dense_flops + self.attention_flops * x.shape[-1])
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.adalora:  # scores the triplets from this step's gradients, so before zero_grad
            schedule = config.decay_steps or config.max_steps  # the learning rate's
            adalora.allocate(self.model, self.step, schedule, self.adalora)
        self.optimizer.zero_grad(set_to_none=True)
        return total / len(micros), tokens * self.dist.world_size

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy per scored target over the task's validation batches (plain
        cross-entropy for every task, so distillation's val loss compares with the others),
        or the task's own val_loss (a preference loss per pair)."""
        self.wrapped.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.dist.device)
        val_loss = getattr(self.task, "val_loss", None)
        for batch in self.task.eval_batches(self.dist.rank, self.dist.world_size):
            x, y, *extra = (t.to(self.dist.device) for t in batch)
            with self._autocast():
                if val_loss is not None:
                    loss_sum, n = val_loss(self.wrapped, x, y, *extra)
                else:
                    _, loss = self.wrapped(x, y, causal=self.task.causal)
                    n = (y != -100).sum()
                    loss_sum = loss.double() * n
            total += torch.stack([loss_sum.double(), n.double()])
        self.wrapped.train()
        loss_sum, count = self.dist.sum(total).tolist()
        return loss_sum / count

    def fit(self) -> TrainResult:
        config, is_main = self.config, self.dist.is_main
        bar = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc=self.task.name,
            unit="step",
            disable=not (config.progress and is_main),
        )
        times: list[float] = []  # seconds of each training step (evaluation, saving excluded)
        tokens: list[int] = []  # input tokens of each training step
        flops: list[float] = []  # this rank's FLOPs of each training step
        window: list[torch.Tensor] = []  # losses since the last log line
        train_loss, val_loss = math.nan, None
        while self.step < config.max_steps:
            start = time.perf_counter()
            loss, n_tokens = self.train_step()
            window.append(loss)
            tokens.append(n_tokens)
            flops.append(self.step_flops)
            done = self.step
            last = done == config.max_steps
            logging = last or done % max(1, config.log_every) == 0
            if logging:  # .item() waits for the device, so the step time includes its work
                train_loss = self.dist.mean(torch.stack(window).mean()).item()
            times.append(time.perf_counter() - start)
            bar.update(1)
            if logging:
                tok_s = sum(tokens[-len(window) :]) / sum(times[-len(window) :])
                mfu = self._mfu(sum(flops[-len(window) :]) / sum(times[-len(window) :]))
                lr = lr_at(done - 1, config)
                values = {"train/loss": train_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu}
                self.metrics.log(done, values | self._task_values())
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
                window = []
            if last or (config.eval_every and done % config.eval_every == 0):
                val_loss = self.evaluate()
                line, values = f"step {done}: val loss {val_loss:.4f}", {"val/loss": val_loss}
                if not hasattr(self.task, "val_loss"):  # a cross-entropy: its perplexity too
                    values["val/ppl"] = math.exp(val_loss)
                    line += f", ppl {values['val/ppl']:.2f}"
                self.metrics.log(done, values)
                if is_main:
                    bar.write(line)
            if last or (config.checkpoint_every and done % config.checkpoint_every == 0):
                self.save(val_loss)
        if self.adalora and is_main:
            bar.write("AdaLoRA ranks after the run:\n" + adalora.describe_ranks(self.model))
        bar.close()
        self.metrics.close()
        seconds = sum(times)
        tokens_per_s = sum(tokens) / seconds if seconds else 0.0
        return TrainResult(
            steps=self.step,
            seconds=seconds,
            tokens_per_s=tokens_per_s,
            ms_per_step=1000 * median(times) if times else 0.0,
            mfu=self._mfu(sum(flops) / seconds if seconds else 0.0),
            train_loss=train_loss,
            val_loss=val_loss,
            checkpoint=self.checkpoint_dir,
        )

    def _task_values(self) -> dict[str, float]:
        """What the task logs beside its loss (DPO: its rewards; AdaLoRA: the mean rank),
        averaged over the ranks."""
        report = getattr(self.task, "step_values", None)
        values = report() if report is not None else {}
        if self.adalora:
            ranks = list(adalora.ranks(self.model).values())
            values["adalora/mean_rank"] = torch.tensor(
                sum(ranks) / len(ranks), device=self.dist.device
            )
        if not values:
            return {}
        means = self.dist.mean(torch.stack(list(values.values())).to(self.dist.device))
        return dict(zip(values, means.tolist(), strict=True))

    def _mfu(self, flops_per_s: float) -> float:
        """This rank's model FLOP/s over the device's matmul peak, never above 1: a step that
        did more than the peak shows the peak was measured low (a busy moment), so it raises
        the peak (and the cached one) instead of showing a ratio that means nothing."""
        if flops_per_s > self.peak_flops:
            self.peak_flops = machine.raise_peak(self.dist.device, self.peak_dtype, flops_per_s)
        return flops_per_s / self.peak_flops


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Pretrain as `config` says (under torchrun: on every rank); returns rank-local numbers."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    result = trainer.fit()
    trainer.dist.finish()  # only after success: see Distributed.finish
    return result


def _check_machine(config: TrainConfig) -> None:
    """ConfigError for settings this machine cannot honour: more threads than CPU cores (torch
    would start them all; 100000 crashed OpenMP), a device it does not have, or oneDNN's
    products from a torch built without them."""
    cores = os.cpu_count() or 1
    if config.threads > cores:
        raise ConfigError(
            f"threads={config.threads}, but this machine has {cores} CPU cores; use at most "
            f"{cores} (0: torch's default)"
        )
    if config.device != "auto":
        resolve_device(config.device)  # an unknown name, or a GPU that is not there
    if config.cpu_matmul == "onednn" and not machine.can_pack():
        raise ConfigError("cpu_matmul=onednn: this torch has no oneDNN linear; use auto or torch")


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda
