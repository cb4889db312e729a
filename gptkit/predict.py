"""Using a trained classifier or tagger: labels with probabilities, entities with character
spans, and the plain label function `gptkit monitor` runs.

    classify(model, tok, ["great film"])  -> [{"label": "pos", "score": 0.93,
                                               "probs": {"neg": 0.07, "pos": 0.93}}]
    a classifier of several fields (finetune classify label_field=topic,sentiment) gives
                                          -> [{"topic": {...}, "sentiment": {...}}]
    tag(model, tok, ["Ada lives in Paris"]) -> [[{"entity_group": "PER", "score": 0.98,
                                               "word": "Ada", "start": 0, "end": 3}, ...]]

The rows are built as in training (examples.py): a text and EOS, read at the last position;
a tagger's words, each read at its last sub-token. Texts are batched by length, so a batch
pads little, and results come back in input order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import precision
from .config import ConfigError
from .examples import IGNORE, Example, classification_example, collate, tagging_example
from .generation import eval_mode
from .model import GPT
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .loading import Pretrained

# A word as tagging data splits it: letters/digits (with inner ' or -), or one punctuation mark.
WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


def needs_head(model: GPT, head: str, what: str) -> None:
    """A one-line error unless `model` has a `head` head (classify / tag / lm)."""
    have = model.config.head
    if have == head:
        return
    if head == "lm":
        use = "lm.classify" if have == "classify" else "lm.tag"
        raise ConfigError(
            f"{what} needs a language model; this one has a {have} head (use `gptkit predict` "
            f"or {use})"
        )
    raise ConfigError(
        f"{what} needs a model with a {head} head (from `gptkit finetune {head}`); this one "
        f"has a {have} head"
    )


# A batch pads each row to its longest. Rows sorted by length still pad a lot where lengths
# spread (sentences of 3 to 736 tokens: 1.7x the real tokens in batches of 32), so a batch also
# ends where padding would pass SLACK x its real tokens, unless it is still small (FLOOR padded
# tokens), where a forward's fixed cost outweighs what padding wastes.
SLACK, FLOOR = 1.25, 512


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The indices of `lengths`, shortest first, in batches of at most batch_size rows that
    pad little (see SLACK)."""
    batches: list[list[int]] = []
    rows: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = (len(rows) + 1) * lengths[i]  # with row i, the longest so far
        if rows and (
            len(rows) == batch_size or (padded > SLACK * (real + lengths[i]) and padded > FLOOR)
        ):
            batches.append(rows)
            rows, real = [], 0
        rows.append(i)
        real += lengths[i]
    return batches + [rows] if rows else batches


def batched_logits(
    model: GPT, examples: Sequence[Example], pad_id: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Each example's head outputs [T, L], in input order; batches of similar lengths."""
    out: list[Any] = [None] * len(examples)
    device = model.tok_emb.weight.device
    with torch.inference_mode(), eval_mode(model):
        for rows in length_batches([len(e.ids) for e in examples], batch_size):
            x, _ = collate([examples[i] for i in rows], pad_id)
            logits = model(x.to(device)).float().cpu()  # [B, T, L]
            for b, i in enumerate(rows):
                out[i] = logits[b, : len(examples[i].ids)]
    yield from out


def classification_rows(
    tokenizer: Tokenizer, texts: Sequence[str], block_size: int
) -> list[Example]:
    """The rows a classifier reads: each text (its start, if too long) and EOS."""
    return [classification_example(tokenizer, t, 0, block_size) for t in texts]


def class_probs(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    examples: Sequence[Example] | None = None,
) -> list[tuple[str, list[str], torch.Tensor]]:
    """(field, its labels, probabilities [N, labels]) for each field the classifier predicts:
    a softmax per field over the last position's outputs. `examples`: the texts' rows
    (classification_rows) when the caller has them already."""
    needs_head(model, "classify", "classifying")
    c = model.config
    if examples is None:
        examples = classification_rows(tokenizer, texts, model.context)
    pad = tokenizer.pad_id or 0
    last = [logits[-1] for logits in batched_logits(model, examples, pad, batch_size)]
    outputs = torch.stack(last) if last else torch.empty(0, len(c.labels))  # [N, L]
    groups, start = [], 0
    for field, labels in c.label_groups():
        probs = outputs[:, start : start + len(labels)].softmax(-1)  # [N, labels]
        groups.append((field, labels, probs))
        start += len(labels)
    return groups


def classify(
    model: GPT,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    top_k: int | None = None,
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Per text: the label, its probability ("score") and the probability table ("probs",
    every label, or the top_k most likely, best first). Several fields: one such entry per
    field name."""
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    groups = class_probs(model, tokenizer, texts, batch_size)
    results: list[dict[str, Any]] = [{} for _ in texts]
    for field, labels, probs in groups:
        for result, row in zip(results, probs.tolist(), strict=True):
            table = dict(zip(labels, row, strict=True))
            if top_k is not None:
                table = dict(sorted(table.items(), key=lambda kv: -kv[1])[:top_k])
            best = max(range(len(labels)), key=row.__getitem__)
            result[field] = {"label": labels[best], "score": row[best], "probs": table}
    if len(groups) == 1:  # one field: the entry itself, as transformers' pipeline gives it
        return [result[groups[0][0]] for result in results]
    return results


def predict_labels(
    model: GPT, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32
) -> dict[str, list[str]]:
    """{field: the predicted label of each text} (one field unless trained on several)."""
    return {
        field: [labels[i] for i in probs.argmax(-1).tolist()]
        for field, labels, probs in class_probs(model, tokenizer, texts, batch_size)
    }


def tag_words(
    model: GPT, tokenizer: Tokenizer, sentences: Sequence[Sequence[str]], batch_size: int = 32
) -> list[list[tuple[str, float]]]:
    """(tag, probability) for each word; words past the context get "O" (or the first label)
    with probability 0."""
    needs_head(model, "tag", "tagging")
    c = model.config
    fallback = "O" if "O" in c.labels else c.labels[0]
    examples = [
        tagging_example(tokenizer, words, [0] * len(words), model.context) for words in sentences
    ]
    pad = tokenizer.pad_id or 0
    predictions = []
    for example, logits, words in zip(
        examples, batched_logits(model, examples, pad, batch_size), sentences, strict=True
    ):
        positions = [j for j, t in enumerate(example.targets) if t != IGNORE]
        best, index = logits[positions].softmax(-1).max(-1)  # [words seen]
        tags = [(c.labels[i], p) for i, p in zip(index.tolist(), best.tolist(), strict=True)]
        predictions.append(tags + [(fallback, 0.0)] * (len(words) - len(tags)))
    return predictions


def predict_tags(
    model: GPT, tokenizer: Tokenizer, sentences: Sequence[Sequence[str]], batch_size: int = 32
) -> list[list[str]]:
    """The tag head's tag for each word."""
    return [[t for t, _ in row] for row in tag_words(model, tokenizer, sentences, batch_size)]


def entities(
    text: str, spans: Sequence[tuple[int, int]], tags: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Words' (tag, probability) merged into entities, as transformers' token-classification
    pipeline does with aggregation_strategy="simple": B-/S-/U- (or a change of type) starts
    an entity, I-/E-/L- continue it, E-/L-/S-/U- end it, O is outside; an untyped tag (no
    "X-" prefix) is its own type. Score = the mean probability of the entity's words."""
    found: list[dict[str, Any]] = []
    group: tuple[str, list[int]] | None = None  # (type, word indices)

    def close() -> None:
        nonlocal group
        if group is not None:
            kind, words = group
            start, end = spans[words[0]][0], spans[words[-1]][1]
            score = sum(tags[w][1] for w in words) / len(words)
            word = text[start:end]
            found.append(
                {"entity_group": kind, "score": score, "word": word, "start": start, "end": end}
            )
        group = None

    for i, (tag, _) in enumerate(tags):
        if tag == "O":
            close()
            continue
        prefix, _, kind = tag.partition("-") if "-" in tag else ("", "", tag)
        if prefix in ("B", "S", "U") or group is None or group[0] != kind:
            close()
            group = (kind, [i])
        else:
            group[1].append(i)
        if prefix in ("E", "L", "S", "U"):
            close()
    close()
    return found


def tag(
    model: GPT, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32
) -> list[list[dict[str, Any]]]:
    """The entities in each text, with character offsets into it (see `entities`). Texts
    are split into words and punctuation (WORD), as tagged corpora are."""
    spans = [[m.span() for m in WORD.finditer(text)] for text in texts]
    words = [[text[a:b] for a, b in s] for text, s in zip(texts, spans, strict=True)]
    tagged = tag_words(model, tokenizer, words, batch_size)
    return [entities(*row) for row in zip(texts, spans, tagged, strict=True)]


def label_function(
    lm: Pretrained, batch_size: int = 32, dtype: str = "float32"
) -> Callable[[list[str]], list[dict[str, str]]]:
    """texts -> per text {field: label}: a classifier reduced to its answers (gptkit monitor).
    dtype: what the matmuls compute in (precision.py), in whichever thread calls it."""
    needs_head(lm.model, "classify", "a label function")
    device = lm.model.tok_emb.weight.device

    def labels(texts: list[str]) -> list[dict[str, str]]:
        with precision.compute(dtype, device):
            fields = predict_labels(lm.model, lm.tokenizer, texts, batch_size)
        return [{f: fields[f][i] for f in fields} for i in range(len(texts))]

    return labels
