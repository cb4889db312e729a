"""The public API: gptkit.load, LM.generate / LM.stream, and pipeline("text-generation")."""

import pytest
import torch
from conftest import TEXT

import gptkit
from gptkit.checkpoint import CheckpointError, save_checkpoint
from gptkit.config import ConfigError, preset
from gptkit.convert import ConversionError
from gptkit.model import GPT
from gptkit.tokenizer import train_bpe
from gptkit.tokenizer_files import load_tokenizer


@pytest.fixture(scope="module")
def char_lm(char_checkpoint):
    return gptkit.load(char_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A transformers GPT-2 (random weights) saved with GPT-2's real tokenizer files."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hfgpt2")
    ref.save_pretrained(path)
    load_tokenizer("gpt2").save(path)
    return ref, path


def test_load_returns_model_tokenizer_config(char_lm):
    assert isinstance(char_lm.model, GPT)
    assert char_lm.config is char_lm.model.config
    assert char_lm.tokenizer.decode(char_lm.tokenizer.encode(TEXT)) == TEXT


def test_generate_shapes(char_lm):
    one = char_lm.generate("the ", max_new_tokens=5, seed=0)
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], str)
    many = char_lm.generate(["the ", "a lazy"], max_new_tokens=5, num_return_sequences=3, seed=0)
    assert len(many) == 6


def test_stop_strings_cut_the_text(char_lm):
    full = char_lm.generate("the ", max_new_tokens=30, temperature=0)[0]
    stop = full[5:7]
    cut = char_lm.generate("the ", max_new_tokens=30, temperature=0, stop=[stop])[0]
    assert cut == full[: full.find(stop)]
    assert "".join(char_lm.stream("the ", max_new_tokens=30, temperature=0, stop=[stop])) == cut


def test_stream_concatenates_to_generate(hf_gpt2):
    # Byte-level tokens can split a character; stream must still add up to the same text.
    _, path = hf_gpt2
    lm = gptkit.load(path, device="cpu")
    prompt = "日本語のテキスト 🤖"
    pieces = list(lm.stream(prompt, max_new_tokens=24, temperature=0))
    assert "".join(pieces) == lm.generate(prompt, max_new_tokens=24, temperature=0)[0]
    assert len(pieces) > 1


class CountingDecode:
    """A tokenizer whose decode records the longest id list it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0
        self.eos_id = tokenizer.eos_id

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids)


@pytest.mark.parametrize("stop", [[], ["テキスト 🤖 and"]])
def test_text_stream_releases_whole_characters_incrementally(stop):
    tok = CountingDecode(load_tokenizer("gpt2"))
    text = "日本語のテキスト 🤖 and more text, " * 20  # emoji and kanji span several byte tokens
    ids = tok.tokenizer.encode(text)
    stream = gptkit.generation.TextStream(tok.decode, stop, [tok.eos_id])
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    expected = text[: text.find(stop[0])] if stop else text
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)
    assert stream.stopped
    assert tok.longest <= 8  # each token decodes a few ids, not the whole reply so far


def test_hf_directory_generates_the_same_text_as_transformers(hf_gpt2):
    ref, path = hf_gpt2
    lm = gptkit.load(path, device="cpu")
    prompt = "The quick brown fox"
    ids = lm.tokenizer.encode(prompt)
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20, pad_token_id=50256)
    expected = lm.tokenizer.decode(out[0, len(ids) :].tolist())
    assert lm.generate(prompt, max_new_tokens=20, temperature=0) == [expected]


def test_pipeline_like_transformers(hf_gpt2):
    _, path = hf_gpt2
    generator = gptkit.pipeline("text-generation", model=str(path), device="cpu")
    results = generator("The quick brown fox", max_length=50, num_return_sequences=3, seed=0)
    assert len(results) == 3
    for r in results:
        assert set(r) == {"generated_text"}
        assert r["generated_text"].startswith("The quick brown fox")
    # max_length counts the prompt, as in transformers: 4 prompt tokens leave 46 new ones.
    [greedy] = generator("The quick brown fox", max_length=50, temperature=0)
    completion = generator.lm.generate("The quick brown fox", max_new_tokens=46, temperature=0)[0]
    assert greedy["generated_text"] == "The quick brown fox" + completion
    batch = generator(["a", "b"], max_new_tokens=3, num_return_sequences=2)
    assert [len(b) for b in batch] == [2, 2]
    with pytest.raises(ValueError, match="unsupported pipeline task"):
        gptkit.pipeline("fill-mask", model=generator.lm)


def test_bad_requests_raise_clear_exceptions(char_lm, tmp_path):
    with pytest.raises(ConfigError, match="unknown sampling option"):
        char_lm.generate("the", max_tokens=5)
    with pytest.raises(ConfigError, match="top_p must be in"):
        char_lm.generate("the", top_p=0)
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="neither a gptkit checkpoint nor a Hugging Face"):
        gptkit.load(tmp_path / "junk")


def test_hub_names_go_through_huggingface_hub(monkeypatch):
    # No network in tests: offline mode makes the hub client fail fast, and we check the error
    # comes back as one clear line naming the model.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="cannot fetch 'no-such-org/no-such-model'"):
        gptkit.load("no-such-org/no-such-model", device="cpu")


def test_trained_bpe_tokenizer_in_a_checkpoint(tmp_path):
    tok = train_bpe([TEXT * 50], vocab_size=300)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    lm = gptkit.load(save_checkpoint(tmp_path / "ckpt", model, tok), device="cpu")
    assert lm.tokenizer.encode(TEXT) == tok.encode(TEXT)
