"""Recommendation: RecBole files, the leave-last-out split and its negatives, HR/NDCG, scoring
candidates after a shared history (against scoring each whole text), and the three commands."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptkit.api import load
from gptkit.checkpoint import save_checkpoint
from gptkit.cli_rank import trained_settings
from gptkit.config import ConfigError, preset
from gptkit.finetune import finetune
from gptkit.model import GPT
from gptkit.predict import batched_logits
from gptkit.recommend import RANK_LABELS, needs_ranker, rank_example, score_candidates
from gptkit.recsys import (
    Interactions,
    cases,
    context_text,
    popularity,
    rank_of_target,
    ranking_metrics,
    read_interactions,
    read_items,
    train_records,
)
from gptkit.surgery import set_head
from gptkit.tokenizer import char_tokenizer
from gptkit.train_config import FinetuneConfig, PeftConfig

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;|'()\n-"
N_ITEMS, N_USERS, PER_USER = 40, 12, 8


def write_recbole(folder: Path) -> Path:
    """N_USERS users with PER_USER interactions each, written out of time order; user u
    watches items u, u+1, ... (mod N_ITEMS) at times 10 * step."""
    folder.mkdir(parents=True, exist_ok=True)
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [
        f"{i}\tFilm {i}\t{1990 + i}\t{'Drama' if i % 2 else 'Comedy'}" for i in range(N_ITEMS)
    ]
    rows = [
        f"{u}\t{(u + step) % N_ITEMS}\t4\t{10 * step}"
        for u in range(1, N_USERS + 1)
        for step in range(PER_USER)
    ]
    (folder / "toy.item").write_text("\n".join(items) + "\n")
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    (folder / "toy.inter").write_text("\n".join([header, *reversed(rows)]) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return read_interactions(write_recbole(tmp_path_factory.mktemp("toy")))


def ranker(vocab: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", vocab_size=vocab, block_size=256))
    return set_head(model, "classify", list(RANK_LABELS)).eval()


def test_reading_orders_each_history_by_time(data):
    assert len(data.items) == N_ITEMS and len(data.histories) == N_USERS
    assert data.histories["3"] == [str((3 + s) % N_ITEMS) for s in range(PER_USER)]
    assert data.candidate_text("5") == "Film 5 | 1995 | Drama"
    assert data.history_text("5") == "Film 5"


def test_cases_leave_the_last_item_out_with_unseen_seeded_negatives(data):
    test = cases(data, "test", negatives=20, seed=1)
    assert [c.user for c in test] == [str(u) for u in range(1, N_USERS + 1)]
    for case in test:
        h = data.histories[case.user]
        assert case.candidates[0] == h[-1] and case.history == h[:-1]
        negatives = case.candidates[1:]
        assert len(set(negatives)) == 20 and not set(negatives) & set(h)
    assert cases(data, "test", 20, seed=1) == test  # seeded
    assert cases(data, "test", 20, seed=2) != test
    val = cases(data, "val", 20, seed=1)
    assert all(c.candidates[0] == data.histories[c.user][-2] for c in val)
    assert len(cases(data, "test", 5, users=4)) == 4
    full = cases(data, "test", negatives=None)[0]  # the whole catalogue the user left unseen
    assert len(full.candidates) == 1 + N_ITEMS - PER_USER
    with pytest.raises(ConfigError, match="unseen items"):
        cases(data, "test", negatives=N_ITEMS)


def test_training_records_never_hold_a_validation_or_test_target(data):
    records = train_records(data, negatives=2, history=3, per_user=0, seed=0)
    assert len(records) == N_USERS * (PER_USER - 3) * 3  # positions 1..5, each + 2 negatives
    user = data.histories["1"]
    positives = [cand for _, cand, label in records[: (PER_USER - 3) * 3] if label == "yes"]
    assert positives == [f"\nNext: {data.candidate_text(i)}" for i in user[1:-2]]
    last_context = records[(PER_USER - 4) * 3][0]
    assert last_context == context_text([data.history_text(i) for i in user[2:5]])  # 3 items
    assert len(train_records(data, 2, 3, per_user=2, seed=0)) == N_USERS * 2 * 3
    popular = train_records(data, 2, 3, per_user=1, seed=0, popular=True)
    counts = popularity(data, "val")  # what training sees: every user's items before val
    assert popular[0][1] == f"\nNext: {data.candidate_text(user[-3])} | {counts[user[-3]]} users"
    # more negatives in all than a user has unseen items: each position draws its own
    many = train_records(data, negatives=8, history=3, per_user=0, seed=0)
    unseen = {data.candidate_text(i) for i in data.items if i not in user}
    assert all(cand[len("\nNext: ") :] in unseen for _, cand, label in many[:45] if label == "no")


def test_ranking_metrics_by_hand():
    assert rank_of_target([0.9, 0.1, 0.5]) == 0
    assert rank_of_target([0.5, 0.5, 0.1]) == 1  # a tie counts against the target
    assert rank_of_target([1.0, 1.0, 1.0]) == 2  # a constant scorer ranks it last
    m = ranking_metrics([0, 3, 10], k=10)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)


def test_popularity_counts_only_what_the_split_shows(data):
    counts = popularity(data, "test")
    assert sum(counts.values()) == N_USERS * (PER_USER - 1)
    assert sum(popularity(data, "val").values()) == N_USERS * (PER_USER - 2)


def test_shared_history_scores_equal_whole_texts(data):
    """The cached-history path gives each candidate the probability that scoring the whole
    example (rank_example, as training reads it) gives."""
    tok = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    model = ranker(tok.vocab_size)
    context = context_text(["Film 1", "Film 2", "Film 3"])
    texts = [f"\nNext: {data.candidate_text(str(i))}" for i in range(9)]
    fast = score_candidates(model, tok, context, texts, batch_size=4)  # 3 chunks
    rows = [rank_example(tok, context, t, 0, 256) for t in texts]
    whole = torch.stack([lg[-1] for lg in batched_logits(model, rows, 0, 3)]).softmax(-1)
    torch.testing.assert_close(fast, whole[:, RANK_LABELS.index("yes")], atol=1e-5, rtol=0)
    assert fast.std() > 0  # the candidates really differ


def test_a_model_without_the_rank_labels_is_refused():
    tok = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    lm = GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64))
    with pytest.raises(ConfigError, match=r"needs a model from `gptkit finetune rank`"):
        needs_ranker(lm, "ranking")
    with pytest.raises(ConfigError, match=r"labels no/yes\); this one has a classify head"):
        needs_ranker(set_head(lm, "classify", ["neg", "pos"]), "ranking")


def gptkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True)


def test_names_find_an_item_by_title_title_and_year_or_id():
    items = {"1": ["Star Wars", "1977"], "2": ["1", ""], "3": ["Star Wars", "1980"]}
    names = Interactions(items, {}).names()
    assert names["star wars"] == "1"  # a shared title: the first item's
    assert names["star wars (1980)"] == "3" and names["star wars (1977)"] == "1"
    assert names["1"] == "2" and names["3"] == "3"  # a title wins over another item's id
    assert "1 ()" not in names


def test_finetune_rank_then_eval_rank_and_recommend(tmp_path):
    folder = write_recbole(tmp_path / "toy")
    tok = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save_checkpoint(
        tmp_path / "base", GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=256)), tok
    )
    out = tmp_path / "run"
    done = gptkit(
        "finetune", "rank", "--model", str(tmp_path / "base"), "--data", str(folder),
        f"out_dir={json.dumps(str(out))}", "max_steps=3", "batch_size=8", "rank_negatives=2",
        "rank_history=3", "progress=false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accuracy" in json.loads((out / "val_metrics.json").read_text())
    assert trained_settings(str(out / "checkpoint")) == (3, False)  # what eval rank reads
    assert trained_settings(str(tmp_path / "base")) == (10, False)
    scores = tmp_path / "rank.json"
    done = gptkit(
        "eval", "rank", "--model", str(out / "checkpoint"), "--data", str(folder),
        "--negatives", "9", "--users", "5", "--out", str(scores),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "HR@10" in done.stdout and "most_popular" in done.stdout
    result = json.loads(scores.read_text())
    assert result["users"] == 5 and result["candidates"] == 10
    for name in ("model", "most_popular"):
        assert 0 <= result[name]["ndcg@10"] <= result[name]["hr@10"] <= 1
        assert len(result["ranks"][name]) == 5
    done = gptkit(
        "eval", "rank", "--model", str(out / "checkpoint"), "--data", str(folder), "--full",
        "--users", "2", "--history", "3",
    )  # fmt: skip
    assert done.returncode == 0 and "2 users, all unseen candidates each" in done.stdout
    done = gptkit(
        "recommend", "--model", str(out / "checkpoint"), "--items", str(folder / "toy.item"),
        "--history", "Film 1; Film 2", "-k", "4", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    picks = json.loads(done.stdout)
    assert len(picks) == 4 and not {"1", "2"} & {p["item"] for p in picks}
    assert [p["score"] for p in picks] == sorted((p["score"] for p in picks), reverse=True)
    # An item named by title and year (as MovieLens writes it) or by id is the catalogue's
    # item: read as its title, left out of the ranking; the same scores as above.
    done = gptkit(
        "recommend", "--model", str(out / "checkpoint"), "--items", str(folder / "toy.item"),
        "--history", "film 1 (1991); 2", "-k", "4", "--json",
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(done.stdout) == picks
    done = gptkit(
        "recommend", "--model", str(out / "checkpoint"), "--items", str(folder / "toy.item"),
        "--history", "Film 1; Film 99", "-k", "4", "--json",
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout) != picks
    assert done.stderr.strip() == (
        f"gptkit: note: --history 'Film 99' names no item of {folder / 'toy.item'}: read as "
        "text, nothing left out for it"
    )
    # bfloat16 matmuls (--dtype), as the bench scores: the same scores to bfloat16's precision
    done = gptkit(
        "recommend", "--model", str(out / "checkpoint"), "--items", str(folder / "toy.item"),
        "--history", "Film 1; Film 2", "-k", "4", "--json", "--keep-history", "--dtype", "bfloat16",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fp32 = {p["item"]: p["score"] for p in picks}
    bf16 = {p["item"]: p["score"] for p in json.loads(done.stdout) if p["item"] in fp32}
    assert bf16 and bf16 != {i: fp32[i] for i in bf16}  # bfloat16 really ran
    assert all(abs(bf16[i] - fp32[i]) < 0.03 for i in bf16)
    done = gptkit(
        "eval", "rank", "--model", str(out / "checkpoint"), "--data", str(folder),
        "--negatives", "9", "--users", "5", "--dtype", "bfloat16",
    )  # fmt: skip
    assert done.returncode == 0 and "HR@10" in done.stdout, done.stderr


@pytest.mark.parametrize(
    "method", ["lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt", "lora+int8"]
)
def test_every_peft_method_trains_a_ranker(tmp_path, method):
    """The rank objective with each parameter-efficient method: it trains, and its adapter on
    the base model is the fine-tuned ranker."""
    folder = write_recbole(tmp_path / "toy")
    tok = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    base = GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=256))
    save_checkpoint(tmp_path / "base", base, tok)
    name, _, quantize = method.partition("+")
    peft = PeftConfig(method=name, prefix_length=4, quantize=quantize or "none", tinit=1)
    config = FinetuneConfig(
        objective="rank", init_from=str(tmp_path / "base"), data=str(folder),
        out_dir=str(tmp_path / "run"), max_steps=3, batch_size=8, rank_negatives=2,
        rank_history=3, progress=False, tensorboard=False, threads=1, peft=peft,
    )  # fmt: skip
    result = finetune(config)
    assert result.train.steps == 3 and math.isfinite(result.train.val_loss)
    full = load(result.train.checkpoint)
    on_base = load(tmp_path / "base", adapter=tmp_path / "run" / "adapter")
    x = torch.tensor([tok.encode("Film 1; Film 2")])
    torch.testing.assert_close(on_base.model(x), full.model(x))


def test_bad_inputs_are_one_line(tmp_path):
    folder = write_recbole(tmp_path / "toy")
    (folder / "toy.item").unlink()
    done = gptkit("eval", "rank", "--model", "x", "--data", str(folder))
    assert done.returncode == 2 and "its item file toy.item is missing" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "plain.tsv").write_text("1\tFilm one\n2\n")
    with pytest.raises(ConfigError, match="line 2 is not 'id<TAB>text'"):
        read_items(tmp_path / "plain.tsv")
    bad = write_recbole(tmp_path / "bad")
    with (bad / "toy.inter").open("a") as f:
        f.write("1\t999\t4\t5\n")
    with pytest.raises(ConfigError, match="names item '999'"):
        read_interactions(bad)


def test_a_ranker_trained_on_popularity_is_evaluated_and_used_with_it(tmp_path):
    folder = write_recbole(tmp_path / "toy")
    tok = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    save_checkpoint(tmp_path / "base", ranker(tok.vocab_size), tok)
    out = tmp_path / "run"
    done = gptkit(
        "finetune", "rank", "--model", str(tmp_path / "base"), "--data", str(folder),
        f"out_dir={json.dumps(str(out))}", "max_steps=1", "batch_size=4", "rank_popular=true",
        "progress=false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert trained_settings(str(out / "checkpoint")) == (10, True)
    done = gptkit("eval", "rank", "--model", str(out / "checkpoint"), "--data", str(folder),
                  "--negatives", "5", "--users", "2")  # fmt: skip
    assert done.returncode == 0 and "2 users, 6 candidates" in done.stdout, done.stderr
    items = ["--items", str(folder / "toy.item"), "--history", "Film 1", "-k", "2"]
    done = gptkit("recommend", "--model", str(out / "checkpoint"), *items)
    assert done.returncode == 2 and "rank_popular=true: give --data" in done.stderr
    done = gptkit("recommend", "--model", str(out / "checkpoint"), *items, "--data", str(folder))
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 2, done.stderr
