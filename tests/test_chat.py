"""Chat templates (rendered as transformers renders them), chat sessions, and `gptkit chat`."""

import subprocess
import sys

import pytest
import torch

import gptkit
from gptkit.chat import CHATML, ChatSession, ChatTemplateError, chat_loop, render
from gptkit.checkpoint import save_checkpoint
from gptkit.config import preset
from gptkit.model import GPT
from gptkit.tokenizer import train_bpe

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    """A tiny random model whose tokenizer knows ChatML's special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(["hello there, how are you? I am fine, thanks.\n" * 50], 300, specials)
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128))
    path = save_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt", model, tok)
    return path, gptkit.load(path, device="cpu")


def test_chatml_renders_like_transformers():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    ref.chat_template = CHATML
    for gen in (True, False):
        expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert render(MESSAGES, CHATML, add_generation_prompt=gen) == expected


def test_bad_messages_and_templates_are_clear():
    with pytest.raises(ChatTemplateError, match="role in"):
        render([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render(MESSAGES, "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="only user turns"):
        render(MESSAGES, "{{ raise_exception('only user turns') }}")


def test_session_keeps_history_and_resets(chat_lm):
    _, lm = chat_lm
    session = ChatSession(lm, system="Be kind.", max_new_tokens=8, temperature=0)
    reply = "".join(session.send("hello"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert session.messages[-1]["content"] == reply.strip()
    assert session.prompt().startswith("<|im_start|>system\nBe kind.<|im_end|>\n")
    assert session.prompt().endswith("<|im_start|>assistant\n")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be kind."}]


def test_long_conversations_drop_the_oldest_turns_but_keep_the_system_prompt(chat_lm):
    _, lm = chat_lm
    lengths = []

    class Recording(ChatSession):
        def _fit_context(self):
            super()._fit_context()
            lengths.append(len(lm.tokenizer.encode(self.prompt())))

    session = Recording(lm, system="S", max_new_tokens=16, temperature=0)
    for _ in range(12):
        list(session.send("hello there, how are you? " * 2))
    assert session.messages[0] == {"role": "system", "content": "S"}
    assert max(lengths) <= lm.config.block_size - 16  # each prompt left room for the reply
    assert len(session.messages) < 1 + 2 * 12  # old turns were dropped


def test_chat_loop_commands(chat_lm):
    _, lm = chat_lm
    session = ChatSession(lm, max_new_tokens=4, temperature=0)
    typed = iter(["hello", "/reset", "", "hi", "/exit", "never read"])
    shown = []
    chat_loop(session, read=lambda _: next(typed), write=lambda *a, **k: shown.append("".join(a)))
    assert "(conversation reset)" in shown
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["hi"]
    assert next(typed) == "never read"


def test_gptkit_chat_in_a_terminal_process(chat_lm):
    path, _ = chat_lm
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "chat", "--model", str(path), "--device", "cpu"]
        + ["--max-new-tokens", "5", "--system", "Be brief."],
        input="hello\n/reset\nhow are you\n",  # ends with EOF instead of /exit
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2 and "(conversation reset)" in result.stdout
