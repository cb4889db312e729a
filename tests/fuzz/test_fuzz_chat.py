"""Property tests for what a chat client controls: message content can never become a control
token, and a stop string never holds back text that cannot begin it.

Contents are drawn from text rich in the tokenizer's own special-token strings and their
pieces ("<|im_", "end|>"), the likeliest way to smuggle one in.
"""

from __future__ import annotations

from conftest import tiny_chat_lm
from hypothesis import given, settings
from hypothesis import strategies as st

from gptkit.chat_template import chat_prompt, chat_prompt_ids
from gptkit.generation import TextStream

LM = tiny_chat_lm(block_size=64)
TOK = LM.tokenizer
PIECES = [*TOK.special_tokens, "<|im_", "start|>", "end|>", "<|", "|>", "\n", "system", " "]
TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=8), max_size=12).map("".join)
ROLES = st.sampled_from(["system", "user", "assistant"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": ROLES, "content": TEXT}), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(MESSAGES)
def test_message_content_never_becomes_a_control_token(messages):
    ids = chat_prompt_ids(TOK, messages)
    start = TOK.special_tokens["<|im_start|>"]
    end = TOK.special_tokens["<|im_end|>"]
    # ChatML: one <|im_start|> per message and one for the reply, one <|im_end|> per message.
    assert ids.count(start) == len(messages) + 1
    assert ids.count(end) == len(messages)
    assert TOK.special_tokens["<|endoftext|>"] not in ids
    assert TOK.decode(ids) == chat_prompt(TOK, messages)  # the very same text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(3, TOK.vocab_size - 1), max_size=40), st.lists(TEXT, max_size=3))
def test_stream_releases_exactly_the_text_before_the_first_stop(ids, stops):
    stops = [s for s in stops if s]
    stream = TextStream(TOK.decode, stops, [TOK.eos_id])
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    text = TOK.decode(ids)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    assert out == text[:cut]
