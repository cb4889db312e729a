"""When a reply ends, and what text it has: one rule for every entry point.

A reply ends at an end token (EOS, or any of SampleConfig.stop_ids) or when its text completes
one of the stop strings; the text before the stop string is the reply. `TextStream` applies
this token by token while it turns ids into text, so `LM.generate`, `LM.stream`, the chat and
the server all cut a reply at the same place. Beam search, which must judge many candidate
continuations, asks `completes_stop` instead (the same rule, on a candidate's last tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Decode = Callable[[list[int]], str]


def skippable(tokenizer) -> dict[int, str]:
    """A tokenizer's special tokens other than EOS, id -> string: what skip_special_tokens
    leaves out of a reply's text (see TextStream's `skip`)."""
    return {i: s for s, i in tokenizer.special_tokens.items() if i != tokenizer.eos_id}


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def completes_stop(decode: Decode, ids: list[int], stop: list[str]) -> bool:
    """Whether the newest token of `ids` completed one of `stop` (checked after every token).

    A stop string can only be completed by the newest token and lies within the last few: a
    character is at most 4 bytes and a byte-level token at least one, so the last
    4 * len(stop) + 1 tokens hold it. Decoding only that tail keeps the check constant-time.
    """
    if not stop:
        return False
    window = 4 * max(len(s) for s in stop) + 1
    text = decode(ids[-window:])
    return any(s in text for s in stop)


class TextStream:
    """Token ids in, final text out: the detokenizer behind every reply.

    A piece is released only once it is final: never half a UTF-8 character (byte-level tokens
    can split one), and never text that might be the start of a stop string. An end token or a
    completed stop string sets `stopped`; the text before the stop string is all that is ever
    released.

    skip: special tokens to leave out of the text (vLLM's skip_special_tokens), id -> string; one
    whose string a stop string names (say <|im_end|>) ends the reply as that stop would.

    Decoding is incremental, as in Hugging Face's text-generation-inference: each token decodes
    only the few ids since the last complete character (with a little left context, which
    tokenizers such as SentencePiece need to place spaces), so a long reply costs the same per
    token as a short one.
    """

    def __init__(
        self,
        decode: Decode,
        stop: list[str] = (),
        end_ids: Iterable[int] = (),
        skip: dict[int, str] | None = None,
    ):
        self.decode, self.stop = decode, list(stop)
        self.end_ids, self.skip = set(end_ids), skip or {}
        self.longest_hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop's prefix
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read]
        self.context = self.read = 0  # ids[context:read]: left context for the next decode
        self.sent = 0  # characters released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final ("" if none)."""
        if self.stopped:  # nothing after a stop string or an end token belongs to the reply
            return ""
        if token in self.end_ids:
            return self.flush()
        if token in self.skip:
            name = self.skip[token]
            return self.flush() if any(s in name for s in self.stop) else ""
        self.ids.append(token)
        before = self.decode(self.ids[self.context : self.read])
        after = self.decode(self.ids[self.context :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # whole characters
            self.text += after[len(before) :]
            self.context, self.read = self.read, len(self.ids)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The rest of the text (an unfinished character included), at the end of generation."""
        if self.stopped:
            return ""
        self.text += self.decode(self.ids[self.read :])
        self.read = len(self.ids)
        self.stopped = True
        return self._release(len(self.text))

    def _held(self) -> int:
        """How many final characters to hold back: the longest unsent tail that begins some
        stop string. Holding max(len(stop)) - 1 instead would let one 100k-character stop
        string hold back a whole reply."""
        unsent = len(self.text) - self.sent
        for k in range(min(unsent, self.longest_hold), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0

    def _release(self, ready: int) -> str:
        # A stop string starting before `sent` would have been complete, and found, by then.
        cut = min(
            (i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.text, self.stopped, ready = self.text[:cut], True, cut
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : ready], ready
        return piece
