"""Speculative decoding (generation/speculative.py): greedy output token-identical to plain
decoding with either drafter, through stop strings, end tokens, penalties and the context's
edge; sampled tokens distributed exactly as the Sampler's chain says; the drafters' guesses
and the acceptance counters."""

import dataclasses

import pytest
import torch
from conftest import char_model, tiny_chat_lm

import gptkit
from gptkit.api import LM
from gptkit.cli import main
from gptkit.config import ConfigError, preset
from gptkit.generation import SampleConfig, Sampler, speculative
from gptkit.generation.decode import new_sampler
from gptkit.generation.speculative import (
    PromptLookup,
    Speculated,
    SpeculationStats,
    copy_on,
    speculative_complete,
)
from gptkit.model import GPT

REPEATS = "hello there, how are you? I am fine, thanks.\n" * 3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def noisy_copy(model: GPT, noise: float, block_size: int | None = None) -> GPT:
    """A draft that predicts much as `model` does: its weights plus noise."""
    config = dataclasses.replace(model.config, block_size=block_size or model.config.block_size)
    torch.manual_seed(1)
    draft = GPT(config).eval()
    with torch.no_grad():
        for mine, theirs in zip(draft.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs + noise * torch.randn_like(theirs))
    return draft


def stranger(vocab_size: int) -> GPT:
    """An unrelated draft: another architecture, its embedding padded past the tokenizer."""
    torch.manual_seed(2)
    return GPT(preset("tiny", vocab_size=vocab_size + 3, block_size=512)).eval()


def drafters(lm: LM) -> dict[str, dict]:
    """The speculation options to compare with plain decoding, by name."""
    return {
        "lookup-1": dict(prompt_lookup=1),
        "lookup-4": dict(prompt_lookup=4),
        "lookup-16": dict(prompt_lookup=16),
        "close-draft": dict(draft=noisy_copy(lm.model, 0.01), draft_tokens=3),
        "stranger-draft": dict(draft=stranger(lm.tokenizer.vocab_size), draft_tokens=5),
    }


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm()


@pytest.fixture(scope="module")
def drafts(lm):
    return drafters(lm)


NAMES = ["lookup-1", "lookup-4", "lookup-16", "close-draft", "stranger-draft"]


def assert_settled(c: Speculated) -> None:
    """Each pass settles one token of the model's own plus the guesses it accepted; a reply
    that ran to its budget kept them all (speculation never overruns the budget)."""
    s = c.stats
    assert 0 <= s.accepted <= s.drafted and s.passes >= 1
    if c.finish_reason == "length":
        assert s.passes + s.accepted == len(c.ids)
    else:
        assert s.passes + s.accepted >= len(c.ids)


CASES = {
    "length": dict(max_new_tokens=60),
    "penalties": dict(
        max_new_tokens=60, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2
    ),
    "logprobs": dict(max_new_tokens=30, logprobs=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_greedy_is_token_identical_to_plain_decoding(lm, drafts, name, case):
    options = dict(temperature=0, **CASES[case])
    plain = lm.complete(REPEATS, **options)[0]
    fast = lm.complete(REPEATS, **options, **drafts[name])[0]
    assert isinstance(fast, Speculated) and not isinstance(plain, Speculated)
    assert fast.ids == plain.ids and len(plain.ids) == options["max_new_tokens"]
    assert (fast.text, fast.finish_reason) == (plain.text, plain.finish_reason)
    if "logprobs" in options:  # the model's own, from a pass over several tokens
        assert fast.top_logprobs[0].keys() == plain.top_logprobs[0].keys()
        assert fast.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
        assert len(fast.top_logprobs) == len(plain.top_logprobs)
    assert_settled(fast)


def test_guesses_are_accepted_where_they_should_be(lm, drafts):
    """The counters are consistent with what was checked and say something true: the repeated
    prompt's reply is copied from it, and a close draft is mostly right."""
    by_name = {}
    for name in NAMES:
        c = lm.complete(REPEATS, temperature=0, max_new_tokens=60, **drafts[name])[0]
        assert_settled(c)
        by_name[name] = c.stats
    assert by_name["lookup-4"].accepted > 10
    assert by_name["lookup-4"].passes < 50  # fewer passes than the 60 plain decoding needs
    assert by_name["close-draft"].acceptance > 0.4
    assert by_name["close-draft"].tokens_per_pass > 1.5
    # A draft with other weights, architecture and vocabulary size guesses little right, yet
    # the text above was identical: exactness never depends on the drafter.
    assert by_name["stranger-draft"].acceptance < by_name["close-draft"].acceptance


@pytest.mark.parametrize("name", NAMES)
def test_stop_strings_and_end_tokens_end_the_reply_where_plain_decoding_does(lm, drafts, name):
    options = dict(temperature=0, max_new_tokens=60)
    plain = lm.complete(REPEATS, **options)[0]
    for end in (dict(stop=[plain.text[20:23]]), dict(stop_ids=[plain.ids[25]])):
        want = lm.complete(REPEATS, **options, **end)[0]
        got = lm.complete(REPEATS, **options, **end, **drafts[name])[0]
        assert want.finish_reason == "stop" and len(want.ids) < 60
        assert (got.ids, got.text, got.finish_reason) == (want.ids, want.text, want.finish_reason)
        assert_settled(got)
        streamed = "".join(lm.stream(REPEATS, **options, **end, **drafts[name]))
        assert streamed == want.text


@pytest.mark.parametrize("name", NAMES)
def test_the_context_caps_speculation_as_it_caps_plain_decoding(name):
    small = tiny_chat_lm(block_size=48)
    ids = small.prompt_ids(REPEATS)[:40]
    prompt = small.tokenizer.decode(ids)
    assert small.prompt_ids(prompt) == ids
    plain = small.complete(prompt, temperature=0, max_new_tokens=30)[0]
    assert len(plain.ids) == 48 - 40 + 1  # the budget: the last token needs no position
    fast = small.complete(prompt, temperature=0, max_new_tokens=30, **drafters(small)[name])[0]
    assert fast.ids == plain.ids
    assert_settled(fast)


def test_a_draft_with_a_shorter_context_stops_guessing_at_its_end(lm, monkeypatch):
    proposals = []  # (sequence length, guesses)
    propose = speculative.DraftModel.propose

    def recorded(self, ids, k, sampler):
        draft = propose(self, ids, k, sampler)
        proposals.append((len(ids), len(draft.tokens)))
        return draft

    monkeypatch.setattr(speculative.DraftModel, "propose", recorded)
    short = noisy_copy(lm.model, 0.01, block_size=40)
    prompt = "hello there, how are you?"
    plain = lm.complete(prompt, temperature=0, max_new_tokens=50)[0]
    fast = lm.complete(prompt, temperature=0, max_new_tokens=50, draft=short)[0]
    assert fast.ids == plain.ids
    assert_settled(fast)
    # It guesses while its context holds the sequence and its guesses (the last one is never
    # fed), and not past it.
    assert all(n + k - 1 <= 40 for n, k in proposals if k > 0)
    assert sum(k for _, k in proposals) == fast.stats.drafted > 0
    assert [k for n, k in proposals if n > 40] == [0] * sum(n > 40 for n, _ in proposals)
    assert proposals[-1][0] > 41  # ... and the sequence did go past it


def test_several_prompts_are_speculated_one_by_one(lm):
    prompts = [REPEATS, "I am fine, thanks. I am fine"]
    want = [lm.generate(p, temperature=0, max_new_tokens=20)[0] for p in prompts]
    assert lm.generate(prompts, temperature=0, max_new_tokens=20, prompt_lookup=3) == want


def test_what_speculation_cannot_do_is_refused_or_left_to_plain_decoding(lm, drafts):
    for many in (dict(num_beams=2), dict(num_return_sequences=2)):
        with pytest.raises(ConfigError, match="prompt_lookup speculates one sequence"):
            lm.generate("hi", prompt_lookup=3, **many)
    with pytest.raises(ConfigError, match=">= 0"):
        SampleConfig(prompt_lookup=-1)
    with pytest.raises(ConfigError, match="must be an integer"):
        SampleConfig(draft_tokens=2.5)
    # A draft model is equipment, not a request: beam search runs plainly beside it.
    options = dict(num_beams=3, temperature=0, max_new_tokens=10)
    beams = lm.complete(REPEATS, **options)[0]
    with_draft = lm.complete(REPEATS, draft=drafts["close-draft"]["draft"], **options)[0]
    assert not isinstance(with_draft, Speculated) and with_draft.ids == beams.ids
    model, char_tok = char_model()
    with pytest.raises(ConfigError, match="share the tokenizer"):
        lm.generate("hi", draft=LM(model, char_tok))
    with pytest.raises(ConfigError, match="share the tokenizer"):
        lm.generate("hi", draft=model)  # 30 token ids; the tokenizer has 286


def test_prompt_lookup_copies_what_followed_the_latest_match():
    # The latest earlier 1 2 3 (at 4, not at 0) is followed by 7 5 8.
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 5, 8, 1, 2, 3]
    assert PromptLookup().propose(ids, 3, None).tokens == [7, 5, 8]
    # No earlier 4 6 7: the last two tokens, 6 7, match at 1.
    assert PromptLookup().propose([5, 6, 7, 4, 6, 7], 2, None).tokens == [4, 6]
    # Where the copy reaches the present it reads on in what it copied: the text repeats.
    assert PromptLookup().propose([1, 2, 1, 2], 5, None).tokens == [1, 2, 1, 2, 1]
    assert copy_on([7, 8, 9], 2, 4) == [9, 9, 9, 9]
    # No match at all: no guess. The index grows with the sequence.
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3], 2, None).tokens == []
    assert lookup.propose([1, 2, 3, 1], 2, None).tokens == [2, 3]


def test_distribution_is_what_pick_draws_from_and_fork_keeps_the_state():
    torch.manual_seed(0)
    logits = torch.randn(1, 30) * 3  # the char model's vocabulary
    for options in (
        dict(temperature=0, repetition_penalty=1.5),
        dict(temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, frequency_penalty=0.5),
    ):
        for seed in range(20):
            sample = SampleConfig(seed=seed, **options)
            picker = sampler_for(sample)
            reader = sampler_for(sample)
            token = int(picker.pick(logits).tokens[0])
            p = reader.distribution(logits)[0]
            if sample.greedy:
                assert p[token] == 1 and p.sum() == 1
            else:
                assert token == int(torch.multinomial(p, 1, generator=reader.generator))
    sampler = sampler_for(SampleConfig(frequency_penalty=1.0))
    twin = sampler.fork()
    twin.advance(torch.tensor([7]))
    assert twin.counts[0, 7] == 1 and sampler.counts[0, 7] == 0


def sampler_for(sample: SampleConfig) -> Sampler:
    return Sampler(sample, [[1, 2, 3]], vocab=30)


def test_the_cache_truncates_only_what_it_holds():
    model, _ = char_model()
    cache = model.new_cache(1, 16)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.truncate(1)
    assert cache.length == 1
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(2)


# --- Sampling: the first tokens' distribution, exactly -----------------------------------------
#
# A tiny char model whose logit_bias makes a, b and c the top three at every step (top_k=3),
# so three tokens have 27 outcomes, each with a probability the Sampler's chain gives exactly;
# the penalties make each step's probabilities depend on the tokens before it. The prompt is
# made of a, b and c too, so prompt lookup's guesses are often accepted and often refused.

NEW = 3
DRAWS = 600
CHI2_999 = 54.05  # chi-square's 0.999 quantile at 26 degrees of freedom (27 outcomes)


def biased_sampling(model, tok) -> SampleConfig:
    abc = tok.encode("abc")
    return SampleConfig(
        max_new_tokens=NEW,
        temperature=1.2,
        top_k=3,
        logit_bias={t: 6.0 for t in abc},
        repetition_penalty=1.3,
        frequency_penalty=0.8,
        presence_penalty=0.4,
    )


@torch.inference_mode()
def exact_distribution(model, prompt, sample, vocab, penalties_follow=True) -> dict:
    """{first NEW tokens: probability}, from full forward passes (no cache) and a Sampler in
    the state after each prefix; penalties_follow=False leaves the state at the prompt (a
    deliberately wrong reference)."""
    probs = {}

    def walk(prefix: list[int], mass: float) -> None:
        if len(prefix) == NEW:
            probs[tuple(prefix)] = mass
            return
        sampler = new_sampler(model, [prompt], sample, vocab)
        for t in prefix if penalties_follow else []:
            sampler.advance(torch.tensor([t]))
        p = sampler.distribution(model(torch.tensor([prompt + prefix]))[:, -1])[0]
        for t in p.nonzero()[:, 0].tolist():
            walk([*prefix, t], mass * float(p[t]))

    walk([], 1.0)
    return probs


def chi_square(counts: dict, probs: dict, n: int) -> float:
    assert set(counts) <= set(probs), "a sequence the chain gives probability 0 was drawn"
    return sum((counts.get(o, 0) - n * p) ** 2 / (n * p) for o, p in probs.items())


def draw_counts(model, prompt, sample, vocab, n, **speculation) -> tuple[dict, SpeculationStats]:
    counts, total = {}, SpeculationStats()
    for seed in range(n):
        options = dataclasses.replace(sample, seed=seed, **speculation.get("options", {}))
        c = speculative_complete(
            model, prompt, options, vocab_size=vocab, draft=speculation.get("draft")
        )
        counts[tuple(c.ids)] = counts.get(tuple(c.ids), 0) + 1
        total.drafted += c.stats.drafted
        total.accepted += c.stats.accepted
    return counts, total


@pytest.fixture(scope="module")
def biased():
    model, tok = char_model()
    prompt = tok.encode("cabbacabcacbbcab")
    sample = biased_sampling(model, tok)
    probs = exact_distribution(model, prompt, sample, tok.vocab_size)
    assert len(probs) == 27 and min(probs.values()) * DRAWS >= 5  # chi-square's rule of thumb
    return model, tok, prompt, sample, probs


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_sampling_keeps_the_distribution_of_the_first_tokens(biased, drafter):
    model, tok, prompt, sample, probs = biased
    if drafter == "prompt-lookup":
        speculation = dict(options=dict(prompt_lookup=NEW))
    else:  # its own distribution q, near p: min(1, p/q) and max(p - q, 0) both matter
        speculation = dict(draft=noisy_copy(model, 0.1), options=dict(draft_tokens=NEW))
    counts, stats = draw_counts(model, prompt, sample, tok.vocab_size, DRAWS, **speculation)
    # Both branches ran many times: guesses kept, and guesses refused and replaced.
    assert stats.accepted > 100 and stats.drafted - stats.accepted > 100
    # Fixed seeds: this statistic is the same on every run, not a coin toss.
    assert chi_square(counts, probs, DRAWS) < CHI2_999
    # The check has teeth: against the distribution with stale penalties it fails.
    stale = exact_distribution(model, prompt, sample, tok.vocab_size, penalties_follow=False)
    assert chi_square(counts, stale, DRAWS) > 2 * CHI2_999


def test_the_distribution_check_catches_a_wrong_acceptance_rule(biased, monkeypatch):
    model, tok, prompt, sample, probs = biased
    monkeypatch.setattr(speculative, "judge", lambda p, guess, q, sampler: guess)  # keep all
    n = 200
    counts, _ = draw_counts(model, prompt, sample, tok.vocab_size, n, options=dict(prompt_lookup=2))
    assert chi_square(counts, probs, n) > 4 * CHI2_999


# --- Entry points ------------------------------------------------------------------------------


def test_load_takes_a_draft_and_the_cli_speculates(capsys, char_checkpoint):
    lm = gptkit.load(char_checkpoint, device="cpu", draft=char_checkpoint)
    assert isinstance(lm.draft, GPT)
    plain = gptkit.load(char_checkpoint, device="cpu")
    options = dict(temperature=0, max_new_tokens=20)
    c = lm.complete("the ", **options)[0]
    assert c.ids == plain.complete("the ", **options)[0].ids
    assert c.stats.drafted > 0 and c.stats.acceptance > 0.9  # the draft is the model itself
    base = ["generate", "--model", char_checkpoint, "--prompt", "the quick brown fox. the "]
    base += ["--temperature", "0", "--max-new-tokens", "20", "--device", "cpu"]
    assert main([str(a) for a in base]) == 0
    want, _ = capsys.readouterr()
    for flags in (["--prompt-lookup", "4"], ["--draft-model", char_checkpoint, "--stream"]):
        assert main([str(a) for a in [*base, *flags]]) == 0
        out, err = capsys.readouterr()
        assert out == want
    assert main([str(a) for a in [*base, "--draft-model", char_checkpoint]]) == 0
    out, err = capsys.readouterr()
    assert out == want and "speculative decoding:" in err and "drafted tokens accepted" in err


def test_generation_with_speculation_keeps_the_models_mode(lm, drafts):
    draft = drafts["close-draft"]["draft"]
    lm.model.train()
    draft.train()
    try:
        lm.generate("hello", max_new_tokens=5, temperature=0, draft=draft)
        assert lm.model.training and draft.training
    finally:
        lm.model.eval()
        draft.eval()
