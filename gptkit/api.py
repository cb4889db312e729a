"""The public, text-level API: `load` a model from anywhere, then `LM.generate`, or
`LM.classify` / `LM.tag` on a fine-tuned classifier or tagger (pipelines.py builds on these).

lm = gptkit.load("runs/demo/checkpoint")      # a gptkit checkpoint
lm = gptkit.load("path/to/hf-model")          # a Hugging Face directory
lm = gptkit.load("gpt2")                      # a hub name (downloads when a network is there)
lm.generate("Once upon a time", max_new_tokens=40, temperature=0.8, top_p=0.95)
lm.generate(prompt, temperature=0, prompt_lookup=8)  # the same text, sooner when it quotes
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import predict
from .config import ConfigError, GPTConfig
from .cpu import use_decode_layout
from .cpu_plan import decode_plan
from .generation import Completion, SampleConfig, TextStream, complete, eval_mode, stream
from .generation.decode import reply_stream
from .generation.speculative import speculates, speculative_complete, speculative_stream
from .generation.stopping import skippable
from .loading import Pretrained, load_pretrained, resolve_device
from .model import GPT
from .peft import load_adapter
from .peft_format import is_peft_dir, merge_peft_lora
from .quantize import check as check_quantize
from .quantize import quantize as quantize_model
from .quantize import quantized
from .tokenizer_files import load_tokenizer

_SAMPLE_KEYS = {f.name for f in fields(SampleConfig)}


def sample_config(**sampling: Any) -> SampleConfig:
    """SampleConfig from keyword arguments; an unknown keyword is a clear error."""
    unknown = sorted(set(sampling) - _SAMPLE_KEYS)
    if unknown:
        raise ConfigError(f"unknown sampling option(s) {unknown}; known: {sorted(_SAMPLE_KEYS)}")
    return SampleConfig(**sampling)


@dataclass
class LM(Pretrained):
    """A model with its tokenizer, and generation: what `gptkit.load` returns.

    Speculative decoding (generation/speculative.py) gives the same text in fewer passes of
    the model: `prompt_lookup=k` drafts k tokens a step from the text so far; a draft model
    (`draft`, or `draft=` per call) drafts `draft_tokens` a step. It makes one sequence per
    prompt: several prompts are decoded one after another, and a draft model is left unused
    for beam search or num_return_sequences > 1 (prompt_lookup there is a ConfigError).
    """

    draft: GPT | None = None  # a small model sharing the tokenizer, used to draft tokens

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    def classify(
        self, texts: str | list[str], top_k: int | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """A classifier's label, score and probability table per text (predict.classify)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return predict.classify(self.model, self.tokenizer, texts, top_k, batch_size)

    def tag(self, texts: str | list[str], batch_size: int = 32) -> list[list[dict[str, Any]]]:
        """A tagger's entities per text, with character spans (predict.tag)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return predict.tag(self.model, self.tokenizer, texts, batch_size)

    def score_candidates(self, history: list[str], candidates: list[str]) -> list[float]:
        """P(the user picks each candidate next), from a `gptkit finetune rank` model: history
        is what the user liked, oldest first (titles); candidates are item texts."""
        from .recommend import score_candidates
        from .recsys import candidate_text, context_text

        texts = [candidate_text(c) for c in candidates]
        context = context_text(history)
        return score_candidates(self.model, self.tokenizer, context, texts).tolist()

    def reward(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        """A reward model's score (from `gptkit finetune reward`) of each conversation, which
        ends with the assistant reply to score: higher is preferred."""
        from .preference import rewards

        return rewards(self.model, self.tokenizer, conversations)

    def embed(self, texts: str | list[str], batch_size: int = 16) -> np.ndarray:
        """One unit-length vector [n_embd] per text: the final hidden states, mean-pooled
        (embed.ModelEmbedder; `gptkit index --embedder MODEL` indexes with it)."""
        from .embed import ModelEmbedder

        texts = [texts] if isinstance(texts, str) else list(texts)
        return ModelEmbedder(self, batch_size=batch_size).encode(texts)  # [N, n_embd]

    def features(self, text: str) -> torch.Tensor:
        """The final hidden states [tokens, n_embd] of the text's tokens (any head)."""
        ids = torch.tensor([self.prompt_ids(text)], device=self.model.tok_emb.weight.device)
        with torch.inference_mode(), eval_mode(self.model):
            return self.model.features(ids)[0].float().cpu()

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

    def text_stream(self, sample: SampleConfig, skip_special: bool = False) -> TextStream:
        """The detokenizer that ends a reply under these options (see generation/stopping.py)."""
        skip = skippable(self.tokenizer) if skip_special else None
        return reply_stream(sample, self.tokenizer.eos_id, self.tokenizer.decode, skip)

    def draft_model(self, sample: SampleConfig, draft: LM | GPT | None = None) -> GPT | None:
        """The draft model for a request: `draft` if given, else self.draft; None where it
        cannot be used (beam search, several sequences per prompt)."""
        draft = self.draft if draft is None else draft
        if isinstance(draft, LM):
            if draft.tokenizer.vocab_size != self.tokenizer.vocab_size:
                raise ConfigError(
                    f"the draft model's tokenizer has {draft.tokenizer.vocab_size} tokens, this "
                    f"model's {self.tokenizer.vocab_size}: a draft must share the tokenizer"
                )
            draft = draft.model
        if draft is None or sample.num_beams > 1 or sample.num_return_sequences > 1:
            return None
        if draft.config.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"the draft model has {draft.config.vocab_size} token ids, the tokenizer "
                f"{self.tokenizer.vocab_size}: a draft must share the tokenizer"
            )
        return draft

    def complete(
        self,
        prompts: str | list[str],
        skip_special: bool = False,
        draft: LM | GPT | None = None,
        **sampling: Any,
    ) -> list[Completion]:
        """Completions with their token ids, finish reasons and (with logprobs=k) the
        log-probabilities of each token and its k best alternatives; prompt-major.
        skip_special leaves special tokens out of the text (an end-of-turn one ends it).
        Speculative completions (see the class) are speculative.Speculated, with `stats`."""
        predict.needs_head(self.model, "lm", "generating text")
        sample = sample_config(**sampling)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.prompt_ids(p) for p in prompts]
        tok = self.tokenizer
        skip = skippable(self.tokenizer) if skip_special else None
        draft = self.draft_model(sample, draft)
        if speculates(sample, draft):
            return [
                speculative_complete(
                    self.model, p, sample, tok.eos_id, tok.decode, tok.vocab_size, skip, draft=draft
                )
                for p in ids
            ]
        return complete(self.model, ids, sample, tok.eos_id, tok.decode, tok.vocab_size, skip)

    def generate(self, prompts: str | list[str], **sampling: Any) -> list[str]:
        """Completions (without the prompt): num_return_sequences per prompt, prompt-major."""
        return [c.text for c in self.complete(prompts, **sampling)]

    def stream(
        self,
        prompt: str,
        skip_special: bool = False,
        draft: LM | GPT | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield the completion's text piece by piece as tokens are generated (see TextStream)."""
        predict.needs_head(self.model, "lm", "generating text")
        sample = sample_config(**sampling)
        text = self.text_stream(sample, skip_special)
        tok = self.tokenizer
        # The stop rule is applied once, by `text`: the token stream runs until it says so.
        endless = replace(sample, stop=[], stop_ids=[])
        draft = self.draft_model(sample, draft)
        if speculates(sample, draft):
            tokens = speculative_stream(
                self.model,
                self.prompt_ids(prompt),
                endless,
                None,
                None,
                tok.vocab_size,
                draft=draft,
            )
        else:
            tokens = stream(
                self.model, self.prompt_ids(prompt), endless, None, None, tok.vocab_size
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
    draft: str | Path | None = None,
) -> LM:
    """Load a gptkit checkpoint, a Hugging Face directory or hub name, a GGUF file, or a
    named model (`NAMED_MODELS`, e.g. "smollm2-135m-instruct"), ready for generation.

    adapter: a `gptkit finetune` adapter directory (LoRA, adapters or prefix) to put on the
    model. decode_layout=False keeps the weights row-major, as training wants them (see
    cpu.use_decode_layout). quantize="int8" makes the linear layers int8 for CPU generation
    (see quantize.py).

    Pickled weights (a Hugging Face pytorch_model.bin) are read only with allow_pickle=True,
    and then weights-only; None follows `convert.allowing_pickle` (default: refused). A model
    that cannot fit in memory raises resources.ResourceError before any weight is read.

    draft: a small model sharing this one's tokenizer (loaded the same way, without the
    adapter) that drafts tokens for speculative decoding: `LM.draft`."""
    device = resolve_device(device)
    if quantize is not None:
        check_quantize(quantize, device)  # before the slow part
    decode_layout = device.type == "cpu" and decode_layout and quantize is None
    plan = decode_plan() if decode_layout else None
    # Converters lay matrices out column-major as they copy them when the plan wants that,
    # so use_decode_layout below finds them in place instead of copying every one again.
    column_major = plan is not None and plan.column_major
    pretrained = load_pretrained(
        path_or_name, device, dtype, column_major=column_major, allow_pickle=allow_pickle
    )
    lm = LM(pretrained.model, pretrained.tokenizer)
    if adapter is not None:
        if is_peft_dir(adapter):  # a Hugging Face PEFT LoRA: merged into the weights
            merge_peft_lora(lm.model, adapter)
        else:
            load_adapter(lm.model, adapter)
        if (Path(adapter) / "tokenizer").is_dir():
            lm.tokenizer = load_tokenizer(Path(adapter) / "tokenizer")
    if quantize is not None:
        quantize_model(lm.model, quantize)
    elif plan is not None and quantized(lm.model) is None:  # (an int8 checkpoint: no layout)
        # The machine's plan, or row-major where the native step serves the model (then a
        # converter's column-major copies are copied back: one matrix at a time).
        use_decode_layout(lm.model)
    if draft is not None:
        drafter = load(
            draft,
            device,
            dtype,
            decode_layout=decode_layout,
            quantize=quantize,
            allow_pickle=allow_pickle,
        )
        lm.draft = lm.draft_model(SampleConfig(), drafter)  # checks that it fits the tokenizer
    return lm
