"""Shared test helpers: a tiny character-level model, and a checkpoint of it."""

import pytest
import torch

from gptkit.checkpoint import save_checkpoint
from gptkit.config import preset
from gptkit.model import GPT
from gptkit.tokenizer import char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\n"


def char_model(name: str = "tiny", **overrides):
    """(GPT in eval mode, char tokenizer over TEXT with <|endoftext|>), seeded."""
    torch.manual_seed(0)
    tok = char_tokenizer(TEXT, special_tokens=["<|endoftext|>"])
    return GPT(preset(name, vocab_size=tok.vocab_size, **overrides)).eval(), tok


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory):
    """A saved tiny char-level checkpoint with a 32-token context."""
    model, tok = char_model(block_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", model, tok)
