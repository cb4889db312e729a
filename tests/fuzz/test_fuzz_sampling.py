"""Property tests for sampling parameters: any values for every SampleConfig field, through
SampleConfig and generation on a tiny random model, give a ConfigError or valid token ids.

Values are drawn from the useful range, its edges (0, 1, tiny temperatures, huge top_k) and
beyond (negative, NaN, infinity, floats where ints belong, strings, bools, empty stop strings,
seeds past 64 bits). Sizes that only cost memory (num_beams, num_return_sequences) stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import char_model
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.config import ConfigError
from gptkit.engine import Engine, Sequence
from gptkit.generation import SampleConfig, generate, stream

CONTEXT = 24


@pytest.fixture(scope="module")
def tiny():
    model, tok = char_model(block_size=CONTEXT)
    return model, tok


def wrong_types() -> st.SearchStrategy:
    return st.one_of(st.text(max_size=3), st.booleans(), st.none(), st.just([1]))


def floats(lo: float, hi: float) -> st.SearchStrategy:
    return st.one_of(
        st.floats(lo, hi),
        st.sampled_from([0.0, 1.0, 1e-300, 5e-324, 1e-45, -0.0, -1.0, 1e300]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 5),
        wrong_types(),
    )


def ints(lo: int, hi: int) -> st.SearchStrategy:
    return st.one_of(
        st.integers(lo, hi),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, 1, -1]),
        st.floats(allow_nan=True, allow_infinity=True),
        wrong_types(),
    )


PER_SEQUENCE = {  # what the engine takes per request
    "max_new_tokens": ints(0, 40),
    "temperature": floats(0.0, 3.0),
    "top_k": ints(0, 100),
    "top_p": floats(0.0, 1.0),
    "repetition_penalty": floats(0.0, 3.0),
    "stop": st.one_of(st.lists(st.text("abc .", max_size=2), max_size=2), st.text(max_size=2)),
    "seed": st.one_of(st.none(), st.integers(), st.integers(2**63, 2**65), wrong_types()),
}
engine_options = st.fixed_dictionaries({}, optional=PER_SEQUENCE)
options = st.fixed_dictionaries(
    {},
    optional={
        **PER_SEQUENCE,
        "num_return_sequences": st.integers(-1, 3) | wrong_types(),
        "num_beams": st.integers(-1, 4) | wrong_types(),
        "length_penalty": floats(-2.0, 2.0),
    },
)


def config_or_error(kwargs) -> SampleConfig | None:
    try:
        return SampleConfig(**kwargs)
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e)
        return None


@settings(max_examples=100, deadline=None)
@given(
    kwargs=options,
    prompts=st.lists(st.lists(st.integers(0, 29), min_size=1, max_size=6), min_size=1, max_size=2),
)
def test_any_sampling_options_give_a_config_error_or_valid_ids(tiny, kwargs, prompts):
    """generate (batched, sampled, greedy or beam) returns rows of ids in the vocabulary, of
    at most max_new_tokens (and what the context leaves), as many as asked for."""
    model, tok = tiny
    sample = config_or_error(kwargs)
    if sample is None:
        return
    V = model.config.vocab_size
    out = generate(model, prompts, sample, eos_id=tok.eos_id, decode=tok.decode)
    per_prompt = sample.num_return_sequences
    assert len(out) == len(prompts) * per_prompt or (
        sample.num_beams > 1 and len(out) <= len(prompts) * per_prompt
    )
    # Batched decoding gives every row the room the longest prompt leaves; a beam search runs
    # each prompt alone, in the room its own prompt leaves.
    lengths = [len(p) for p in prompts]
    prompt_len = max(lengths) if sample.num_beams == 1 else min(lengths)
    for row in out:
        assert all(isinstance(t, int) and 0 <= t < V for t in row)
        assert len(row) <= min(sample.max_new_tokens, CONTEXT - prompt_len + 1)
    if sample.num_beams == 1 and sample.num_return_sequences == 1:
        streamed = list(stream(model, prompts[0], sample, tok.eos_id, tok.decode))
        assert all(0 <= t < V for t in streamed)


def test_extreme_but_valid_values_sample_instead_of_failing(tiny):
    """What the fuzzing found: a temperature of 1e-300 (or a subnormal one) overflowed the
    scaled logits to inf and softmax gave NaN ("probability tensor contains inf or nan"); it
    is now as greedy as it asks to be. NaN, inf and float counts are ConfigErrors."""
    model, _ = tiny
    prompt = [[1, 2, 3]]
    greedy = generate(model, prompt, SampleConfig(temperature=0, max_new_tokens=8))
    for t in (1e-300, 5e-324, 1e-45):
        assert (
            generate(model, prompt, SampleConfig(temperature=t, max_new_tokens=8, seed=0)) == greedy
        )
    tiny_penalty = SampleConfig(
        temperature=1.0, repetition_penalty=1e-300, max_new_tokens=8, seed=0
    )
    assert len(generate(model, prompt, tiny_penalty)[0]) == 8
    for bad in (
        dict(temperature=math.nan),
        dict(repetition_penalty=math.inf),
        dict(top_k=2.5),
        dict(max_new_tokens=3.0),
        dict(stop=[""]),
        dict(seed=2**64),
        dict(num_beams=True),
    ):
        with pytest.raises(ConfigError):
            SampleConfig(**bad)


@settings(max_examples=40, deadline=None)
@given(kwargs=engine_options)
def test_the_serving_engine_takes_any_valid_options(tiny, kwargs):
    """The engine samples each row with its own options (a Sampler, as generate does): every
    valid SampleConfig ends with "done", never "error", and its text decodes."""
    model, tok = tiny
    sample = config_or_error(kwargs)
    if sample is None:
        return
    from gptkit.api import LM

    events = []
    engine = Engine(LM(model, tok), max_batch=2)
    # Not started: the test drives the engine's steps itself, deterministically.
    budget = min(sample.max_new_tokens, CONTEXT - 3 + 1)
    seq = Sequence([1, 2, 3], _capped(sample, budget), events.append)
    engine.submit(seq)
    with torch.inference_mode():
        for _ in range(CONTEXT + 2):
            engine._admit()
            if engine.running:
                engine._step()
            if events and events[-1][0] in ("done", "error"):
                break
    assert events and events[-1][0] == "done", events[-3:]
    assert all(kind == "text" for kind, _ in events[:-1])


def _capped(sample: SampleConfig, budget: int) -> SampleConfig:
    import dataclasses

    return dataclasses.replace(sample, max_new_tokens=budget)
