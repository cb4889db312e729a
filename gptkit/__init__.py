"""gptkit: a complete, readable GPT toolkit.

import gptkit
lm = gptkit.load("path/to/checkpoint")        # or a Hugging Face directory / hub name
print(lm.generate("Hello", max_new_tokens=20))

from gptkit.finetune import finetune          # fine-tuning (imported on demand: it pulls in
finetune(gptkit.FinetuneConfig(...))          # the metric libraries)
"""

from importlib.metadata import version

from .api import LM, load
from .config import GPTConfig, preset
from .generation import SampleConfig, generate
from .model import GPT
from .pipelines import pipeline
from .tokenizer import Tokenizer
from .tokenizer_files import load_tokenizer
from .train_config import FinetuneConfig, PeftConfig

__version__ = version("gptkit")

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
