"""Shared test helpers: a tiny character-level model, a checkpoint of it, a prepared corpus."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from reference import run_in_child

from gptkit.checkpoint import save_checkpoint
from gptkit.config import preset
from gptkit.model import GPT
from gptkit.prepare import prepare
from gptkit.tokenizer import char_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog.\n"

# The property tests draw the same examples on every run, so that a red `make test` always
# means a change broke something; GPTKIT_FUZZ_EXPLORE=1 draws new ones each run.
settings.register_profile("repeatable", derandomize=True)
settings.load_profile("default" if os.environ.get("GPTKIT_FUZZ_EXPLORE") else "repeatable")

# Under pytest-xdist (`make test` runs -n auto) the workers share the cores: each worker's torch,
# and the gptkit processes its tests start, get their share of them. Two workers on two cores
# with two threads each would spin against each other in OpenMP's barriers.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "reference(library): run the test body in a child process, so that the reference "
        "library's crash fails this test alone (tests/reference.py)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    marker = pyfuncitem.get_closest_marker("reference")
    if marker is None:
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    run_in_child(marker.args[0], lambda: pyfuncitem.obj(**args))
    return True


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


# The characters the fine-tuning tests' toy data are written in.
FINETUNE_CHARS = "abcdefghijklmnopqrstuvwxyz .,:?!\n#-'0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def save_finetune_base(path: Path) -> Path:
    """A random tiny Llama-style checkpoint (char tokenizer over FINETUNE_CHARS with
    <|endoftext|>, a 64-token context), seeded: the base the fine-tuning tests start from."""
    tok = char_tokenizer(FINETUNE_CHARS, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64))
    return save_checkpoint(path, model, tok)


def corpus_text(lines: int = 100) -> str:
    """Numbered lines of a pangram: a small corpus a tiny model learns something from."""
    return "".join(f"{i % 7} the quick brown fox jumps over the lazy dog; " for i in range(lines))


def prepare_corpus(root: Path, text: str) -> Path:
    """`text` as a character-level corpus prepared into token shards: root/data."""
    (root / "input.txt").write_text(text)
    tok = char_tokenizer(text, special_tokens=["<|endoftext|>"])
    prepare([root / "input.txt"], root / "data", tok, val_fraction=0.1, workers=1, progress=False)
    return root / "data"


def tiny_chat_lm(block_size: int = 512):
    """An LM: a tiny random Llama-style model whose BPE tokenizer knows ChatML. Its weights are
    drawn wide (std 0.3, not 0.02) so that its greedy and sampled text varies from token to
    token, which makes wrong batching or caching visible in the text."""
    from gptkit.api import LM
    from gptkit.tokenizer import train_bpe

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(["hello there, how are you? I am fine, thanks.\n" * 50], 300, specials)
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=block_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return LM(model, tok)


@contextlib.contextmanager
def chromium_page(width: int = 1200, height: int = 900) -> Iterator:
    """A page of Debian's chromium, headless, driven by Playwright (a person's view of an
    HTML file a test made); the test skips, saying why, where either is absent."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
