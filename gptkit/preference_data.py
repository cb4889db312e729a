"""Preference pairs: a conversation, the reply people preferred (chosen) and the one they did
not (rejected), read from the shapes the common tools write, and encoded as model rows.

Record shapes (a .json list, .jsonl lines, or .csv/.tsv for the string form):

    {prompt, chosen, rejected[, system]}     strings (Anthropic HH / TRL's standard form)
    {conversations, chosen, rejected}        ShareGPT turns {from: human|gpt|system, value}
                                             (LLaMA-Factory's dpo_en_demo.json); chosen and
                                             rejected one turn each, or a string
    {prompt, chosen, rejected}               message lists {role, content} (TRL's
                                             conversational form)
    {chosen, rejected}                       two whole conversations; the messages they share
                                             are the prompt (TRL's implicit prompt)

The conversation must end with the user's turn that both replies answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .chat_template import render
from .examples import IGNORE, Example
from .taskdata import ROLES, DataError, located_records
from .tokenizer import Tokenizer

PAIR_SHAPES = (
    "{prompt, chosen, rejected} as strings or message lists, "
    "{conversations: [{from, value}], chosen, rejected}, or {chosen, rejected} as conversations"
)
# ShareGPT speaker names (and the plain roles, which some files use in the same slots)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_ROLES.update({r: r for r in ROLES})

Messages = list[dict[str, str]]


@dataclass
class Pair:
    prompt: Messages  # the conversation so far, ending with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str


# -- reading -------------------------------------------------------------------------------


def _turns(value: Any, where: str, key: str) -> Messages:
    """A list of {role, content} or ShareGPT {from, value} turns, as {role, content}."""
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a list of turns, found {type(value).__name__}")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, found {type(turn).__name__}")
        speaker = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        if speaker not in SHAREGPT_ROLES:
            names = ", ".join(SHAREGPT_ROLES)
            raise DataError(f"{where}: {key}[{i}] is spoken by {speaker!r}; use one of {names}")
        if not isinstance(text, str):
            raise DataError(f"{where}: {key}[{i}] has no text (content or value)")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": text})
    return messages


def _reply(value: Any, where: str, key: str) -> str:
    """One assistant reply: a string, one turn, or a list holding one assistant turn."""
    if isinstance(value, str):
        return value
    turns = _turns([value] if isinstance(value, dict) else value, where, key)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must be one assistant reply")
    return turns[0]["content"]


def _split_shared(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, str, str]:
    """Two whole conversations -> (the messages they share, each one's last reply)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared != len(chosen) - 1 or shared != len(rejected) - 1:
        raise DataError(f"{where}: 'chosen' and 'rejected' must differ in their last reply only")
    return (
        chosen[:shared],
        _reply(chosen[-1:], where, "chosen"),
        _reply(rejected[-1:], where, "rejected"),
    )


def _pair(record: dict[str, Any], where: str) -> Pair:
    if "chosen" not in record or "rejected" not in record:
        fields = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{where}: not a preference pair (its fields: {fields}); use {PAIR_SHAPES}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "conversations" in record:
        prompt = _turns(record["conversations"], where, "conversations")
    elif isinstance(record.get("prompt"), str):
        prompt = [{"role": "user", "content": record["prompt"]}]
        if isinstance(record.get("system"), str) and record["system"]:
            prompt.insert(0, {"role": "system", "content": record["system"]})
    elif "prompt" in record:
        prompt = _turns(record["prompt"], where, "prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_shared(
            _turns(chosen, where, "chosen"), _turns(rejected, where, "rejected"), where
        )
    else:
        raise DataError(f"{where}: the pair has no prompt; use {PAIR_SHAPES}")
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(
            f"{where}: the conversation must end with the user's turn the replies answer"
        )
    return Pair(prompt, _reply(chosen, where, "chosen"), _reply(rejected, where, "rejected"))


def read_pairs(path: str) -> list[Pair]:
    """Every record of `path` as a Pair; DataError naming the record for any other shape."""
    pairs = [_pair(record, where) for where, record in located_records(path)]
    if not pairs:
        raise DataError(f"{path}: no preference pairs in it")
    return pairs


# -- encoding ------------------------------------------------------------------------------


@dataclass
class Encoded:
    prompt: list[int]  # the rendered conversation up to the reply (generation prompt included)
    chosen: list[int]  # each reply as the template renders it (end-of-turn included)
    rejected: list[int]


def encode_pair(
    tokenizer: Tokenizer, pair: Pair, template: str, max_length: int, max_prompt_length: int
) -> Encoded | None:
    """The pair's tokens, the shared prompt encoded once. A prompt over max_prompt_length (0:
    half of max_length) keeps its last tokens, the turn being answered; each reply is cut to
    fit max_length with it. None when no reply token fits."""
    names = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    prompt = render(pair.prompt, template, add_generation_prompt=True, **names)
    replies = []
    for text in (pair.chosen, pair.rejected):
        whole = pair.prompt + [{"role": "assistant", "content": text}]
        full = render(whole, template, add_generation_prompt=False, **names)
        if not full.startswith(prompt):
            raise DataError(
                "the chat template does not render the prompt as the start of the conversation, "
                "so the reply's tokens cannot be found; use template=chatml"
            )
        replies.append(tokenizer.encode(full[len(prompt) :]))
    max_prompt_length = min(max_prompt_length or max_length // 2, max_length - 1)
    prompt_ids = tokenizer.encode(prompt)[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room < 1 or not all(replies):
        return None
    return Encoded(prompt_ids, replies[0][:room], replies[1][:room])


def lm_rows(e: Encoded) -> tuple[Example, Example]:
    """(chosen, rejected) rows for log-probabilities: inputs are prompt + reply less its last
    token; the targets score the reply's tokens only."""
    rows = []
    for reply in (e.chosen, e.rejected):
        ids = e.prompt + reply
        targets = [IGNORE] * (len(e.prompt) - 1) + reply
        rows.append(Example(ids[:-1], targets))
    return rows[0], rows[1]


def reward_rows(e: Encoded) -> tuple[Example, Example]:
    """(chosen, rejected) rows for a reward head: prompt + reply, the score read at its last
    token (target 0 there; the value is unused)."""
    rows = []
    for reply in (e.chosen, e.rejected):
        ids = e.prompt + reply
        rows.append(Example(ids, [IGNORE] * (len(ids) - 1) + [0]))
    return rows[0], rows[1]
