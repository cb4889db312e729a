"""Pretraining objectives: how a window of corpus tokens becomes (inputs, targets).

Every objective takes windows of block_size + 1 tokens [B, T + 1] and a random generator (the
trainer seeds it from the step, so a resumed run corrupts windows exactly as before) and
returns inputs and targets [B, T]; a target of -100 is not scored.

- lm:  next-token prediction, the GPT objective.
- fim: fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to
       Fill in the Middle"): a share of the windows is cut into prefix, middle and suffix and
       rearranged as <fim_prefix> P <fim_suffix> S <fim_middle> M <eos>, still trained with
       next-token prediction, so the causal model learns to infill given both sides. The cut is
       made in the window (the paper's context-level FIM), whatever documents it spans.
- mlm: masked-token prediction with bidirectional attention (BERT, Devlin et al. 2018): 15% of
       the tokens are chosen; of those 80% become <mask>, 10% a random token, 10% stay; only
       the chosen ones are scored.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ConfigError
from .tokenizer import Tokenizer
from .train_config import TrainConfig

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
MASK_TOKEN = "<mask>"


def _special_ids(tokenizer: Tokenizer, names: tuple[str, ...], objective: str) -> list[int]:
    missing = [n for n in names if n not in tokenizer.special_tokens]
    if missing:
        raise ConfigError(
            f"objective {objective!r} needs the special tokens {' '.join(names)}, and the "
            f"data's tokenizer lacks {' '.join(missing)}; train the tokenizer with them "
            f"(gptkit tokenizer train --special ...) and prepare the data again"
        )
    return [tokenizer.special_tokens[n] for n in names]


class Objective:
    """Next-token prediction; the base the other objectives rearrange."""

    name = "lm"
    causal = True  # whether attention is causal while training this objective

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        self.config, self.tokenizer = config, tokenizer

    def rearrange(self, windows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return windows

    def batch(
        self, windows: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.rearrange(windows, rng).astype(np.int64))  # [B, T + 1]
        return rows[:, :-1], rows[:, 1:]


class FillInTheMiddle(Objective):
    name = "fim"

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        self.prefix, self.suffix, self.middle = _special_ids(tokenizer, FIM_TOKENS, "fim")
        if tokenizer.eos_id is None:
            raise ConfigError("objective 'fim' needs an end-of-text token to close the middle")

    def rearrange(self, windows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = windows.copy()
        n = windows.shape[1] - 4  # room for the four sentinels in the same length
        for row in np.flatnonzero(rng.random(len(windows)) < self.config.fim_rate):
            a, b = np.sort(rng.integers(0, n + 1, size=2))  # middle = tokens [a, b)
            w = windows[row, :n]
            out[row] = np.concatenate(
                [[self.prefix], w[:a], [self.suffix], w[b:], [self.middle], w[a:b]]
                + [[self.tokenizer.eos_id]]
            )
        return out


class MaskedLM(Objective):
    name = "mlm"
    causal = False

    def __init__(self, config: TrainConfig, tokenizer: Tokenizer) -> None:
        super().__init__(config, tokenizer)
        (self.mask,) = _special_ids(tokenizer, (MASK_TOKEN,), "mlm")

    def batch(
        self, windows: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = windows[:, :-1].astype(np.int64)  # [B, T]: no shift, the model sees both sides
        chosen = rng.random(tokens.shape) < self.config.mask_rate
        action = rng.random(tokens.shape)  # < 0.8: <mask>; < 0.9: a random token; else keep
        random_ids = rng.integers(0, self.tokenizer.vocab_size, size=tokens.shape)
        inputs = np.where(chosen & (action < 0.8), self.mask, tokens)
        inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        targets = np.where(chosen, tokens, -100)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


OBJECTIVES = {cls.name: cls for cls in (Objective, FillInTheMiddle, MaskedLM)}


def make_objective(config: TrainConfig, tokenizer: Tokenizer) -> Objective:
    return OBJECTIVES[config.objective](config, tokenizer)
