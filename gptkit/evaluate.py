"""Evaluation: task metrics, perplexity, and zero/few-shot multiple-choice scoring.

Task metrics are computed by the libraries the papers use, so numbers compare with published ones:

- `classification_metrics`: accuracy and macro-averaged F1 (scikit-learn).
- `tagging_metrics`: token accuracy, and for IOB tags entity-level precision/recall/F1 as CoNLL's
  conlleval scores them (seqeval: an entity counts only if its type and both ends are right).
- `generation_metrics`: corpus BLEU and chrF (sacrebleu, 0-100), ROUGE-1/2/L F-measure (Google's
  rouge-score, ×100), and SQuAD's exact match after `normalize_answer` (×100). Chinese text is
  split into words as its benchmarks do (`text_language` tells it from the references).

The model-based measures are written here, on token ids:

- `perplexity`: exp(mean negative log-likelihood per token), with sliding windows for text longer
  than the context (the method of Hugging Face's "Perplexity of fixed-length models" guide).
- `continuation_logprobs`: log p(continuation | context) summed over the continuation's tokens.
- `multiple_choice`: GPT-3-style scoring, where the choice with the highest log-likelihood is the
  model's answer; `accuracy_norm` divides by the choice's length in characters first, as
  lm-evaluation-harness's `acc_norm` does.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .generation import eval_mode
from .tagging import ENTITY_SCHEMES, tag_scheme

if TYPE_CHECKING:
    from .api import LM
    from .tokenizer import Tokenizer

GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCTUATION = frozenset(string.punctuation)
# CJK ideographs (unified, extension A, compatibility): a script with no spaces between words.
_IDEOGRAPH = "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
# How BLEU (sacrebleu's tokenizer) and ROUGE split each language's text into words. Whitespace
# tokenizers see a Chinese sentence as one word, so an exact reply would score BLEU 0.
TOKENIZATION = {
    "en": {"bleu_tokenize": "13a", "rouge_tokenize": "words, Porter-stemmed"},
    "zh": {"bleu_tokenize": "zh", "rouge_tokenize": "characters"},
}


# --- classification and tagging ------------------------------------------------------------


def classification_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict[str, float]:
    """{"accuracy", "macro_f1", "n"}: macro F1 averages over every label seen in gold or pred,
    so a label the model invents counts as a class with F1 0."""
    # Imported here, as seqeval and sacrebleu below: scikit-learn adds ~1.5 s to the start of
    # every gptkit process, most of which never score a classifier.
    from sklearn import metrics as sklearn_metrics

    _check_pairs(gold, pred, "gold labels", "predictions")
    labels = sorted(set(gold) | set(pred))
    return {
        "accuracy": float(sklearn_metrics.accuracy_score(gold, pred)),
        "macro_f1": float(
            sklearn_metrics.f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
        ),
        "n": len(gold),
    }


def classify_report(
    pred: dict[str, list[str]], gold: list[tuple[str | None, ...]]
) -> dict[str, float]:
    """classification_metrics of one field, or of each field with its name as prefix, over
    the rows labelled for it (FIELD_n of them)."""
    if len(pred) == 1:
        return classification_metrics([g[0] for g in gold], next(iter(pred.values())))
    report = {}
    for k, (field, labels) in enumerate(pred.items()):
        rows = [(g[k], p) for g, p in zip(gold, labels, strict=True) if g[k] is not None]
        if rows:
            metrics = classification_metrics(*map(list, zip(*rows, strict=True)))
            report |= {f"{field}_{name}": value for name, value in metrics.items()}
    return {**report, "n": len(gold)}


def tagging_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]
) -> dict[str, float]:
    """{"token_accuracy", "n_tokens"}, plus entity-level precision/recall/F1 (micro-averaged over
    entities, as the CoNLL and WNUT papers report) when the gold tags follow an entity scheme
    (IOB1, IOB2, BIOES, BILOU: taskdata.tag_scheme)."""
    _check_pairs(gold, pred, "gold sentences", "predicted sentences")
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred, strict=True)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {i} has {len(gold_tags)} gold tags but {len(pred_tags)} predicted"
            )
    pairs = [
        (g, p)
        for gold_tags, pred_tags in zip(gold, pred, strict=True)
        for g, p in zip(gold_tags, pred_tags, strict=True)
    ]
    results: dict[str, float] = {
        "token_accuracy": sum(g == p for g, p in pairs) / len(pairs) if pairs else 0.0,
        "n_tokens": len(pairs),
    }
    if tag_scheme(gold) in ENTITY_SCHEMES:
        from seqeval import metrics as seqeval_metrics

        gold_lists, pred_lists = [_bioes(t) for t in gold], [_bioes(t) for t in pred]
        # seqeval's default mode is conlleval's: an I- tag after O (or after another type) still
        # starts an entity. zero_division=0: a model that predicts no entity has precision 0.
        for name, score in (
            ("entity_precision", seqeval_metrics.precision_score),
            ("entity_recall", seqeval_metrics.recall_score),
            ("entity_f1", seqeval_metrics.f1_score),
        ):
            results[name] = float(score(gold_lists, pred_lists, average="micro", zero_division=0))
    return results


def _bioes(tags: Sequence[str]) -> list[str]:
    """Tags as seqeval reads them: it knows B/I/E/S prefixes, and BILOU's L(ast) and U(nit)
    are its E and S."""
    return [{"L-": "E-", "U-": "S-"}.get(t[:2], t[:2]) + t[2:] for t in tags]


# --- generated text --------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and the articles a/an/the, and
    squeeze whitespace (the steps and their order are those of the official v1.1 script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one answer against its gold answers, each the best over them, on
    a 0-1 scale, as the official SQuAD v1.1 script scores: F1 over the bags of normalised
    words (normalize_answer)."""
    pred = normalize_answer(prediction).split()
    best_em = best_f1 = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        best_em = max(best_em, float(pred == gold))
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
    return best_em, best_f1


def text_language(texts: Sequence[str]) -> str:
    """ "zh" when at least a third of the texts' non-space characters are CJK ideographs, else
    "en" (any script that puts spaces between words)."""
    text = "".join(texts)
    letters = sum(not c.isspace() for c in text)
    return "zh" if letters and len(re.findall(_IDEOGRAPH, text)) * 3 >= letters else "en"


class _ChineseWords:
    """rouge-score's tokenizer for Chinese: each ideograph is a word, as is each run of Latin
    letters or digits (lower-cased), as Chinese ROUGE is commonly computed by character."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(f"{_IDEOGRAPH}|[a-z0-9]+", text.lower())


def generation_metrics(
    preds: Sequence[str],
    refs: Sequence[str],
    metrics: Sequence[str] = GENERATION_METRICS,
    lang: str | None = None,
) -> dict[str, float]:
    """Scores of predictions against one reference each, all on a 0-100 scale.

    "bleu" and "chrf" are corpus-level (sacrebleu's BLEU-4 and chrF with character 6-grams);
    "rouge" gives rouge1/rouge2/rougeL, the mean F-measure over pairs; "exact_match" compares
    `normalize_answer` forms. lang ("en" or "zh"; default `text_language(refs)`) picks how
    BLEU and ROUGE split words (TOKENIZATION): sacrebleu's 13a and rouge-score's ASCII words
    with Porter stemming for English, sacrebleu's "zh" and single characters for Chinese.
    """
    lang = lang or text_language(refs)
    if lang not in TOKENIZATION:
        raise ValueError(f"unknown language {lang!r}; known: {', '.join(TOKENIZATION)}")
    unknown = [m for m in metrics if m not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(GENERATION_METRICS)}")
    _check_pairs(refs, preds, "references", "predictions")
    preds, refs = list(preds), list(refs)
    results: dict[str, float] = {}
    import sacrebleu

    if "bleu" in metrics:
        tokenize = TOKENIZATION[lang]["bleu_tokenize"]
        results["bleu"] = sacrebleu.corpus_bleu(preds, [refs], tokenize=tokenize).score
    if "chrf" in metrics:
        results["chrf"] = sacrebleu.corpus_chrf(preds, [refs]).score
    if "rouge" in metrics:
        # Imported here: rouge-score imports NLTK, ~2.5 s that no other metric needs.
        from rouge_score import rouge_scorer

        if lang == "zh":
            scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_ChineseWords())
        else:
            scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        scores = [scorer.score(target=r, prediction=p) for p, r in zip(preds, refs, strict=True)]
        for kind in ROUGE_TYPES:
            results[kind] = 100 * sum(s[kind].fmeasure for s in scores) / len(scores)
    if "exact_match" in metrics:
        matches = [
            normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs, strict=True)
        ]
        results["exact_match"] = 100 * sum(matches) / len(matches)
    return results


def _check_pairs(gold: Sequence[Any], pred: Sequence[Any], gold_name: str, pred_name: str) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} {gold_name} but {len(pred)} {pred_name}")
    if not gold:
        raise ValueError(f"no {gold_name} to score")


# --- log-likelihoods under the model ---------------------------------------------------------


def _tail_logprobs(
    model: nn.Module, seqs: Sequence[torch.Tensor], n_scored: Sequence[int]
) -> list[float]:
    """For each 1-D token sequence, sum of log p(token | tokens before it) over its last
    n_scored tokens; one forward pass for all of them, so len(seqs) is the batch size.

    A sequence may hold block_size + 1 tokens: its last token is only ever a target, so the
    model reads seq[:-1]. Shorter sequences are padded on the right; under causal attention
    the padding comes after every real token and cannot change their logits.
    """
    device = next(model.parameters()).device
    B, L = len(seqs), max(len(s) for s in seqs) - 1
    inputs = torch.zeros(B, L, dtype=torch.long)  # [B, L]; padded with id 0 (any id would do)
    targets = torch.full((B, L), -100, dtype=torch.long)  # [B, L]; -100 = not scored
    for row, (seq, k) in enumerate(zip(seqs, n_scored, strict=True)):
        n = len(seq) - 1  # predictions this sequence makes
        inputs[row, :n] = seq[:-1]
        targets[row, n - k : n] = seq[-k:]  # logits at position j predict token j + 1
    logits = model(inputs.to(device))  # [B, L, V]
    nll = F.cross_entropy(
        logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none"
    )  # [B * L], 0 where the target is -100
    return (-nll.view(B, L).double().sum(dim=1)).tolist()


def perplexity_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, n_scored) of each window over a text of n_tokens.

    Window k reads the block_size tokens from start = k * stride and scores the last n_scored
    of tokens[start : end], end = start + block_size + 1 (or the text's end): the targets the
    previous window did not reach. So every token but the first is scored exactly once, each
    with at least block_size - stride + 1 tokens of context (near the start: all before it).
    """
    windows: list[tuple[int, int, int]] = []
    scored_up_to = 1  # token 0 has no context: it is never a target
    for start in range(0, n_tokens - 1, stride):
        end = min(start + block_size + 1, n_tokens)
        windows.append((start, end, end - scored_up_to))
        scored_up_to = end
        if end == n_tokens:
            break
    return windows


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: Sequence[int], stride: int | None = None, batch_size: int = 8
) -> dict[str, float]:
    """Perplexity of a token sequence with sliding windows (Hugging Face's "Perplexity of
    fixed-length models" method; see `perplexity_windows`).

    stride (default block_size // 2) trades time for context: stride = block_size evaluates
    non-overlapping chunks (fast, little context for each chunk's first tokens); stride = 1
    gives every token a full window (one forward pass per token). Unlike the guide's code, each
    window also scores the token just after its last input, so no token is skipped even when
    stride = block_size. Returns {"loss" (mean nats per scored token), "perplexity", "tokens"}.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)  # [N]
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError("perplexity needs a 1-D sequence of at least 2 tokens")
    block_size = model.context
    stride = stride if stride is not None else max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    windows = perplexity_windows(len(ids), block_size, stride)
    total, tokens = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            seqs = [ids[start:end] for start, end, _ in batch]
            n_scored = [k for _, _, k in batch]
            total += sum(_tail_logprobs(model, seqs, n_scored))
            tokens += sum(n_scored)
    loss = -total / tokens
    # exp overflows a float past ~709 nats; a model that bad has infinite perplexity for us
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 709 else math.inf,
        "tokens": tokens,
    }


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    contexts: Sequence[list[int]],
    continuations: Sequence[list[int]],
    batch_size: int = 8,
) -> list[float]:
    """log p(continuation | context), summed over the continuation's tokens, for each pair.

    When a pair holds more than block_size + 1 tokens, the context loses tokens from its left
    (the last token is only a target, so block_size + 1 fit, as in lm-evaluation-harness).
    Pairs are scored longest first in batches of batch_size, padded on the right.
    """
    _check_pairs(contexts, continuations, "contexts", "continuations")
    block_size = model.context
    for i, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        if not context:
            raise ValueError(f"pair {i} has an empty context; start it with a BOS or EOS token")
        if not 1 <= len(continuation) <= block_size:
            raise ValueError(
                f"pair {i}: a continuation of {len(continuation)} tokens; it must have 1 to "
                f"block_size ({block_size}) tokens"
            )
    seqs = [
        torch.tensor((list(c) + list(x))[-(block_size + 1) :], dtype=torch.long)
        for c, x in zip(contexts, continuations, strict=True)
    ]
    # Longest first, so each batch pads its rows to similar lengths.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    scores = [0.0] * len(seqs)
    with eval_mode(model):
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            batch_scores = _tail_logprobs(
                model, [seqs[i] for i in rows], [len(continuations[i]) for i in rows]
            )
            for i, score in zip(rows, batch_scores, strict=True):
                scores[i] = score
    return scores


# --- zero/few-shot multiple choice -------------------------------------------------------------


def render_example(question: str, answer: str | None = None) -> str:
    """One question in GPT-3's Q/A format; without an answer, the prompt the model completes."""
    if answer is None:
        return f"Question: {question}\nAnswer:"
    return f"Question: {question}\nAnswer: {answer}\n\n"


def draw_shots(item: dict, pool: Sequence[dict], shots: int, rng: random.Random) -> list[dict]:
    """`shots` examples drawn from pool without replacement, never the item itself.

    Like lm-evaluation-harness, draw one spare and drop the item if it was drawn; only when the
    pool holds copies of the item is the whole pool searched.
    """
    if shots == 0:
        return []
    drawn = rng.sample(range(len(pool)), min(shots + 1, len(pool)))
    chosen = [pool[j] for j in drawn if pool[j] != item][:shots]
    if len(chosen) < shots:
        others = [example for example in pool if example != item]
        if len(others) < shots:
            raise ValueError(f"{shots} shots asked for, but only {len(others)} other examples")
        chosen = rng.sample(others, shots)
    return chosen


def build_prompt(item: dict, examples: Sequence[dict]) -> str:
    """The solved examples, then the item's question awaiting its answer."""
    solved = "".join(render_example(e["question"], e["choices"][e["answer"]]) for e in examples)
    return solved + render_example(item["question"])


def _check_item(i: int, item: dict) -> None:
    choices = item.get("choices")
    if not choices or any(not c for c in choices):
        raise ValueError(f"item {i} needs a non-empty list of non-empty choices")
    if not 0 <= item.get("answer", -1) < len(choices):
        raise ValueError(f"item {i}: answer must index its {len(choices)} choices")


def _encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Context and continuation ids, cut from the tokens of the whole text: a BPE may merge
    across the boundary, and the whole is what the model sees in a real document."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


def multiple_choice(
    lm: LM,
    items: Sequence[dict],
    shots: int = 0,
    train_items: Sequence[dict] = (),
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Zero/few-shot multiple choice, scored as in GPT-3 and lm-evaluation-harness.

    An item is {"question": str, "choices": [str, ...], "answer": index}. Each item's prompt is
    `shots` solved examples (from train_items, or from the other items when there are none)
    then its question; each choice is scored as the continuation " {choice}". Returns
    {"accuracy", "accuracy_norm" (log-likelihood per character of the choice), "n", "shots"}.
    """
    if not items:
        raise ValueError("no items to score")
    for i, item in enumerate(items):
        _check_item(i, item)
    pool = train_items or items
    available = len(pool) - (0 if train_items else 1)
    if shots < 0:
        raise ValueError(f"shots must be 0 or more, got {shots}")
    if shots > available:
        raise ValueError(f"{shots} shots asked for, but the pool has {available} examples")
    rng = random.Random(seed)
    contexts, continuations = [], []
    for item in items:
        prompt = build_prompt(item, draw_shots(item, pool, shots, rng))
        for choice in item["choices"]:
            context, continuation = _encode_pair(lm.tokenizer, prompt, " " + choice)
            contexts.append(context)
            continuations.append(continuation)
    scores = iter(continuation_logprobs(lm.model, contexts, continuations, batch_size))
    correct = correct_norm = 0
    for item in items:
        logprobs = [next(scores) for _ in item["choices"]]
        per_char = [lp / len(c) for lp, c in zip(logprobs, item["choices"], strict=True)]
        correct += _argmax(logprobs) == item["answer"]
        correct_norm += _argmax(per_char) == item["answer"]
    n = len(items)
    return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n, "shots": shots}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties: the first, as numpy's


# --- reporting ---------------------------------------------------------------------------------


def format_table(results: dict[str, float], title: str = "") -> str:
    """Metric names and values in two aligned columns; floats to 4 decimals."""
    cells = [(str(k), f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    rows = [("metric", "value"), *cells]
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    lines.insert(1, "-" * (name_width + 2 + value_width))
    return "\n".join(([title] if title else []) + lines)


def save_results(results: dict, path: str | Path) -> None:
    """Write results as JSON (indent 2), creating parent directories. JSON has no NaN or
    infinity, so those are written as null (as gptkit's metrics log does)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
