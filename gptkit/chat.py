"""Chat: render conversations with a chat template, and hold a multi-turn session.

Templates are Jinja, rendered the way transformers renders `apply_chat_template` (a sandboxed
environment with trim_blocks/lstrip_blocks, `messages`, `add_generation_prompt`, the special
token strings, `raise_exception`), so a template shipped with a model renders identically
here. Models without one get ChatML.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from functools import cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .api import LM
from .tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Special tokens that end an assistant turn in common templates; generation stops on them even
# when the tokenizer's EOS is a different token.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """A template that fails to render, or messages it rejects."""


def _raise(message: str):
    raise ChatTemplateError(message)


@cache
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    messages: list[dict[str, str]],
    template: str | None = None,
    add_generation_prompt: bool = True,
    **special_tokens: Any,
) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}]) under `template`."""
    for m in messages:
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"each message needs a role in {ROLES} and text content: {m!r}")
    try:
        return _compile(template or CHATML).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The generation prompt for `messages` under the tokenizer's chat template (or ChatML)."""
    names = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return render(messages, tokenizer.chat_template or CHATML, True, **names)


def turn_stops(tokenizer: Tokenizer) -> list[str]:
    """The end-of-turn strings of this tokenizer: a reply stops at any of them."""
    return [s for s in END_OF_TURN if s in tokenizer.special_tokens]


class ChatSession:
    """A conversation with a model: each `send` streams the assistant's reply."""

    def __init__(self, lm: LM, system: str | None = None, **sampling: Any):
        self.lm, self.system, self.sampling = lm, system, sampling
        self.stop = turn_stops(lm.tokenizer)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        return chat_prompt(self.lm.tokenizer, self.messages)

    def _fit_context(self) -> None:
        """Drop the oldest turns (never the system prompt) until the prompt leaves room."""
        budget = self.lm.config.block_size - self.sampling.get("max_new_tokens", 256)
        first = 1 if self.system else 0
        while (
            len(self.lm.tokenizer.encode(self.prompt())) > budget and len(self.messages) > first + 1
        ):
            del self.messages[first]

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history at the end."""
        self.messages.append({"role": "user", "content": text})
        self._fit_context()
        sampling = {"max_new_tokens": 256, **self.sampling}
        sampling["stop"] = [*sampling.get("stop", []), *self.stop]
        reply = []
        for piece in self.lm.stream(self.prompt(), **sampling):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply).strip()})


def chat_loop(session: ChatSession, read=input, write=print) -> None:
    """The terminal chat: type a message; /reset starts over; /exit (or EOF) quits."""
    write("Chatting with the model. /reset starts a new conversation, /exit quits.")
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            write("")
            return
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            write("(conversation reset)")
            continue
        if not text:
            continue
        write("bot> ", end="", flush=True)
        for piece in session.send(text):
            write(piece, end="", flush=True)
        write("")
