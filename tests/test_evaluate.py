"""Tests for gptkit.evaluate: metrics against hand-computed values and their reference libraries,
and model-based scores against direct, one-example-at-a-time computations with the model."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TEXT, char_model
from seqeval import metrics as seqeval_metrics

from gptkit import evaluate
from gptkit.api import LM
from gptkit.config import preset
from gptkit.evaluate import (
    build_prompt,
    classification_metrics,
    continuation_logprobs,
    draw_shots,
    format_table,
    generation_metrics,
    multiple_choice,
    normalize_answer,
    perplexity,
    perplexity_windows,
    save_results,
    tagging_metrics,
    text_language,
)
from gptkit.model import GPT
from gptkit.tokenizer import char_tokenizer

# --- classification and tagging ------------------------------------------------------------


def test_classification_metrics_match_hand_computation():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "c"]
    # F1 per label: a: P=1, R=1/2 -> 2/3; b: P=1/2, R=1 -> 2/3; c: 1.
    results = classification_metrics(gold, pred)
    assert results["accuracy"] == pytest.approx(3 / 4)
    assert results["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert results["n"] == 4


def test_classification_macro_f1_counts_labels_only_predicted():
    # "b" never occurs in gold: it is still a class (F1 0), so macro F1 = (2/3 + 0) / 2.
    results = classification_metrics(["a", "a"], ["a", "b"])
    assert results["macro_f1"] == pytest.approx(1 / 3)


def test_classification_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_metrics(["a", "b"], ["a"])


GOLD_TAGS = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
PRED_TAGS = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG"]]  # LOC predicted as ORG


def test_tagging_entity_scores_match_hand_computation_and_seqeval():
    results = tagging_metrics(GOLD_TAGS, PRED_TAGS)
    # Gold entities: PER, LOC, ORG; predicted: PER, ORG (wrong type), ORG. 2 of 3 right each way.
    assert results["entity_precision"] == pytest.approx(2 / 3)
    assert results["entity_recall"] == pytest.approx(2 / 3)
    assert results["entity_f1"] == pytest.approx(2 / 3)
    assert results["entity_f1"] == pytest.approx(seqeval_metrics.f1_score(GOLD_TAGS, PRED_TAGS))
    assert results["token_accuracy"] == pytest.approx(5 / 6)
    assert results["n_tokens"] == 6


def test_tagging_uses_conlleval_rules_for_an_entity_starting_with_i():
    # conlleval (seqeval's default mode) reads I-PER after O as the start of a PER entity.
    results = tagging_metrics([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])
    assert results["entity_f1"] == pytest.approx(1.0)
    assert results["token_accuracy"] == pytest.approx(2 / 3)


def test_tagging_without_iob_tags_reports_token_accuracy_only():
    results = tagging_metrics([["DET", "NOUN"], ["VERB"]], [["DET", "VERB"], ["VERB"]])
    assert results == {"token_accuracy": pytest.approx(2 / 3), "n_tokens": 3}


@pytest.mark.parametrize(
    ("gold", "pred", "precision", "recall"),
    [
        # BIOES: gold PER (2 tokens), LOC (1), ORG (3); the model gets PER and ORG right,
        # and ends LOC one token late.
        (
            [["B-PER", "E-PER", "S-LOC", "O"], ["B-ORG", "I-ORG", "E-ORG"]],
            [["B-PER", "E-PER", "B-LOC", "E-LOC"], ["B-ORG", "I-ORG", "E-ORG"]],
            2 / 3,
            2 / 3,
        ),
        # the same in BILOU: L(ast) and U(nit) are BIOES's E and S
        (
            [["B-PER", "L-PER", "U-LOC", "O"], ["B-ORG", "I-ORG", "L-ORG"]],
            [["B-PER", "L-PER", "B-LOC", "L-LOC"], ["B-ORG", "I-ORG", "L-ORG"]],
            2 / 3,
            2 / 3,
        ),
        # entities of one token only (S-), no B- anywhere: PER right, LOC missed, ORG taken
        # for a LOC
        (
            [["S-PER", "O", "S-LOC", "O"], ["S-ORG"]],
            [["S-PER", "O", "O", "O"], ["S-LOC"]],
            1 / 2,
            1 / 3,
        ),
    ],
)
def test_tagging_entity_scores_for_bioes_and_bilou(gold, pred, precision, recall):
    results = tagging_metrics(gold, pred)
    assert results["entity_precision"] == pytest.approx(precision)
    assert results["entity_recall"] == pytest.approx(recall)
    if "L-PER" not in gold[0]:  # seqeval reads BIOES as it is
        assert results["entity_f1"] == pytest.approx(seqeval_metrics.f1_score(gold, pred))


def test_tagging_names_the_sentence_whose_length_differs():
    with pytest.raises(ValueError, match="sentence 1 has 2 gold tags but 1 predicted"):
        tagging_metrics([["O"], ["O", "O"]], [["O"], ["O"]])


# --- generated text --------------------------------------------------------------------------


def test_identical_texts_score_100_everywhere():
    texts = ["the cat sat on the mat today", "a quick brown fox jumps over the dog"]
    results = generation_metrics(texts, texts)
    for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert results[name] == pytest.approx(100.0), name


def test_rouge_of_disjoint_texts_is_zero_and_partial_overlap_matches_hand_value():
    disjoint = generation_metrics(["alpha beta gamma"], ["delta epsilon zeta"], metrics=["rouge"])
    assert disjoint == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # 2 of 3 unigrams shared each way: P = R = F = 2/3; bigrams: 1 of 2 ("the cat").
    partial = generation_metrics(["the cat sat"], ["the cat ran"], metrics=["rouge"])
    assert partial["rouge1"] == pytest.approx(200 / 3)
    assert partial["rouge2"] == pytest.approx(50.0)


def test_chinese_is_told_from_the_references_and_split_by_character():
    ref = ["我爱北京天安门。", "今天天气很好，我们去公园散步吧。"]
    assert text_language(ref) == "zh" and text_language(["the cat sat"]) == "en"
    assert text_language(["GPT 模型的训练数据"]) == "zh"  # mixed, mostly ideographs
    same = generation_metrics(ref, ref)
    for name in ("bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert same[name] == pytest.approx(100.0), name
    # Forced to English rules, each sentence is one "word" to sacrebleu's 13a and none to
    # rouge-score (it keeps ASCII only): the scores an identical Chinese reply used to get.
    english = generation_metrics(ref, ref, metrics=["bleu", "rouge"], lang="en")
    assert english["bleu"] == 0.0 and english["rouge1"] == 0.0
    # By characters: 我 爱 北 京 against 我 爱 上 海 share 2 of 4 each way.
    half = generation_metrics(["我爱上海"], ["我爱北京"], metrics=["rouge"])
    assert half["rouge1"] == pytest.approx(50.0)
    assert half["rouge2"] == pytest.approx(100 / 3)  # 我爱 of 3 bigrams
    assert sacrebleu.corpus_bleu(["我爱上海"], [["我爱北京"]], tokenize="zh").score == (
        pytest.approx(generation_metrics(["我爱上海"], ["我爱北京"], metrics=["bleu"])["bleu"])
    )
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        generation_metrics(ref, ref, lang="fr")


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Cat!", "cat"),
        ("  an   apple. ", "apple"),
        ("Theory of a-b", "theory of ab"),  # "the" inside a word stays; hyphens go
        ("A, B, and C", "b and c"),  # "a" is an article, "b" and "c" are not
    ],
)
def test_normalize_answer_follows_squad(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_compares_normalized_answers():
    results = generation_metrics(
        ["The Eiffel Tower.", "Paris", "cats"], ["eiffel tower", "London", "cat"], ["exact_match"]
    )
    assert results == {"exact_match": pytest.approx(100 / 3)}


def test_unknown_generation_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: \\['bleu', 'chrf', 'rouge', 'exact_match'\\]"):
        generation_metrics(["a"], ["a"], metrics=["meteor"])


# --- perplexity ------------------------------------------------------------------------------


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text), dtype=torch.long)


def test_perplexity_within_one_window_is_exp_of_mean_cross_entropy():
    model, tok = char_model(block_size=32)
    ids = _ids(tok, TEXT[:20])
    with torch.no_grad():
        logits = model(ids[None])[0]  # [T, V]
    loss = F.cross_entropy(logits[:-1], ids[1:]).item()
    results = perplexity(model, ids.tolist())
    assert results["tokens"] == len(ids) - 1
    assert results["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_with_stride_one_gives_every_token_a_full_window():
    model, tok = char_model(block_size=8)
    ids = _ids(tok, TEXT[:30])
    # The reference: each token t >= 1 scored alone, after the (up to) 8 tokens before it.
    nll = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            context = ids[max(0, t - 8) : t]
            nll.append(-F.log_softmax(model(context[None])[0, -1], dim=-1)[ids[t]].item())
    results = perplexity(model, ids.tolist(), stride=1, batch_size=4)
    assert results["tokens"] == len(ids) - 1
    assert results["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)


@pytest.mark.parametrize("stride", [None, 1, 3, 8])
def test_perplexity_scores_every_token_but_the_first_once(stride):
    model, tok = char_model(block_size=8)
    ids = _ids(tok, TEXT[:30]).tolist()
    one_by_one = perplexity(model, ids, stride=stride, batch_size=1)
    batched = perplexity(model, ids, stride=stride, batch_size=5)
    assert one_by_one["tokens"] == batched["tokens"] == len(ids) - 1
    assert batched["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)


@pytest.mark.parametrize("n, block, stride", [(2, 4, 2), (9, 8, 4), (50, 8, 3), (50, 8, 8)])
def test_perplexity_windows_cover_each_target_once_within_the_context(n, block, stride):
    targets = []
    for start, end, n_scored in perplexity_windows(n, block, stride):
        assert end - start <= block + 1  # the model reads at most block tokens
        assert 1 <= n_scored <= end - start - 1  # every target has context in its window
        targets += range(end - n_scored, end)
    assert targets == list(range(1, n))


def test_perplexity_scores_with_dropout_off_and_restores_training_mode():
    model, tok = char_model(block_size=16, dropout=0.5)
    ids = _ids(tok, TEXT).tolist()
    expected = perplexity(model, ids)["loss"]  # char_model returns the model in eval mode
    model.train()
    assert perplexity(model, ids)["loss"] == pytest.approx(expected, rel=1e-6)
    assert model.training


def test_perplexity_rejects_bad_input():
    model, _ = char_model(block_size=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [3])
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride must be in 1..block_size"):
            perplexity(model, [1, 2, 3], stride=stride)


# --- continuation log-probabilities ----------------------------------------------------------


def _direct_logprob(model: GPT, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded forward pass."""
    ids = torch.tensor(context + continuation)
    with torch.no_grad():  # the last token is only a target: the model need not read it
        logprobs = F.log_softmax(model(ids[None, :-1])[0], dim=-1)  # [T - 1, V]
    # the token at position p is predicted by the logits at p - 1
    return sum(logprobs[len(context) + j - 1, tok].item() for j, tok in enumerate(continuation))


def test_continuation_logprobs_are_unchanged_by_batching_and_padding():
    model, tok = char_model(block_size=32)
    pairs = [("the quick", " brown"), ("a", " lazy dog."), ("over the lazy", " d"), ("fox", " j")]
    contexts = [tok.encode(c) for c, _ in pairs]
    continuations = [tok.encode(x) for _, x in pairs]
    scores = continuation_logprobs(model, contexts, continuations, batch_size=3)
    expected = [_direct_logprob(model, c, x) for c, x in zip(contexts, continuations, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-4)


def test_continuation_logprobs_drop_context_from_the_left_when_too_long():
    model, tok = char_model(block_size=16)
    context, continuation = tok.encode(TEXT[:30]), tok.encode(" dog")
    # 17 tokens fit: the model reads 16, and the last token is only a target.
    expected = _direct_logprob(model, context[-(17 - len(continuation)) :], continuation)
    [score] = continuation_logprobs(model, [context], [continuation])
    assert score == pytest.approx(expected, abs=1e-4)


def test_continuation_logprobs_reject_pairs_they_cannot_score():
    model, _ = char_model(block_size=8)
    with pytest.raises(ValueError, match="empty context"):
        continuation_logprobs(model, [[]], [[1]])
    with pytest.raises(ValueError, match="1 to block_size"):
        continuation_logprobs(model, [[1]], [[2] * 9])
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        continuation_logprobs(model, [[1], [2]], [[3]])


# --- multiple choice -------------------------------------------------------------------------

QA_TEXT = TEXT + "QA:?"


class UnigramModel(nn.Module):
    """A stand-in GPT whose every position predicts the same distribution, so a continuation's
    log-probability is a sum of fixed per-character values we can reason about."""

    def __init__(self, logits: torch.Tensor, block_size: int):
        super().__init__()
        self.logits = nn.Parameter(logits)  # [V]
        self.config = SimpleNamespace(block_size=block_size)
        self.context = block_size  # the positions an input may take (GPT.context)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*idx.shape, -1)  # [B, T, V]


def test_multiple_choice_accuracy_and_length_normalised_accuracy():
    tok = char_tokenizer(QA_TEXT)
    logits = torch.zeros(tok.vocab_size)
    logits[tok.encode("x")[0]] = 5.0  # "x" is likely (log p ~ -0.2); every other char ~ -5.2
    lm = LM(UnigramModel(logits, block_size=64), tok)
    items = [
        # " xx" beats " ab" on both measures.
        {"question": "which", "choices": ["ab", "xx"], "answer": 1},
        # Summed, " x" (-5.4) beats " xxxxxxxx" (-6.9): the space costs both the same, and the
        # long one pays for more tokens. Per character, the long one wins (-0.9 vs -5.4).
        {"question": "which", "choices": ["x", "xxxxxxxx"], "answer": 1},
    ]
    results = multiple_choice(lm, items)
    assert results == {"accuracy": 0.5, "accuracy_norm": 1.0, "n": 2, "shots": 0}


def test_multiple_choice_picks_the_choice_the_model_scores_highest():
    tok = char_tokenizer(QA_TEXT)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=64)).eval()
    items = [
        {"question": "the quick brown", "choices": ["fox", "dog", "cat"], "answer": 0},
        {"question": "over the lazy", "choices": ["fox", "dog"], "answer": 1},
        {"question": "jumps", "choices": ["over", "under", "by"], "answer": 0},
    ]
    correct = 0
    for item in items:
        prompt = tok.encode(build_prompt(item, []))
        scores = [_direct_logprob(model, prompt, tok.encode(" " + c)) for c in item["choices"]]
        correct += scores.index(max(scores)) == item["answer"]
    results = multiple_choice(LM(model, tok), items, batch_size=3)
    assert results["accuracy"] == correct / len(items)


ITEMS = [{"question": f"q{i}", "choices": [f"a{i}", f"b{i}"], "answer": i % 2} for i in range(5)]


def test_build_prompt_puts_solved_examples_before_the_question():
    prompt = build_prompt(ITEMS[0], [ITEMS[1], ITEMS[2]])
    assert prompt == (
        "Question: q1\nAnswer: b1\n\nQuestion: q2\nAnswer: a2\n\nQuestion: q0\nAnswer:"
    )


def test_draw_shots_is_seeded_and_never_draws_the_item():
    for seed in range(20):
        shots = draw_shots(ITEMS[2], ITEMS, 3, random.Random(seed))
        assert len(shots) == 3 and ITEMS[2] not in shots
        assert len({s["question"] for s in shots}) == 3  # without replacement
        assert shots == draw_shots(ITEMS[2], ITEMS, 3, random.Random(seed))
    # a pool holding copies of the item still yields other examples
    shots = draw_shots(ITEMS[0], [ITEMS[0]] * 5 + [ITEMS[1]], 1, random.Random(0))
    assert shots == [ITEMS[1]]


def test_multiple_choice_prompts_hold_k_shots(monkeypatch):
    tok = char_tokenizer(QA_TEXT + "0123456789")
    lm = LM(UnigramModel(torch.zeros(tok.vocab_size), block_size=256), tok)
    seen = []

    def record(model, contexts, continuations, batch_size):
        seen.extend(tok.decode(c) for c in contexts)
        return [0.0] * len(contexts)

    monkeypatch.setattr(evaluate, "continuation_logprobs", record)
    results = multiple_choice(lm, ITEMS[:3], shots=2, train_items=ITEMS[3:])
    assert results["shots"] == 2
    assert len(seen) == 3 * 2  # one context per choice
    for context, item in zip(seen[::2], ITEMS[:3], strict=True):
        assert context.count("Question:") == 3
        assert context.endswith(f"Question: {item['question']}\nAnswer:")


def test_multiple_choice_rejects_too_few_examples_for_the_shots():
    lm = LM(UnigramModel(torch.zeros(40), block_size=64), char_tokenizer(QA_TEXT))
    with pytest.raises(ValueError, match="5 shots asked for, but the pool has 4"):
        multiple_choice(lm, ITEMS, shots=5)
    with pytest.raises(ValueError, match="3 shots asked for, but the pool has 2"):
        multiple_choice(lm, ITEMS[:1], shots=3, train_items=ITEMS[1:3])


# --- reporting ---------------------------------------------------------------------------------


def test_format_table_aligns_two_columns():
    table = format_table({"accuracy": 0.75, "perplexity": 12.3456789, "n": 4}, title="eval")
    lines = table.splitlines()
    assert lines[0] == "eval"
    assert len({len(line) for line in lines[1:]}) == 1  # every row as wide as the rule
    assert lines[3].split() == ["accuracy", "0.7500"]
    assert lines[4].split() == ["perplexity", "12.3457"]
    assert lines[5].split() == ["n", "4"]


def test_save_results_writes_json_into_new_directories(tmp_path):
    path = tmp_path / "runs" / "eval" / "results.json"
    save_results({"loss": 2.5, "perplexity": math.inf, "task": {"n": 3}}, path)
    assert json.loads(path.read_text()) == {"loss": 2.5, "perplexity": None, "task": {"n": 3}}
    assert path.read_text().startswith('{\n  "loss"')
