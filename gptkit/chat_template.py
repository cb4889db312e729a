"""Chat templates: render a conversation into a prompt, as the model was trained to read it.

Templates are Jinja, rendered the way transformers renders `apply_chat_template` (a sandboxed
environment with trim_blocks/lstrip_blocks, `messages`, `add_generation_prompt`, the special
token strings, `raise_exception`), so a template shipped with a model renders identically
here. Models without one get ChatML. A template is code from a model file: its work is
bounded (`range`, repeated strings, output size) and any failure is a ChatTemplateError.

`chat_prompt_ids` is what a server must use: control tokens come only from the template, and
message content is encoded as text, so a user who types "<|im_start|>system" gets those
characters, not a forged system turn (OpenAI's semantics; transformers' `apply_chat_template`
followed by `encode` would make them control tokens).
"""

from __future__ import annotations

import contextvars
import re
import uuid
from datetime import datetime
from functools import cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


# What one rendering may do: real templates loop over the messages and emit a few strings per
# message; these bounds are orders of magnitude above that and far below a stalled server.
MAX_RANGE_ITEMS = 100_000  # all range() calls of one rendering together
MAX_OUTPUT_CHARS = 1 << 24  # the rendered prompt, and any string or list a template builds


class ChatTemplateError(ValueError):
    """A template that fails to render, or messages it rejects."""


def _raise(message: str):
    raise ChatTemplateError(message)


_range_left: contextvars.ContextVar[list[int]] = contextvars.ContextVar("range_left")


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    left = _range_left.get()
    left[0] -= len(numbers)
    if left[0] < 0:
        raise ChatTemplateError(f"the chat template loops over more than {MAX_RANGE_ITEMS} items")
    return numbers


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, plus bounds on the work a template can ask for: a template
    from a model file could otherwise render `'x' * 4000000000` or `2 ** 10 ** 9`."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise ChatTemplateError(f"the chat template raises to the power {right}")
        if operator == "*":
            sized, times = (left, right) if hasattr(left, "__len__") else (right, left)
            sizable = isinstance(times, int) and hasattr(sized, "__len__")
            if sizable and len(sized) * times > MAX_OUTPUT_CHARS:
                raise ChatTemplateError("the chat template builds a value over 16 MB")
        return super().call_binop(context, operator, left, right)


@cache
def _compile(template: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _bounded_range
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(
            f"the chat template failed to render (it does not compile): {e}"
        ) from None


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
    compiled = _compile(template or CHATML)
    token = _range_left.set([MAX_RANGE_ITEMS])
    pieces, size = [], 0
    try:
        for piece in compiled.generate(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        ):
            pieces.append(piece)
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError("the chat template renders over 16 MB of text")
    except ChatTemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the template's code is the template's
        raise ChatTemplateError(f"the chat template failed to render: {e!r}") from None
    finally:
        _range_left.reset(token)
    return "".join(pieces)


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """The generation prompt for `messages` under the tokenizer's chat template (or ChatML)."""
    names = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    return render(messages, tokenizer.chat_template or CHATML, True, **names)


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The generation prompt's token ids, with control tokens only where the template puts
    them: special-token strings inside message content are encoded as plain text."""
    specials = tokenizer.special_tokens
    if not any(s in m["content"] for m in messages for s in specials):
        # Nothing to neutralise: exactly what transformers' apply_chat_template + encode give.
        # (encode_many: HF's batch encoder releases the GIL, so a server's loop goes on.)
        return tokenizer.encode_many([chat_prompt(tokenizer, messages)])[0]
    # Render with a unique marker in place of each content, so that the template's own text
    # (where special-token strings are control tokens) and the contents can be told apart.
    marker = f"\x00{uuid.uuid4().hex}:"
    marked = [{**m, "content": f"{marker}{i}\x00"} for i, m in enumerate(messages)]
    pieces = re.split(re.escape(marker) + r"(\d+)\x00", chat_prompt(tokenizer, marked))
    control = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len)[::-1])) + ")")
    # Text between two control tokens is encoded in one piece, as tokenizers split on special
    # tokens first: the template's text and the contents merge exactly as in a plain encode.
    ids: list[int] = []
    text: list[str] = []
    for n, piece in enumerate(pieces):
        if n % 2:  # the index of a message whose content goes here
            text.append(messages[int(piece)]["content"])
            continue
        for k, part in enumerate(control.split(piece)):
            if k % 2:
                ids += tokenizer.encode_text("".join(text))
                ids.append(specials[part])
                text = []
            else:
                text.append(part)
    return ids + tokenizer.encode_text("".join(text))


def turn_stops(tokenizer: Tokenizer) -> list[str]:
    """The end-of-turn strings of this tokenizer: a reply stops at any of them."""
    return [s for s in END_OF_TURN if s in tokenizer.special_tokens]
