"""Generation: samplers against transformers' logits processors; greedy and beam search against
transformers.generate on the same weights; batching, EOS, seeds, streaming."""

import pytest
import torch

from gptkit.config import ConfigError
from gptkit.convert import load_hf
from gptkit.generation import SampleConfig, complete, generate, stream
from gptkit.generation.sampling import apply_repetition_penalty, filter_logits
from gptkit.model import ContextLengthError
from gptkit.surgery import resize_vocab

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402

# transformers is the reference: each test runs in a child process (tests/reference.py).
pytestmark = pytest.mark.reference("transformers")

VOCAB = 61


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    """(transformers model, the gptkit model loaded from its saved directory)."""
    torch.manual_seed(1)
    if request.param == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4
        )
        ref = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        ref = transformers.LlamaForCausalLM(cfg)
    ref.eval()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_hf(path)


def hf_generate(ref, prompt, eos_id=None, **kw):
    out = ref.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=0,
        **kw,
    )
    return [row[len(prompt) :].tolist() for row in out]


def strip_pad(rows, eos_id):
    """transformers pads finished sequences after EOS; cut each row after its first EOS."""
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def test_greedy_matches_transformers(pair):
    ref, model = pair
    prompt = [5, 17, 42, 8, 3]
    ours = generate(model, [prompt], SampleConfig(temperature=0, max_new_tokens=30))
    assert ours == hf_generate(ref, prompt, max_new_tokens=30)


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    ref, model = pair
    prompt = [5, 17, 42, 8, 3]
    sample = SampleConfig(temperature=0, max_new_tokens=20, repetition_penalty=1.3)
    ours = generate(model, [prompt], sample)
    assert ours == hf_generate(ref, prompt, max_new_tokens=20, repetition_penalty=1.3)


@pytest.mark.parametrize("eos_id", [None, 7])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_transformers(pair, eos_id, length_penalty):
    ref, model = pair
    prompt = [11, 2, 33, 4]
    sample = SampleConfig(
        temperature=0,
        max_new_tokens=12,
        num_beams=4,
        num_return_sequences=3,
        length_penalty=length_penalty,
    )
    ours = generate(model, [prompt], sample, eos_id=eos_id)
    theirs = hf_generate(
        ref,
        prompt,
        eos_id=eos_id,
        max_new_tokens=12,
        num_beams=4,
        num_return_sequences=3,
        length_penalty=length_penalty,
    )
    assert ours == (strip_pad(theirs, eos_id) if eos_id is not None else theirs)


def test_eos_ends_beam_hypotheses_early(pair):
    # Make the EOS token the model's favourite so that hypotheses actually finish early.
    ref, model = pair
    prompt = [11, 2, 33, 4]
    eos = generate(model, [prompt], SampleConfig(temperature=0, max_new_tokens=3))[0][1]
    sample = SampleConfig(temperature=0, max_new_tokens=12, num_beams=3, num_return_sequences=3)
    ours = generate(model, [prompt], sample, eos_id=eos)
    theirs = strip_pad(
        hf_generate(
            ref, prompt, eos_id=eos, max_new_tokens=12, num_beams=3, num_return_sequences=3
        ),
        eos,
    )
    assert ours == theirs
    assert any(len(row) < 12 and row[-1] == eos for row in ours)


def test_batched_prompts_of_different_lengths_match_one_by_one(pair):
    _, model = pair
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [40]]
    sample = SampleConfig(temperature=0, max_new_tokens=15)
    batched = generate(model, prompts, sample)
    assert batched == [generate(model, [p], sample)[0] for p in prompts]


def test_samplers_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    seen = torch.zeros(4, 100, dtype=torch.bool)
    ids = torch.randint(0, 100, (4, 12))
    seen.scatter_(1, ids, True)
    torch.testing.assert_close(
        apply_repetition_penalty(logits, seen, 1.7),
        hf.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()),
    )
    for k in (1, 5, 40):
        torch.testing.assert_close(
            filter_logits(logits, k, 1.0), hf.TopKLogitsWarper(k)(ids, logits.clone())
        )
    for p in (0.05, 0.5, 0.9, 0.99):
        torch.testing.assert_close(
            filter_logits(logits, 0, p), hf.TopPLogitsWarper(p)(ids, logits.clone())
        )
    for m in (0.01, 0.1, 0.5, 1.0):
        torch.testing.assert_close(
            filter_logits(logits, 0, 1.0, m), hf.MinPLogitsWarper(m)(ids, logits.clone())
        )


def test_greedy_with_logit_bias_matches_transformers_sequence_bias(pair):
    # transformers' sequence_bias on one-token sequences is OpenAI's logit_bias.
    ref, model = pair
    prompt = [5, 17, 42, 8, 3]
    plain = generate(model, [prompt], SampleConfig(temperature=0, max_new_tokens=6))[0]
    others = [t for t in (9, 20, 31) if t != plain[0]]
    bias = {plain[0]: -100.0, others[0]: 2.5, others[1]: 1.0}  # ban the first choice
    sample = SampleConfig(temperature=0, max_new_tokens=20, logit_bias=bias)
    ours = generate(model, [prompt], sample)
    theirs = hf_generate(
        ref, prompt, max_new_tokens=20, sequence_bias={(t,): b for t, b in bias.items()}
    )
    assert ours == theirs and ours[0][0] != plain[0]


def test_logprobs_match_transformers_scores(pair):
    # Each token's log-probability and its top alternatives are the model's own distribution
    # (vLLM's raw logprobs): log_softmax of transformers' per-step logits.
    ref, model = pair
    prompt = [5, 17, 42, 8, 3]
    sample = SampleConfig(temperature=0, max_new_tokens=10, logprobs=3)
    ours = complete(model, [prompt], sample)[0]
    out = ref.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=10,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    theirs = torch.stack(out.logits)[:, 0].log_softmax(-1)  # [steps, V]
    chosen = out.sequences[0, len(prompt) :]
    assert ours.ids == chosen.tolist()
    torch.testing.assert_close(
        torch.tensor(ours.logprobs), theirs.gather(1, chosen[:, None])[:, 0], atol=1e-4, rtol=0
    )
    for step, top in enumerate(ours.top_logprobs):
        values, ids = theirs[step].topk(3)
        assert list(top) == ids.tolist()
        torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)


def test_openai_penalties_and_stop_ids(pair):
    _, model = pair
    prompt = [5, 17, 42, 8, 3]
    greedy = SampleConfig(temperature=0, max_new_tokens=30)
    plain = generate(model, [prompt], greedy)[0]
    assert len(set(plain)) < len(plain)  # a tiny random model repeats itself
    # A presence penalty past any logit gap: no generated token comes twice.
    fresh = generate(model, [prompt], SampleConfig(**{**vars(greedy), "presence_penalty": 1e4}))
    assert len(set(fresh[0])) == len(fresh[0]) == 30
    # frequency_penalty subtracts f per earlier use, so any f > 0 changes a repeating output.
    freq = generate(model, [prompt], SampleConfig(**{**vars(greedy), "frequency_penalty": 2.0}))
    assert freq[0] != plain
    # A stop id ends the row as EOS does: kept in the ids, the row stops there.
    stop_at = plain[3]
    ended = generate(model, [prompt], SampleConfig(**{**vars(greedy), "stop_ids": [stop_at]}))
    assert ended[0] == plain[: plain.index(stop_at) + 1]


def test_sampling_follows_the_temperature_scaled_distribution(pair):
    # With a one-token budget, the empirical distribution of the first token must match
    # softmax(logits / T) of the model: a chi-square style check with a fixed seed.
    _, model = pair
    prompt = [3, 1, 4]
    probs = (model(torch.tensor([prompt]))[0, -1] / 0.7).softmax(-1)
    sample = SampleConfig(temperature=0.7, max_new_tokens=1, num_return_sequences=4000, seed=0)
    counts = torch.bincount(
        torch.tensor(generate(model, [prompt], sample)).flatten(), minlength=VOCAB
    )
    expected = probs * 4000
    assert (counts - expected).abs().max() < 5 * expected.max().sqrt() + 5


def test_top_k_1_and_tiny_top_p_are_greedy(pair):
    _, model = pair
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, [prompt], SampleConfig(temperature=0, max_new_tokens=10))
    assert generate(model, [prompt], SampleConfig(top_k=1, max_new_tokens=10, seed=3)) == greedy
    assert generate(model, [prompt], SampleConfig(top_p=1e-6, max_new_tokens=10, seed=3)) == greedy


def test_seed_makes_sampling_reproducible(pair):
    _, model = pair
    sample = SampleConfig(max_new_tokens=20, seed=123, num_return_sequences=2)
    a = generate(model, [[1, 2]], sample)
    assert a == generate(model, [[1, 2]], sample)
    assert a != generate(
        model, [[1, 2]], SampleConfig(max_new_tokens=20, seed=124, num_return_sequences=2)
    )
    assert len(a) == 2 and all(len(row) == 20 for row in a)


def test_stream_yields_what_generate_returns(pair):
    _, model = pair
    sample = SampleConfig(temperature=0, max_new_tokens=16)
    assert list(stream(model, [4, 5, 6], sample)) == generate(model, [[4, 5, 6]], sample)[0]


def test_stop_strings_need_a_decoder_everywhere(pair):
    _, model = pair
    sample = SampleConfig(temperature=0, max_new_tokens=4, stop=["x"])
    with pytest.raises(ValueError, match="stop strings need a decode function"):
        generate(model, [[1, 2]], sample)
    with pytest.raises(ValueError, match="stop strings need a decode function"):
        list(stream(model, [1, 2], sample))


def test_a_stop_string_ends_a_long_row_exactly_where_it_completes(pair):
    # The stop check decodes only a tail window; a stop completed late in a long output must
    # still end the row at the token that completed it.
    _, model = pair
    full = generate(model, [[4, 5, 6]], SampleConfig(temperature=0, max_new_tokens=40))[0]

    def decode(ids):
        return "".join(chr(65 + i % 26) for i in ids)

    stop = decode(full[30:32])
    first = next(i for i in range(2, 41) if stop in decode(full[:i]))
    sample = SampleConfig(temperature=0, max_new_tokens=40, stop=[stop])
    assert generate(model, [[4, 5, 6]], sample, decode=decode)[0] == full[:first]


def test_eos_stops_sampling_and_is_kept(pair):
    _, model = pair
    greedy = generate(model, [[4, 5, 6]], SampleConfig(temperature=0, max_new_tokens=10))[0]
    eos = greedy[4]
    out = generate(model, [[4, 5, 6]], SampleConfig(temperature=0, max_new_tokens=10), eos_id=eos)[
        0
    ]
    assert out == greedy[: greedy.index(eos) + 1]


def test_generation_stops_at_the_context_and_rejects_longer_prompts(pair):
    _, model = pair
    out = generate(model, [[1] * 60], SampleConfig(temperature=0, max_new_tokens=50))[0]
    assert len(out) == 5  # 64-token context: 60 prompt tokens leave room for 5 new ones
    with pytest.raises(
        ContextLengthError, match="prompt has 65 tokens but the model's context is 64"
    ):
        generate(model, [[1] * 65], SampleConfig(max_new_tokens=1))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    ],
)
def test_bad_sampling_parameters_are_rejected(bad, message):
    with pytest.raises(ConfigError, match=message):
        SampleConfig(**bad)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_gives_a_training_model_back_in_training_mode(pair, num_beams):
    _, model = pair
    model.train()
    sample = SampleConfig(temperature=0, max_new_tokens=4, num_beams=num_beams)
    try:
        generate(model, [[1, 2, 3]], sample)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()


def test_ids_past_the_tokenizer_are_never_generated():
    """A model whose embedding is padded past its tokenizer (many HF models are): those ids
    have no text, so generation never picks them, even when they score best."""
    from conftest import tiny_chat_lm

    lm = tiny_chat_lm()
    n = lm.tokenizer.vocab_size
    resize_vocab(lm.model, n + 16)
    best = torch.arange(n, n + 16)
    lm.model.register_forward_hook(lambda m, args, out: out.index_fill(-1, best, 1e4))
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=0), dict(num_beams=2)):
        ids = generate(
            lm.model, [[1, 2]], SampleConfig(max_new_tokens=6, **sampling), None, None, n
        )
        assert ids[0] and max(ids[0]) < n, sampling
        assert lm.generate("hello", max_new_tokens=6, **sampling)[0]  # decodes, no error
    assert "".join(lm.stream("hello", max_new_tokens=6, temperature=0))
    unmasked = generate(lm.model, [[1, 2]], SampleConfig(max_new_tokens=3, temperature=0))
    assert min(unmasked[0]) >= n  # without the limit the padding ids would win
