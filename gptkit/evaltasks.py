"""`gptkit eval TASK`: read a data file, run the model on it, score it (evaluate.py's metrics).

perplexity  text files                         loss, perplexity (sliding windows)
classify    CSV/TSV/JSONL text + label         accuracy, macro-F1
tag         CoNLL / CoNLL-U / IOB2             token accuracy, entity P/R/F1 (seqeval), scheme
generate    chat JSONL (prompt/response, ...)  BLEU, chrF, ROUGE, exact match: the model's
                                               greedy reply to all but the last assistant
                                               turn, against that turn
choice      JSONL {question, choices, answer}  zero- or k-shot accuracy by log-likelihood
preference  preference pairs (preference_data)  how often the chosen reply wins: by a reward
                                               model's reward, by DPO's implicit reward
                                               against --ref, or by mean log-probability
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .api import LM
from .chat_template import CHATML, render, turn_stops
from .config import ConfigError
from .evaluate import (
    TOKENIZATION,
    classify_report,
    generation_metrics,
    multiple_choice,
    perplexity,
    tagging_metrics,
    text_language,
)
from .generation import prompt_room
from .model import ContextLengthError
from .predict import needs_head, predict_labels, predict_tags
from .preference import load_reference, score_pairs
from .preference_data import read_pairs
from .tagging import check_tags, read_tagged_file, tag_scheme
from .taskdata import read_chat, read_labelled, read_records

TASKS = ("perplexity", "classify", "tag", "generate", "choice", "preference")


def eval_perplexity(lm: LM, paths: Sequence[str | Path], stride: int | None = None) -> dict:
    """Perplexity over the files' text, joined with EOS between files."""
    ids: list[int] = []
    for path in paths:
        if ids and lm.tokenizer.eos_id is not None:
            ids.append(lm.tokenizer.eos_id)
        ids += lm.tokenizer.encode(Path(path).read_text(encoding="utf-8"))
    return perplexity(lm.model, ids, stride=stride)


def eval_classify(lm: LM, path, limit: int = 0, text_field="text", label_field="label") -> dict:
    """Accuracy and macro-F1; a classifier of several fields is scored on each (label_field
    names the data's fields in the model's order; "label" takes the model's own names)."""
    needs_head(lm.model, "classify", "eval classify")
    groups = lm.config.label_groups()
    fields = [f.strip() for f in label_field.split(",")]
    if len(groups) > 1 and fields == ["label"]:
        fields = [f for f, _ in groups]
    if len(fields) != len(groups):
        raise ConfigError(f"the model predicts {len(groups)} field(s), label_field names {fields}")
    records = read_labelled(path, text_field, fields)[: limit or None]
    pred = predict_labels(lm.model, lm.tokenizer, [text for text, _ in records])
    return classify_report(pred, [labels for _, labels in records])


def eval_tag(
    lm: LM, path, limit: int = 0, *, word_column: int | None = None, tag_column: int | None = None
) -> dict:
    """Token accuracy, entity P/R/F1 when the gold tags follow an entity scheme, and the
    scheme recognised ("IOB2", "BIOES", ..., "none (UPOS-like)")."""
    needs_head(lm.model, "tag", "eval tag")
    tagged = read_tagged_file(path, word_column=word_column, tag_column=tag_column)
    check_tags(tagged)  # the same refusal as `gptkit finetune tag`: no score over garbage
    sentences = tagged.sentences[: limit or None]
    pred = predict_tags(lm.model, lm.tokenizer, [words for words, _ in sentences])
    gold = [tags for _, tags in sentences]
    return {**tagging_metrics(gold, pred), "scheme": tag_scheme(gold)}


def generation_prompts(lm: LM, path, limit: int = 0, chat: bool = True):
    """(prompts, references, stop strings): each conversation up to its last assistant turn,
    rendered with the model's chat template (or plain, one message per paragraph)."""
    conversations = read_chat(path)[: limit or None]
    tok = lm.tokenizer
    names = {"bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    prompts, refs = [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        if chat:
            template = tok.chat_template or CHATML
            prompts.append(render(context, template, add_generation_prompt=True, **names))
        else:
            prompts.append("\n\n".join(m["content"] for m in context) + "\n\n")
        refs.append(messages[last]["content"])
    stop = turn_stops(tok) if chat else ["\n\n"]
    return prompts, refs, stop


def eval_generate(
    lm: LM,
    path,
    limit: int = 0,
    metrics: Sequence[str] = ("bleu", "chrf", "rouge", "exact_match"),
    max_new_tokens: int = 64,
    chat: bool = True,
    batch_size: int = 8,
    lang: str | None = None,
) -> tuple[dict, list[str]]:
    """Metrics of greedy replies, and the replies. A prompt too long for the context keeps its
    end (where the question and the generation prompt are); `truncated` counts them. lang:
    how BLEU and ROUGE split words ("en", "zh"; default: told from the references); the
    results say which was used."""
    prompts, refs, stop = generation_prompts(lm, path, limit, chat)
    try:
        budget = prompt_room(max_new_tokens, lm.model.context)
    except ContextLengthError as e:
        raise ConfigError(str(e)) from None
    truncated = 0
    for i, prompt in enumerate(prompts):
        ids = lm.tokenizer.encode(prompt)
        if len(ids) > budget:
            prompts[i] = lm.tokenizer.decode(ids[-budget:])
            truncated += 1
    preds: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        preds += lm.generate(batch, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop)
    preds = [p.strip() for p in preds]
    lang = lang or text_language(refs)
    scores = generation_metrics(preds, refs, metrics, lang)
    return {**scores, "truncated": truncated, "lang": lang, **TOKENIZATION[lang]}, preds


def eval_choice(lm: LM, path, limit: int = 0, shots: int = 0, train=None, seed=0) -> dict:
    items = read_records(path)[: limit or None]
    pool = read_records(train) if train else ()
    return multiple_choice(lm, items, shots=shots, train_items=pool, seed=seed)


def eval_preference(
    lm: LM, path, limit: int = 0, ref: str | None = None, beta: float = 0.1, max_length=1024
) -> dict:
    pairs = read_pairs(path)[: limit or None]
    reference = load_reference(ref, lm.model) if ref else None
    return score_pairs(
        lm.model, lm.tokenizer, pairs, ref=reference, beta=beta, max_length=max_length
    )


def run_eval(task: str, lm: LM, data: Sequence[str], **options: Any) -> dict[str, Any]:
    """The metrics of `task` on `data` (several files only for perplexity)."""
    if task not in TASKS:
        raise ConfigError(f"unknown eval task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "perplexity":
        return eval_perplexity(lm, data, options.get("stride"))
    if len(data) != 1:
        raise ConfigError(f"eval {task} reads one data file, got {len(data)}")
    limit = options.get("limit", 0)
    if task == "classify":
        return eval_classify(lm, data[0], limit, options["text_field"], options["label_field"])
    if task == "tag":
        columns = {key: options.get(key) for key in ("word_column", "tag_column")}
        return eval_tag(lm, data[0], limit, **columns)
    if task == "generate":
        keys = ("metrics", "max_new_tokens", "chat", "lang")
        return eval_generate(lm, data[0], limit, **{k: options[k] for k in keys})[0]
    if task == "preference":
        keys = ("ref", "beta", "max_length")
        return eval_preference(lm, data[0], limit, **{k: options[k] for k in keys})
    return eval_choice(lm, data[0], limit, options["shots"], options.get("train"))
