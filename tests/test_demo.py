"""The main job (until the Trainer lands): a short run must learn the generated corpus."""

import torch

import gptkit
from gptkit.demo import make_corpus, run_demo


def test_corpus_is_deterministic():
    assert make_corpus(50, seed=1) == make_corpus(50, seed=1) != make_corpus(50, seed=2)


def test_a_short_demo_run_learns_and_samples(tmp_path):
    lm = gptkit.load(run_demo(tmp_path, steps=30), device="cpu")
    ids = torch.tensor([lm.tokenizer.encode(make_corpus(20, seed=7))[:128]])
    _, loss = lm.model(ids[:, :-1], ids[:, 1:])
    assert loss.item() < 2.5  # an untrained model scores ~ln(512) = 6.2 on this text
    text = lm.generate("Ada went to the", max_new_tokens=20, temperature=0)[0]
    assert text.strip() and "\ufffd" not in text
