"""The terminal chat: a multi-turn session that streams each reply (`gptkit chat`).

Prompts are rendered with the model's chat template (chat_template.py); the oldest turns give
way when the conversation outgrows the context, the system prompt never does.

With a retriever (`gptkit chat --retrieval INDEX`), each user turn is retrieved for and the
reply's prompt shows the sources, numbered, asking for [n] citations (rag.py); the sources
are printed under the reply. The history keeps only what was said: a turn's sources are in
its own prompt, not in the ones after it. When no source reaches min_score, the reply is the
retriever's no_answer, and the model does not run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .api import LM
from .chat_template import chat_prompt, turn_stops
from .generation import prompt_room
from .predict import needs_head
from .rag import Retriever, grounded_messages, source_cards
from .rag_index import Hit


class ChatSession:
    """A conversation with a model: each `send` streams the assistant's reply."""

    def __init__(
        self,
        lm: LM,
        system: str | None = None,
        retriever: Retriever | None = None,
        **sampling: Any,
    ):
        needs_head(lm.model, "lm", "chat")  # a classifier or tagger has no replies to give
        self.lm, self.system, self.sampling = lm, system, sampling
        self.retriever = retriever
        self.sources: list[Hit] = []  # the latest user turn's, in its prompt
        self.stop = turn_stops(lm.tokenizer)
        prompt_room(self._reply_tokens(), lm.model.context)  # refuse now, not at the reply
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.sources = []

    def prompt(self) -> str:
        messages = self.messages
        if self.sources:
            messages = grounded_messages(messages, self.sources)
        return chat_prompt(self.lm.tokenizer, messages)

    def _reply_tokens(self) -> int:
        """max_new_tokens as asked; by default 256, or half the context of a small model."""
        return self.sampling.get("max_new_tokens", min(256, self.lm.model.context // 2))

    def _fit_context(self) -> None:
        """Drop the oldest turns (never the system prompt) until the prompt leaves room."""
        budget = prompt_room(self._reply_tokens(), self.lm.model.context)
        first = 1 if self.system else 0
        while (
            len(self.lm.tokenizer.encode(self.prompt())) > budget and len(self.messages) > first + 1
        ):
            del self.messages[first]

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history at the end."""
        self.messages.append({"role": "user", "content": text})
        if self.retriever is not None:
            self.sources = self.retriever.retrieve(self.messages)
            if not self.sources:  # nothing relevant: say so rather than let the model invent
                reply = self.retriever.config.no_answer
                yield reply
                self.messages.append({"role": "assistant", "content": reply})
                return
        self._fit_context()
        sampling = {**self.sampling, "max_new_tokens": self._reply_tokens()}
        sampling["stop"] = [*sampling.get("stop", []), *self.stop]
        reply = []
        # Special tokens are left out of the reply, as the server does (an end of turn ends it).
        for piece in self.lm.stream(self.prompt(), skip_special=True, **sampling):
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
        if session.retriever is not None:
            for line in source_lines(session):
                write(line)


def source_lines(session: ChatSession) -> list[str]:
    """What the terminal prints under a retrieved reply: its numbered sources, each with its
    chunk's id (document id#n: two chunks of one document are told apart) and score."""
    if not session.sources:
        least = session.retriever.config.min_score
        return [f"     (no source in the index scored {least:g} or more)"]
    return [
        f"     [{c['index']}] {c['title'] or c['doc_id']}  ({c['id']}, score {c['score']:.2f})"
        for c in source_cards(session.sources)
    ]
