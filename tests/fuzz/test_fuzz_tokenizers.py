"""Property tests for every tokenizer kind: no input makes a tokenizer crash or lie.

Kinds: a byte-level BPE trained here (HF `tokenizers`), GPT-2's files through HF `tokenizers`
(shared data), GPT-2 and cl100k_base through `tiktoken` (cl100k_base has unassigned ids
below its vocab_size), and the char-level vocabulary. tests/test_tokenizer.py already checks
decode(encode(text)) == text on arbitrary text with special tokens for the trained, GPT-2 (HF)
and OpenAI encodings; these properties add raw bytes, invalid Unicode, arbitrary id lists and
the kinds that test leaves out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.tokenizer import Tokenizer, TokenizerError, char_tokenizer, train_bpe
from gptkit.tokenizer_files import load_tokenizer

GPT2_DIR = Path(__file__).parents[2] / "../shared/data/gpt2-tokenizer"
KINDS = ["trained-bpe", "gpt2-hf", "gpt2-tiktoken", "cl100k-tiktoken", "char"]
CHARS = "abcdefghijklmnopqrstuvwxyz ,.!?\n'é中"
SURROGATE = re.compile("[\ud800-\udfff]")

_cache: dict[str, Tokenizer] = {}


def tokenizer(kind: str) -> Tokenizer:
    """One tokenizer per kind for the whole module (the BPE is trained once)."""
    if kind not in _cache:
        if kind == "trained-bpe":
            text = "the quick brown fox jumps over the lazy dog; café 中文 ok?\n" * 40
            _cache[kind] = train_bpe([text], vocab_size=320)
        elif kind == "gpt2-hf":
            if not GPT2_DIR.is_dir():
                pytest.skip(f"GPT-2 tokenizer files absent: {GPT2_DIR} (shared data)")
            _cache[kind] = load_tokenizer(GPT2_DIR)
        elif kind == "gpt2-tiktoken":
            _cache[kind] = load_tokenizer("gpt2")
        elif kind == "cl100k-tiktoken":
            _cache[kind] = load_tokenizer("cl100k_base")
        else:
            _cache[kind] = char_tokenizer(CHARS, special_tokens=["<|endoftext|>"])
    return _cache[kind]


def _round_trips_or_refuses(tok: Tokenizer, text: str) -> None:
    """decode(encode(text)) == text; a char tokenizer may instead name a missing character."""
    try:
        ids = tok.encode(text)
    except TokenizerError as e:
        assert tok.kind == "char" and "is not in this char tokenizer" in str(e)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_many([text, text]) == [ids, ids]


# --- text in ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_decoded_with_replace_round_trip(kind: str, data: bytes) -> None:
    """Arbitrary bytes, read as UTF-8 with errors='replace' (what a loader of unknown files
    does): valid Unicode, so every library kind round-trips it exactly."""
    _round_trips_or_refuses(tokenizer(kind), data.decode("utf-8", errors="replace"))


@pytest.mark.parametrize("kind", ["gpt2-tiktoken", "char"])
@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=100))
def test_any_text_round_trips_for_kinds_not_fuzzed_elsewhere(kind: str, text: str) -> None:
    _round_trips_or_refuses(tokenizer(kind), text)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=1, max_size=100))
def test_lone_surrogates_are_a_clear_error_or_replaced(kind: str, data: bytes) -> None:
    """Bytes read with errors='surrogateescape' hold lone surrogates: not Unicode text. HF and
    char tokenizers refuse them with TokenizerError (before: a TypeError from Rust); tiktoken
    documents that it replaces each with U+FFFD. encode and encode_many agree. Never another
    exception type."""
    tok = tokenizer(kind)
    text = data.decode("utf-8", errors="surrogateescape")
    if not SURROGATE.search(text):
        _round_trips_or_refuses(tok, text)
        return
    if tok.kind == "tiktoken":
        expected = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids = tok.encode(text)
        assert tok.decode(ids) == expected
        assert tok.encode_many([text]) == [ids]
        return
    with pytest.raises(TokenizerError) as info:
        tok.encode(text)
    message = str(info.value)
    assert "\n" not in message
    if tok.kind == "hf":
        assert "lone surrogate U+DC" in message
    with pytest.raises(TokenizerError):
        tok.encode_many(["fine", text])


# --- ids in ----------------------------------------------------------------------------------


def _valid(tok: Tokenizer, i: int) -> bool:
    if tok.kind != "tiktoken":
        return True
    return i in tok._valid_ids  # cl100k_base leaves ids 100256, 100261..100275 unassigned


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_decoding_any_ids_in_range_gives_text_or_a_clear_error(kind: str, data) -> None:
    """Any list of ids in 0..vocab_size-1 (biased to the top, where specials and gaps lie)
    decodes to str; only an id that names no token is a TokenizerError naming that id."""
    tok = tokenizer(kind)
    V = tok.vocab_size
    top = st.integers(max(0, V - 30), V - 1)
    ids = data.draw(st.lists(st.one_of(st.integers(0, V - 1), top), max_size=40))
    if all(_valid(tok, i) for i in ids):
        assert isinstance(tok.decode(ids), str)
    else:
        bad = next(i for i in ids if not _valid(tok, i))
        with pytest.raises(TokenizerError, match=f"token id {bad} is no token of"):
            tok.decode(ids)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decoding_ids_out_of_range_is_a_tokenizer_error(kind: str, data) -> None:
    """Negative ids, vocab_size itself and ids far beyond (even past int64, which the Rust
    libraries cannot take) are refused by gptkit, naming the first bad id."""
    tok = tokenizer(kind)
    V = tok.vocab_size
    bad = st.one_of(st.integers(max_value=-1), st.integers(V, V + 5), st.integers(min_value=2**63))
    good = st.lists(st.integers(0, V - 1).filter(lambda i: _valid(tok, i)), max_size=5)
    before, wrong, after = data.draw(good), data.draw(bad), data.draw(good)
    with pytest.raises(TokenizerError, match=f"token id {wrong} is outside"):
        tok.decode([*before, wrong, *after])


def test_a_gap_id_is_named_not_a_key_error() -> None:
    """The bug the id fuzzing found: cl100k_base's unassigned id 100261 raised KeyError."""
    tok = tokenizer("cl100k-tiktoken")
    with pytest.raises(TokenizerError, match="token id 100261 is no token of cl100k_base"):
        tok.decode([15339, 100261])
    assert tok.decode([100257]) == "<|endoftext|>"
