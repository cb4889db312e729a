"""Model surgery: a new head (LM -> classifier or tagger), a larger vocabulary, the ChatML
tokens. Each changes a GPT in place and keeps its body's weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .chat_template import CHATML
from .model import GPT
from .tokenizer import Tokenizer

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def set_head(
    model: GPT,
    head: str,
    labels: list[str],
    label_fields: list[str] | None = None,
    label_sizes: list[int] | None = None,
    bias: bool = False,
) -> GPT:
    """Replace the LM head with a freshly initialised classify / tag head over `labels`
    (the body is kept: this is how a pretrained LM becomes a classifier or tagger).
    label_fields / label_sizes split the labels into fields predicted together (see
    GPTConfig); bias=True only for adapters trained on a head with one."""
    tied = model.config.tie_embeddings and head == "lm"
    config = dataclasses.replace(
        model.config,
        head=head,
        labels=list(labels),
        label_fields=list(label_fields or []),
        label_sizes=list(label_sizes or []),
        score_bias=bias and head != "lm",
        tie_embeddings=tied,
    )
    weight = model.tok_emb.weight
    for name in ("lm_head", "score"):
        if hasattr(model, name):
            delattr(model, name)
    model.config = config
    if head == "lm":
        model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            model.lm_head.weight = weight
    else:
        model.score = nn.Linear(config.n_embd, len(labels), bias=config.score_bias)
    model.head.to(device=weight.device, dtype=weight.dtype)
    if not (head == "lm" and config.tie_embeddings):
        model.init_module(model.head)
    return model


def resize_vocab(model: GPT, vocab_size: int) -> GPT:
    """Grow the token embeddings (and an untied LM head) to `vocab_size` rows, new rows set
    to the mean of the old ones (Hewitt 2021: new tokens start as an average token, so they
    do not disturb the model's predictions before training)."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return model
    modules = [model.tok_emb]
    if model.config.head == "lm" and not model.config.tie_embeddings:
        modules.append(model.lm_head)
    with torch.no_grad():
        for module in modules:
            w = module.weight
            grown = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - old, -1)])
            module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
    if model.config.head == "lm" and model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.tok_emb.num_embeddings = vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model


def fit_chat_template(model: GPT, tokenizer: Tokenizer, setting: str) -> tuple[str, Tokenizer]:
    """(template, tokenizer) to train chat data with: the tokenizer's own template ("auto",
    when it has one), else ChatML with its two special tokens added to a copy of the
    tokenizer and the embeddings grown to fit them. The template is saved with the model, so
    chat and serve use it."""
    if setting == "auto" and tokenizer.chat_template:
        return tokenizer.chat_template, tokenizer
    tokenizer = tokenizer.add_special_tokens(CHATML_TOKENS)
    tokenizer.chat_template = CHATML
    resize_vocab(model, max(model.config.vocab_size, tokenizer.vocab_size))
    return CHATML, tokenizer
