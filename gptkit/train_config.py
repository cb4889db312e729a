"""Typed configuration of a run: pretraining (TrainConfig, read from TOML with key=value
overrides), fine-tuning (FinetuneConfig) and its parameter-efficient method (PeftConfig).
Every value is checked when the config is made, so a bad one fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import (
    ConfigError,
    GPTConfig,
    check_keys,
    first_line,
    preset,
)
from .safeload import MetadataError, check_depth, read_toml

Objective = Literal["lm", "fim", "mlm"]
DEFAULT_MODEL = {"preset": "small"}


@dataclass
class TrainConfig:
    """One pretraining run: data, model, optimizer, schedule, evaluation, checkpoints.

    Batch sizes are counted in micro-batches: one optimizer step sums the gradients of
    `grad_accum` micro-batches of `batch_size` windows. Under torchrun the micro-batches of a
    step are dealt out to the ranks (grad_accum must be a multiple of the world size), so a
    step sees the same tokens whatever the number of processes.
    """

    data_dir: str = ""  # a `gptkit prepare` output directory
    out_dir: str = "runs/pretrain"  # checkpoint/, metrics.jsonl, tensorboard/, loss.png
    # "preset" names a PRESETS entry; the other keys override GPTConfig fields. vocab_size
    # defaults to the data's tokenizer.
    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_MODEL))
    init_from: str | None = None  # start from this checkpoint's weights instead of random
    objective: Objective = "lm"
    fim_rate: float = 0.5  # fim: share of windows rearranged to prefix/suffix/middle
    mask_rate: float = 0.15  # mlm: share of tokens to predict (BERT: 80/10/10 corruption)

    batch_size: int = 12  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay ends here
    warmup_steps: int = 100
    decay_steps: int | None = None  # where the cosine reaches min_lr (default: max_steps)
    weight_decay: float = 0.1  # on matrices and embeddings; biases and norm gains get none
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off

    eval_every: int = 250  # steps between validation passes (0: only at the end)
    eval_batches: int = 100  # validation batches per pass (0: the whole val split)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end)
    log_every: int = 10  # steps between metrics lines

    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU; or float32, bfloat16
    compile: bool = False  # torch.compile the model
    # CPU fp32 linear layers: auto (the library this machine runs faster, measured once:
    # onednn.py), onednn, or torch (F.linear, MKL)
    cpu_matmul: str = "auto"
    fsdp: bool = False  # under torchrun: shard parameters (FSDP2) instead of replicating (DDP)
    threads: int = 0  # CPU threads for torch (0: torch's default)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self, optional={"init_from": str, "decay_steps": int})
        if not self.data_dir:
            raise ConfigError("data_dir is not set: point it at a `gptkit prepare` output")
        self._validate_training()

    def _validate_training(self) -> None:
        if not self.out_dir.strip():  # "" would write the run into the current directory
            raise ConfigError('out_dir is empty; name the run directory (out_dir="runs/x")')
        positive = ("batch_size", "grad_accum", "max_steps")
        non_negative = ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (*non_negative, "log_every", "threads", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 < lr and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.objective not in self.objectives():
            raise ConfigError(f"objective={self.objective!r} is not one of {self.objectives()}")
        for name in ("fim_rate", "mask_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32 or bfloat16")
        if self.cpu_matmul not in ("auto", "onednn", "torch"):
            raise ConfigError(f"cpu_matmul={self.cpu_matmul!r}: use auto, onednn or torch")
        clash = "compile=true" if self.compile else "dtype=bfloat16"
        if self.cpu_matmul == "onednn" and (self.compile or self.dtype == "bfloat16"):
            raise ConfigError(
                f"cpu_matmul=onednn is for fp32 eager training, not {clash}; drop one of them "
                "or use cpu_matmul=auto"
            )

    @staticmethod
    def objectives() -> tuple[str, ...]:
        return Objective.__args__

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        check_keys(cls, d, "training config")
        d = dict(d)
        if isinstance(d.get("model"), dict):
            check_keys(GPTConfig, d["model"], "model config", extra={"preset"}, prefix="model.")
        if isinstance(d.get("peft"), dict):
            d["peft"] = PeftConfig.from_dict(d["peft"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig this run trains: the preset, the overrides, the data's vocabulary."""
        keys = dict(self.model)
        name = keys.pop("preset", None)
        keys.setdefault("vocab_size", vocab_size)
        return preset(name, **keys) if name else GPTConfig.from_dict(keys)


def _check_types(config: Any, optional: dict[str, type]) -> None:
    """TOML and overrides can hold any type: compare each value with its default's type (an
    int is fine where a float is expected; a bool is not a number here). `optional` gives the
    type of fields whose default is None."""
    for f in dataclasses.fields(config):
        default = f.default_factory() if callable(f.default_factory) else f.default
        value = getattr(config, f.name)
        if value is None and f.name in optional:
            continue
        kind = optional.get(f.name) or type(default)
        if not (type(value) is kind or (kind is float and type(value) is int)):
            names = {dict: "table", PeftConfig: "table", str: "string", int: "integer"}
            name = names.get(kind, kind.__name__)
            article = "an" if name[0] in "aeiou" else "a"
            raise ConfigError(f"{f.name} must be {article} {name}, got {value!r}")
        if kind is float and not math.isfinite(value):  # NaN passes every range check
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


PeftMethod = Literal["none", "lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt"]


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: which small modules to add and train (peft.py).

    lora     W x + (alpha / r) B A x on the target linear layers (Hu et al. 2021)
    dora     LoRA's update, each output row then rescaled to a learned magnitude (Liu et al. 2024)
    adalora  LoRA in SVD form whose ranks move to the layers that matter, from r down to
             target_r on average (Zhang et al. 2023)
    ia3      learned vectors rescaling each layer's keys, values and MLP hidden units
             (Liu et al. 2022)
    adapter  a bottleneck MLP after each sublayer's output projection (Houlsby et al. 2019)
    prefix   learned keys and values before every layer's sequence (Li & Liang 2021); the deep
             prompts of P-tuning v2 (Liu et al. 2022)
    prompt   learned input embeddings before every sequence: prompt tuning (Lester et al. 2021)
    Every other weight is frozen; a classify or tag head is trained too. quantize="int8" keeps
    the frozen linear layers in int8 (QLoRA's idea on a CPU): a quarter of their memory.
    """

    method: PeftMethod = "none"
    r: int = 8  # lora, dora: rank of the update B A; adalora: each layer's starting rank
    alpha: float = 16.0  # lora, dora, adalora: the update is scaled by alpha / r
    dropout: float = 0.0  # lora, dora, adalora: dropout on the update's input
    # lora, dora, adalora: linear layers to adapt, matched against the end of their names
    targets: list[str] = field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    )
    adapter_size: int = 64  # adapter: bottleneck width
    prefix_length: int = 16  # prefix: learned key/value positions per layer; prompt: embeddings
    # adalora: the mean rank to end with; steps at full rank first and at the final ranks
    # last (between them the budget falls as a cube); steps between reallocations; the weight
    # of the penalty that keeps the singular vectors orthogonal
    target_r: int = 4
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg: float = 0.5
    quantize: Literal["none", "int8"] = "none"  # the frozen linear layers' storage

    def __post_init__(self) -> None:
        _check_types(self, optional={})
        if self.method not in PeftMethod.__args__:
            raise ConfigError(f"peft.method={self.method!r} is not one of {PeftMethod.__args__}")
        for name in ("r", "adapter_size", "prefix_length", "target_r", "delta_t"):
            if getattr(self, name) < 1:
                raise ConfigError(f"peft.{name} must be >= 1, got {getattr(self, name)}")
        if self.method == "adalora" and self.target_r > self.r:
            raise ConfigError(f"peft.target_r={self.target_r} must be <= peft.r={self.r}")
        for name in ("tinit", "tfinal", "orth_reg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"peft.{name} must be >= 0, got {getattr(self, name)}")
        if self.quantize not in ("none", "int8"):
            raise ConfigError(f"peft.quantize={self.quantize!r} is not one of ('none', 'int8')")
        if self.quantize != "none" and self.method == "none":
            raise ConfigError(
                "peft.quantize=int8 stores the frozen base under a parameter-efficient method; "
                "set peft.method (e.g. lora): full fine-tuning trains every weight in float32"
            )
        if self.quantize != "none" and self.method == "dora":
            raise ConfigError(
                "peft.quantize=int8 needs the base weights as they are; DoRA "
                "renormalises them every step: use lora or adalora"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"peft.targets must name linear layers, got {self.targets!r}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def prompt_positions(self) -> int:
        """Positions a soft prompt takes from the model's context (prompt tuning only)."""
        return self.prefix_length if self.method == "prompt" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftConfig:
        check_keys(cls, d, "peft config", prefix="peft.")
        return cls(**d)


FinetuneObjective = Literal["lm", "sft", "classify", "tag", "rank", "distill", "reward", "dpo"]
PreferenceLoss = Literal["sigmoid", "hinge", "ipo"]


@dataclass
class FinetuneConfig(TrainConfig):
    """One fine-tuning run: a pretrained model (init_from), task data, an objective, and
    optionally a parameter-efficient method; trained by the same Trainer as pretraining.

    lm        continued pretraining on text (files, or a `gptkit prepare` directory)
    sft       chat / instruction data; loss on the assistant's tokens only
    classify  one label per text, read at its last token
    tag       one label per word (CoNLL, CoNLL-U, IOB2)
    rank      P(a user picks an item next) from their history (recsys.py: RecBole files)
    distill   the student learns a teacher's temperature-softened outputs plus the hard
              labels, on `distill_on` data
    reward    a scalar reward head, trained on preference pairs (preference.py)
    dpo       direct preference optimisation on preference pairs (preference.py)
    """

    out_dir: str = "runs/finetune"
    objective: FinetuneObjective = "sft"
    data: str = ""  # training examples (file or directory)
    val_data: str = ""  # held-out examples; "" holds out val_fraction of `data`
    val_fraction: float = 0.1
    text_field: str = "text"  # classify: the columns/keys holding the text and the label
    label_field: str = "label"
    # tag: the columns (from 0) of the words and the tags; None finds them from the data
    word_column: int | None = None
    tag_column: int | None = None
    template: str = "auto"  # sft: "auto" (the tokenizer's chat template, else ChatML) or "chatml"
    packing: bool = False  # sft: concatenate examples into full-length rows
    # sft: an index (`gptkit index`); each example's last user turn gets retrieval_k sources in
    # its prompt, as `chat --retrieval` / `serve --retrieval` put them (rag.py)
    retrieval: str = ""
    retrieval_k: int = 3
    # rank: unseen items drawn as "no" per real next item; history items in the context; each
    # user's last rank_per_user positions only (0: all of them)
    rank_negatives: int = 4
    rank_history: int = 10
    rank_per_user: int = 0
    rank_popular: bool = False  # rank: each candidate's text says how many users had it
    epochs: float = 0.0  # > 0: max_steps covers this many passes over the training examples
    peft: PeftConfig = field(default_factory=PeftConfig)
    teacher: str | None = None  # distill: the teacher model (same tokenizer / labels)
    distill_on: FinetuneObjective = "lm"  # distill: the data the student learns from
    temperature: float = 2.0  # distill: softens both distributions (Hinton et al. 2015)
    distill_alpha: float = 0.5  # distill: weight of the soft loss; 1 - alpha on the hard labels
    # dpo: how far the policy may move from the reference, and the loss on its reward margin
    beta: float = 0.1
    loss_type: PreferenceLoss = "sigmoid"
    # reward, dpo: prompt + reply tokens per row; a longer prompt keeps its last
    # max_prompt_length tokens (0: half of max_length), each reply is cut to fit
    max_length: int = 1024
    max_prompt_length: int = 0

    # fine-tuning defaults: a gentle learning rate and short runs
    batch_size: int = 8
    max_steps: int = 200
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 0  # val batches for the loss and the final accuracy/F1 (0: all of val)
    checkpoint_every: int = 0
    log_every: int = 5

    def validate(self) -> None:
        optional = {
            "init_from": str,
            "decay_steps": int,
            "teacher": str,
            "word_column": int,
            "tag_column": int,
        }
        _check_types(self, optional)
        if not self.init_from:
            raise ConfigError(
                "init_from is not set: name the model to fine-tune (a gptkit checkpoint, a "
                "Hugging Face directory or hub name, a .gguf file, or a named model)"
            )
        if not self.data:
            raise ConfigError("data is not set: point it at the training examples")
        if self.model != DEFAULT_MODEL:
            raise ConfigError(
                "model.* keys do not apply to fine-tuning: the model and its shape come from "
                "init_from"
            )
        if self.objective == "distill":
            if not self.teacher:
                raise ConfigError("objective 'distill' needs teacher= (the teacher model)")
            if self.distill_on in ("distill", "reward", "dpo"):
                raise ConfigError("distill_on names the data: lm, sft, classify or tag")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.template not in ("auto", "chatml"):
            raise ConfigError(f"template={self.template!r}: use auto or chatml")
        if self.temperature <= 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigError("need temperature > 0 and distill_alpha in [0, 1]")
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.retrieval and self.task != "sft":
            raise ConfigError("retrieval= puts sources in chat prompts: it is for sft data only")
        if self.rank_negatives < 1 or self.rank_history < 1 or self.rank_per_user < 0:
            raise ConfigError("need rank_negatives >= 1, rank_history >= 1, rank_per_user >= 0")
        if self.retrieval_k < 1:
            raise ConfigError(f"retrieval_k must be >= 1, got {self.retrieval_k}")
        if self.loss_type not in PreferenceLoss.__args__:
            raise ConfigError(f"loss_type={self.loss_type!r}: use one of {PreferenceLoss.__args__}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.max_length < 2 or not 0 <= self.max_prompt_length < self.max_length:
            raise ConfigError("need max_length >= 2 and 0 <= max_prompt_length < max_length")
        if self.peft.method == "adalora":
            if self.fsdp:
                raise ConfigError(
                    "AdaLoRA scores whole adapter matrices; FSDP shards them: use DDP"
                )
            schedule = self.decay_steps or self.max_steps
            if self.peft.tinit + self.peft.tfinal >= schedule:
                raise ConfigError(
                    f"peft.tinit + peft.tfinal must be < the {schedule} scheduled steps, so the "
                    "rank budget has steps to fall in"
                )
        self._validate_training()

    @staticmethod
    def objectives() -> tuple[str, ...]:
        return FinetuneObjective.__args__

    @property
    def task(self) -> str:
        """The kind of data and head: distill's is that of distill_on."""
        return self.distill_on if self.objective == "distill" else self.objective


def load_train_config(
    path: str | Path | None, overrides: Sequence[str] = (), cls: type[TrainConfig] = TrainConfig
) -> TrainConfig:
    """A TrainConfig (or `cls`) from a TOML file (or none) plus `key=value` overrides.

    Override values are read as TOML values (`lr=3e-4`, `compile=true`, `model.n_layer=6`);
    anything that is not a valid TOML value is taken as a string (`out_dir=runs/x`).
    """
    d: dict[str, Any] = {}
    if path is not None:
        try:
            d = read_toml(path)  # size- and depth-bounded, a regular file: see safeload.py
        except FileNotFoundError:
            raise ConfigError(f"{path} not found") from None
        except MetadataError as e:
            raise ConfigError(first_line(e)) from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. lr=3e-4)")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
            check_depth(value, f"override {key}")
        except tomllib.TOMLDecodeError:
            value = text
        except (RecursionError, MetadataError):
            raise ConfigError(f"override {key}: its value nests too deep") from None
        *tables, leaf = key.strip().split(".")
        target = d
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {table} is not a table")
        target[leaf] = value
    return cls.from_dict(d)
