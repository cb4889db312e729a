"""gptkit: a complete, readable GPT toolkit.

import gptkit
lm = gptkit.load("path/to/checkpoint")        # or a Hugging Face directory / hub name
print(lm.generate("Hello", max_new_tokens=20))
"""

__version__ = "0.1.0"

from .api import LM, load, pipeline  # noqa: E402
from .config import GPTConfig, SampleConfig, preset  # noqa: E402
from .generate import generate  # noqa: E402
from .model import GPT  # noqa: E402
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ = [
    "GPT",
    "GPTConfig",
    "LM",
    "SampleConfig",
    "Tokenizer",
    "generate",
    "load",
    "load_tokenizer",
    "pipeline",
    "preset",
]
