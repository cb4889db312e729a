"""Fine-tuning: task data -> (inputs, targets) examples -> the one Trainer.

Every objective is a loss over (inputs, targets) batches, with -100 where nothing is scored, so
the Trainer needs no per-objective loop; all but the preference ones are cross-entropy:

    lm        token windows from text (continued pretraining; PretrainTask)
    sft       a conversation rendered with its chat template; targets only on the assistant's
              tokens (each reply and its end-of-turn token), so the model learns to answer,
              not to write prompts
    classify  the text, then EOS; the label is the target at the last token (GPT-1 reads the
              class off the final position the same way). label_field=topic,sentiment
              trains one head per field on the shared body, their losses summed
    tag       the words, space-separated; each word's tag is the target at its LAST sub-token,
              the first position of a causal model that has seen the whole word
    distill   any of the above, with the loss mixing the teacher's softened distribution
              (Hinton et al. 2015) and the hard targets
    reward    preference pairs, scored at the last token by a one-output head;
    dpo       preference pairs, by the policy's log-probabilities against its starting self:
              both in preference.py, whose batches carry a pair as two rows

Batches are drawn from a seeded permutation per epoch, indexed by (step, micro-batch), so a
resumed run sees exactly the batches an unbroken one would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .config import ConfigError
from .evaluate import classify_report, save_results, tagging_metrics
from .examples import (
    IGNORE,
    EpochOrder,
    Example,
    chat_example,
    classification_example,
    collate,
    pack,
    split_val,
    tagging_example,
)
from .loading import Pretrained, load_pretrained, load_trainable
from .model import GPT
from .peft import apply_peft, input_room, save_adapter
from .predict import batched_logits, predict_labels, predict_tags
from .preference import PreferenceTask
from .prepare import prepare
from .recommend import RANK_LABELS, rank_example
from .recsys import read_interactions, train_records
from .surgery import fit_chat_template, set_head
from .tagging import check_tags, read_tagged_file
from .taskdata import label_names, read_chat, read_labelled
from .train import Batch, PretrainTask, Trainer, TrainResult
from .train_config import FinetuneConfig

# -- tasks ---------------------------------------------------------------------------------


class ExampleTask:
    """sft / classify / tag: a list of examples, batched by a seeded permutation per epoch."""

    causal = True

    def __init__(self, config: FinetuneConfig, lm: Pretrained):
        self.config = config
        self.name = config.objective
        self.model, self.tokenizer = lm.model, lm.tokenizer
        kind = config.task
        self.fields = [f.strip() for f in config.label_field.split(",")]
        if kind == "sft":
            self.template, self.tokenizer = fit_chat_template(
                self.model, self.tokenizer, config.template
            )
        # positions an example may take (a soft prompt, applied later, takes some)
        self.context = input_room(self.model, config.peft)
        train, val = split_val(self._read(config.data), self._read, config)
        if kind in ("classify", "tag", "rank"):
            self._set_labels(train + val)
        self.records = {"train": train, "val": val}  # the raw records, for val metrics
        self.train = [e for e in map(self._encode, train) if e is not None]
        self.val = [e for e in map(self._encode, val) if e is not None]
        if config.packing and kind == "sft":
            self.train = pack(self.train, self.context)
        if not self.train:
            raise ConfigError(f"{config.data}: no training example fits the model's context")
        # The longest row a batch can hold (batches pad to their longest): what the memory
        # guard counts activations at, rather than the model's whole context.
        self.seq_len = max(len(e.ids) for e in self.train + self.val)
        self.pad_id = self.tokenizer.pad_id or 0
        self.order = EpochOrder(len(self.train), config.seed)

    # data preparation --------------------------------------------------------------------

    def _read(self, path: str) -> list[Any]:
        c = self.config
        if c.task == "sft":
            return self._grounded(read_chat(path)) if c.retrieval else read_chat(path)
        if c.task == "classify":
            return read_labelled(path, c.text_field, self.fields)
        if c.task == "rank":  # (context, candidate, "yes" | "no") from each user's history
            data = read_interactions(path)
            records = train_records(
                data, c.rank_negatives, c.rank_history, c.rank_per_user, c.seed, c.rank_popular
            )
            return [((context, candidate), (label,)) for context, candidate, label in records]
        tagged = read_tagged_file(path, word_column=c.word_column, tag_column=c.tag_column)
        check_tags(tagged)  # words or "-" as tags: refuse before training on them
        return tagged.sentences

    def _grounded(self, chats: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
        """Each conversation with sources for its last user turn in its system message, as
        `serve --retrieval` builds prompts, so the model learns to answer from numbered
        sources and cite them. Every example gets k sources, relevant or not (no threshold):
        it also learns to pass over sources that do not answer."""
        from .rag import RetrievalConfig, Retriever, grounded_messages
        from .rag_index import Index

        settings = RetrievalConfig(k=self.config.retrieval_k, min_score=-1.0)
        retriever = Retriever(Index.open(self.config.retrieval), settings)
        return [grounded_messages(chat, retriever.retrieve(chat)) for chat in chats]

    def _encode(self, record: Any) -> Example | None:
        tok, block_size = self.tokenizer, self.context
        if self.config.task == "sft":
            return chat_example(tok, record, self.template, block_size)
        if self.config.task == "classify":
            text, labels = record
            ids = [
                IGNORE if label is None else self.label_ids[k][label]  # a field it lacks
                for k, label in enumerate(labels)
            ]
            return classification_example(tok, text, ids[0] if len(ids) == 1 else ids, block_size)
        if self.config.task == "rank":
            (context, candidate), (label,) = record
            return rank_example(tok, context, candidate, RANK_LABELS.index(label), block_size)
        words, tags = record
        return tagging_example(tok, words, [self.label_ids[0][t] for t in tags], block_size)

    def _set_labels(self, records: list[Any]) -> None:
        """self.groups: (field, its labels) per field; self.label_ids: label -> id per field."""
        kind, config = self.config.task, self.model.config
        if kind == "rank":  # a classifier of two fixed labels, in this order
            names, found, kind = ["label"], [list(RANK_LABELS)], "classify"
        elif kind == "classify":
            names = self.fields
            found = [
                label_names(r[1][k] for r in records if r[1][k] is not None)
                for k in range(len(names))
            ]
        else:
            names, found = ["label"], [label_names(t for r in records for t in r[1])]
        self.groups = list(zip(names, found, strict=True))
        if config.head == kind:  # fine-tuning a classifier / tagger further: keep its labels
            theirs = config.label_groups()
            if len(theirs) != len(names) or (len(names) > 1 and [f for f, _ in theirs] != names):
                fields = [f for f, _ in theirs]
                raise ConfigError(f"the model predicts the fields {fields}; set label_field= so")
            for (_, mine), (_, labels) in zip(self.groups, theirs, strict=True):
                unknown = sorted(set(mine) - set(labels))
                if unknown:
                    raise ConfigError(f"labels {unknown} are not among the model's {labels}")
            self.groups = theirs
        elif config.head != "lm":
            raise ConfigError(f"{self.config.init_from} has a {config.head} head, not {kind}")
        self.label_ids = [{name: i for i, name in enumerate(labels)} for _, labels in self.groups]

    # Task ----------------------------------------------------------------------------------

    def build_model(self, device: torch.device) -> GPT:
        """The model with its new head (initialised here, from the Trainer's seed) and the
        parameter-efficient method applied."""
        task = self.config.task
        if task in ("classify", "tag", "rank") and self.model.config.head == "lm":
            labels = [name for _, names in self.groups for name in names]
            fields = [f for f, _ in self.groups] if task == "classify" else []
            sizes = [len(names) for _, names in self.groups] if fields else []
            set_head(self.model, "tag" if task == "tag" else "classify", labels, fields, sizes)
        return apply_peft(self.model.to(device).train(), self.config.peft)

    def epoch_size(self) -> int:
        return len(self.train)

    def train_batch(self, step: int, micro: int) -> Batch:
        B = self.config.batch_size
        start = (step * self.config.grad_accum + micro) * B
        return collate([self.train[i] for i in self.order.rows(start, B)], self.pad_id)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]:
        """The first eval_batches * batch_size val examples (all when 0), in batches of
        similar lengths (less padding)."""
        B, limit = self.config.batch_size, self.config.eval_batches
        val = sorted(self.val[: limit * B or None], key=lambda e: len(e.ids))
        for b, start in enumerate(range(0, len(val), B)):
            if b % world_size == rank:
                yield collate(val[start : start + B], self.pad_id)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)[1]

    def val_metrics(self, model: GPT) -> dict[str, float]:
        """Accuracy / macro-F1 (classify; per field as FIELD_accuracy ... when there are
        several) or entity F1 and token accuracy (tag) on the first eval_batches *
        batch_size val records, as the val loss (all of them when eval_batches is 0)."""
        val = self.records["val"][: self.config.eval_batches * self.config.batch_size or None]
        if self.config.task == "rank":  # yes/no accuracy of the rows as encoded
            rows = self.val[: len(val)]
            logits = batched_logits(model, rows, self.pad_id, 32)
            pred = [model.config.labels[int(t[-1].argmax())] for t in logits]
            return classify_report({"label": pred}, [(RANK_LABELS[e.targets[-1]],) for e in rows])
        if self.config.task == "classify":
            pred = predict_labels(model, self.tokenizer, [text for text, _ in val])
            return classify_report(pred, [labels for _, labels in val])
        pred = predict_tags(model, self.tokenizer, [words for words, _ in val])
        return tagging_metrics([tags for _, tags in val], pred)


class TextTask(PretrainTask):
    """Continued pretraining (objective lm): token windows from text, starting from `lm`."""

    def __init__(self, config: FinetuneConfig, lm: Pretrained):
        data = Path(config.data)
        if not (data / "meta.json").is_file():  # text: prepare it with the model's tokenizer
            data = Path(config.out_dir) / "data"
            prepare([config.data], data, lm.tokenizer, val_fraction=config.val_fraction)
        # the lm objective cuts the windows (also when distilling on them)
        super().__init__(dataclasses.replace(config, data_dir=str(data), objective="lm"))
        self.name, self.model = config.objective, lm.model

    def build_model(self, device: torch.device) -> GPT:
        self.block_size = input_room(self.model, self.config.peft)
        return apply_peft(self.model.to(device).train(), self.config.peft)

    def epoch_size(self) -> int:
        return len(self.train_data) // input_room(self.model, self.config.peft)


class Distill:
    """Another task's data and targets, with the student's loss
        alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(targets)
    over the scored positions, where _T means softmax(logits / T). T^2 keeps the soft loss's
    gradients on the hard loss's scale (Hinton et al. 2015)."""

    name = "distill"

    def __init__(self, inner: ExampleTask | TextTask, config: FinetuneConfig):
        self.inner, self.config = inner, config
        self.tokenizer, self.causal = inner.tokenizer, inner.causal
        self.seq_len = getattr(inner, "seq_len", None)  # TextTask: windows of block_size
        self.teacher: GPT | None = None

    def build_model(self, device: torch.device) -> GPT:
        student = self.inner.build_model(device)
        teacher = load_pretrained(self.config.teacher, device).model
        teacher.requires_grad_(False)
        s, t = student.config, teacher.config
        if len(s.label_groups()) > 1:
            raise ConfigError("distill learns one label field; train each field on its own")
        if (s.head, s.labels) != (t.head, t.labels):
            raise ConfigError(
                f"the teacher's head ({t.head}, labels {t.labels}) differs from the student's "
                f"({s.head}, labels {s.labels}); fine-tune the teacher on the same task first"
            )
        if s.head == "lm" and t.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError("the teacher's vocabulary is smaller than the student's tokenizer")
        self.teacher = teacher
        return student

    def epoch_size(self) -> int:
        return self.inner.epoch_size()

    def train_batch(self, step: int, micro: int) -> Batch:
        return self.inner.train_batch(step, micro)

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]:
        return self.inner.eval_batches(rank, world_size)

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        keep = y != IGNORE  # [B, T]
        n = self.tokenizer.vocab_size if self.teacher.config.head == "lm" else None
        student = model(x, causal=self.causal)[..., :n][keep].float()  # [N, V]
        with torch.no_grad():
            teacher = self.teacher(x, causal=self.causal)[..., :n][keep].float()  # [N, V]
        T, alpha = self.config.temperature, self.config.distill_alpha
        soft = F.kl_div(
            F.log_softmax(student / T, -1),
            F.log_softmax(teacher / T, -1),
            log_target=True,
            reduction="batchmean",
        )
        hard = F.cross_entropy(student, y[keep])
        return alpha * T * T * soft + (1 - alpha) * hard


# -- the run -------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    train: TrainResult
    metrics: dict[str, Any]  # val metrics of classify / tag / rank / preference runs
    adapter: Path | None  # the adapter-only save of a parameter-efficient run


def make_task(config: FinetuneConfig) -> ExampleTask | TextTask | Distill | PreferenceTask:
    """The task `config` describes, holding the model to fine-tune (loaded on the CPU; the
    Trainer moves it)."""
    lm = load_trainable(config.init_from, "cpu")
    if config.task in ("reward", "dpo"):
        return PreferenceTask(config, lm)
    task = TextTask(config, lm) if config.task == "lm" else ExampleTask(config, lm)
    return Distill(task, config) if config.objective == "distill" else task


def finetune(
    config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False
) -> FinetuneResult:
    """Fine-tune as `config` says; on the main process, also score the val set (classify /
    tag / rank / reward / dpo) and write the adapter-only save (parameter-efficient runs)."""
    task = make_task(config)
    if config.epochs:
        per_step = config.batch_size * config.grad_accum
        steps = math.ceil(config.epochs * task.epoch_size() / per_step)
        config = dataclasses.replace(config, max_steps=steps)
    trainer = Trainer(config, resume=resume, overwrite=overwrite, task=task)
    result = trainer.fit()
    trainer.dist.finish()  # only after success (see Distributed.finish); what follows is local
    metrics, adapter = {}, None
    scored = config.task in ("classify", "tag", "rank", "reward", "dpo")
    if trainer.dist.is_main and (scored or config.peft.enabled):
        # the saved checkpoint, whole on one device whatever DDP/FSDP did in training
        model, _, _ = load_checkpoint(result.checkpoint, device=trainer.dist.device)
        if scored:
            inner = task.inner if isinstance(task, Distill) else task
            metrics = inner.val_metrics(model)
            save_results(metrics, Path(config.out_dir) / "val_metrics.json")
        if config.peft.enabled:
            out = Path(config.out_dir) / "adapter"
            adapter = save_adapter(model, out, config.init_from, task.tokenizer)
    return FinetuneResult(result, metrics, adapter)


def describe(result: FinetuneResult) -> str:
    """The one-line summary the CLI prints."""
    r = result.train
    parts = [f"{r.steps} steps", f"train loss {r.train_loss:.4f}"]
    if r.val_loss is not None:
        parts.append(f"val loss {r.val_loss:.4f}")
    parts += [
        f"{k} {v:.4f}"
        for k, v in result.metrics.items()
        if isinstance(v, float) and k != "n" and not k.endswith("_n")
    ]
    return (
        ", ".join(parts)
        + f"; checkpoint in {r.checkpoint}"
        + (f", adapter in {result.adapter}" if result.adapter else "")
    )
