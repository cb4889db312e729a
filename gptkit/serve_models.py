"""The model names a server answers to: the base model, and LoRA adapters put on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .api import LM
from .chat_template import turn_stops
from .config import ConfigError
from .multi_lora import load_loras
from .tokenizer import Tokenizer
from .tokenizer_files import load_tokenizer


@dataclass(frozen=True)
class Served:
    """A model name the server answers to: the base model, or one LoRA adapter on it."""

    adapter: int  # the engine's adapter index (multi_lora.MultiLoRA); 0: the base model
    tokenizer: Tokenizer  # renders its chat prompts: an SFT adapter may bring its own template
    chat_stops: tuple[str, ...]  # its end-of-turn strings


def served_models(lm: LM, name: str, adapters: Mapping[str, str | Path]) -> dict[str, Served]:
    """{model name: Served}: the base model as `name`, then each LoRA adapter (a `gptkit
    finetune` adapter directory) as its name, put on lm.model side by side (multi_lora.load_loras).
    Everything is checked before the model changes; a one-line ConfigError names the
    directory refused."""
    for adapter in adapters:
        if not adapter:
            raise ConfigError("an adapter's name is empty; give each one as NAME=DIR")
        if adapter == name:
            raise ConfigError(f"the adapter name {adapter!r} is the base model's; pick another")
    tokenizers = [_adapter_tokenizer(lm, Path(d)) for d in adapters.values()]
    if adapters:
        load_loras(lm.model, adapters)
    models = {name: Served(0, lm.tokenizer, tuple(turn_stops(lm.tokenizer)))}
    for index, (adapter, tok) in enumerate(zip(adapters, tokenizers, strict=True), start=1):
        models[adapter] = Served(index, tok, tuple(turn_stops(tok)))
    return models


def _adapter_tokenizer(lm: LM, directory: Path) -> Tokenizer:
    """The tokenizer finetune saved with the adapter (`gptkit.load(base, adapter=...)` uses
    it: its chat template), or the base model's when there is none. It must be the base's
    vocabulary: the engine decodes every row's tokens with the base tokenizer."""
    path, base = directory / "tokenizer", lm.tokenizer
    if not path.is_dir():
        return base
    tok = load_tokenizer(path)
    if tok.vocab_size != base.vocab_size or tok.special_tokens != base.special_tokens:
        raise ConfigError(
            f"{path} is not the base model's vocabulary ({tok.vocab_size} tokens, the base "
            f"{base.vocab_size}; or other special tokens): serve this adapter alone with "
            f"--adapter {directory}"
        )
    return tok
