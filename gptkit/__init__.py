"""gptkit: a complete, readable GPT toolkit.

import gptkit
lm = gptkit.load("path/to/checkpoint")        # or a Hugging Face directory / hub name
print(lm.generate("Hello", max_new_tokens=20))

from gptkit.finetune import finetune          # fine-tuning (imported on demand: it pulls in
finetune(gptkit.FinetuneConfig(...))          # the metric libraries)
"""

__version__ = "0.1.0"

from .api import LM, load, pipeline  # noqa: E402
from .config import FinetuneConfig, GPTConfig, PeftConfig, preset
from .generation import (
    SampleConfig,  # noqa: E402
    generate,  # noqa: E402
)
from .model import GPT  # noqa: E402
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ = [
    "FinetuneConfig",
    "GPT",
    "GPTConfig",
    "PeftConfig",
    "LM",
    "SampleConfig",
    "Tokenizer",
    "generate",
    "load",
    "load_tokenizer",
    "pipeline",
    "preset",
]
