"""Preference tuning on (prompt, chosen, rejected) pairs, as tasks of the one Trainer, and the
evaluation of what it learned.

reward  A scalar head reads each conversation at its last token (a classify head with the
        one label "reward": Hugging Face's num_labels=1 sequence classifier), trained with the
        Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)) (Ouyang et al. 2022).
dpo     Direct preference optimisation (Rafailov et al. 2023). With the log-ratios
        h(y) = log pi(y|x) - log pi_ref(y|x) summed over the reply's tokens and
        z = h(chosen) - h(rejected):
            sigmoid  -log sigmoid(beta z)                  (DPO)
            hinge    max(0, 1 - beta z)                    (SLiC, Zhao et al. 2023)
            ipo      (z' - 1 / (2 beta))^2, z' from h averaged per reply token (Azar et al.
                     2023, normalised as TRL does)
        The implicit reward of a reply is beta h(y); TRL logs the same rewards, margins and
        accuracies, and `tests/test_preference.py` checks the loss and rewards against TRL's.

The reference pi_ref is the model as fine-tuning starts. Its log-probabilities of every pair
are computed once, in build_model, before any weight changes: no second model is held during
training (with LoRA or full fine-tuning alike), and a resumed run gets the same numbers
again from init_from (build_model runs before the checkpoint's weights are loaded).

A batch holds a pair as two rows: the B chosen rows, then the B rejected rows, so a batch is
still (inputs, targets), plus the reference's log-probabilities [2B] for dpo.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .chat_template import CHATML
from .config import ConfigError
from .examples import IGNORE, EpochOrder, Example, collate, split_val
from .generation import eval_mode
from .loading import Pretrained, load_pretrained
from .model import GPT
from .peft import apply_peft, input_room
from .preference_data import Pair, encode_pair, lm_rows, read_pairs, reward_rows
from .surgery import CHATML_TOKENS, fit_chat_template, resize_vocab, set_head
from .tokenizer import Tokenizer
from .train_config import FinetuneConfig

if TYPE_CHECKING:
    from .train import Batch

REWARD_LABELS = ["reward"]


def is_reward_model(model: GPT) -> bool:
    return model.config.head == "classify" and model.config.labels == REWARD_LABELS


# -- the numbers a preference loss is made of ----------------------------------------------


def reply_logps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's scored targets' log-probability, summed [R], their count [R], and the logits
    at those positions [N, V], for inputs x and targets y [R, T] (IGNORE elsewhere). Logits
    are computed at the scored positions only (GPT.forward's keep)."""
    scored = y != IGNORE  # [R, T]
    logits = model(x, keep=scored)  # [N, V]
    token = -F.cross_entropy(logits.float(), y[scored], reduction="none")  # [N]
    rows = scored.nonzero()[:, 0]  # [N]: each scored position's row
    logps = token.new_zeros(len(x)).index_add(0, rows, token)  # [R]
    return logps, scored.sum(-1), logits


def dpo_loss(
    logps: torch.Tensor, ref: torch.Tensor, n: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards beta * (log pi - log pi_ref) [2B], from
    the policy's and the reference's summed log-probabilities [2B] (chosen rows, then
    rejected) and the replies' token counts [2B]."""
    ratios = logps - ref  # [2B]
    chosen, rejected = ratios.chunk(2)
    if loss_type == "ipo":
        n_chosen, n_rejected = n.chunk(2)
        z = chosen / n_chosen - rejected / n_rejected
        loss = (z - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = F.relu(1 - beta * (chosen - rejected))
    else:
        loss = -F.logsigmoid(beta * (chosen - rejected))
    return loss, beta * ratios.detach()


def reward_loss(scores: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: per-pair -log sigmoid(r_chosen - r_rejected) [B] from scores [2B]."""
    chosen, rejected = scores.chunk(2)
    return -F.logsigmoid(chosen - rejected)


def last_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A reward head's score at each row's scored (last) token [R]."""
    return model(x)[y != IGNORE][:, 0]  # [R, T, 1] -> [R]


def pair_batch(pairs: Sequence[tuple[Example, Example]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Inputs and targets [2B, T] of B pairs: the chosen rows, then the rejected rows."""
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def pair_stats(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """What practitioners watch (TRL's names), from rewards [2B]: chosen rows, then rejected."""
    chosen, rejected = rewards.float().chunk(2)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


# -- the task ------------------------------------------------------------------------------


class PreferenceTask:
    """reward / dpo: preference pairs, batched by a seeded permutation per epoch."""

    causal = True
    rows_per_example = 2  # a pair is two rows: the memory guard counts both

    def __init__(self, config: FinetuneConfig, lm: Pretrained):
        self.config, self.name = config, config.objective
        self.model = lm.model
        self.template, self.tokenizer = fit_chat_template(lm.model, lm.tokenizer, config.template)
        pairs, val = split_val(read_pairs(config.data), read_pairs, config)
        self.val_pairs = val
        self.train = self._encode(pairs)
        self.val = self._encode(val)
        if not self.train:
            raise ConfigError(f"{config.data}: no pair leaves a reply token within max_length")
        self.seq_len = max(len(row.ids) for pair in self.train + self.val for row in pair)
        self.pad_id = self.tokenizer.pad_id or 0
        self.order = EpochOrder(len(self.train), config.seed)
        self.ref: dict[str, torch.Tensor] = {}  # dpo: the reference's log-probabilities [N, 2]
        self._stats: list[dict[str, torch.Tensor]] = []

    def _encode(self, pairs: Sequence[Pair]) -> list[tuple[Example, Example]]:
        c = self.config
        max_length = min(c.max_length, input_room(self.model, c.peft))
        rows = reward_rows if c.objective == "reward" else lm_rows
        encoded = [
            encode_pair(self.tokenizer, p, self.template, max_length, c.max_prompt_length)
            for p in pairs
        ]
        return [rows(e) for e in encoded if e is not None]

    def build_model(self, device: torch.device) -> GPT:
        model = self.model.to(device)
        if self.config.objective == "reward":
            if model.config.head == "lm":
                set_head(model, "classify", REWARD_LABELS)
            elif not is_reward_model(model):
                raise ConfigError(
                    f"{self.config.init_from} has a {model.config.head} head, not a reward head"
                )
        else:
            if model.config.head != "lm":
                head = model.config.head
                raise ConfigError(f"dpo trains a language model; this one has a {head} head")
            c = self.config
            # the pairs max_steps will draw; a run by epochs (its steps are counted from the
            # data after this task exists) may draw any
            drawn = (
                range(len(self.train))
                if c.epochs
                else self.order.rows(0, c.max_steps * c.grad_accum * c.batch_size)
            )
            scored = range(min(len(self.val), c.eval_batches * c.batch_size or len(self.val)))
            from .train_needs import uses_autocast

            autocast = uses_autocast(c, device)
            self.ref = {
                "train": self._reference(model, self.train, set(drawn), device, autocast),
                "val": self._reference(model, self.val, set(scored), device, autocast),
            }
        return apply_peft(model.train(), self.config.peft)

    @torch.no_grad()
    def _reference(
        self,
        model: GPT,
        pairs: list[tuple[Example, Example]],
        needed: set[int],
        device: torch.device,
        autocast: bool,
    ) -> torch.Tensor:
        """The starting model's summed log-probability of each pair's replies [N, 2] (NaN for
        pairs this run never draws: a short run on a CPU skips most of an epoch), in eval
        mode (no dropout) and under the autocast training uses. Pairs go by length, so
        batches carry little padding."""
        model.eval()
        out = torch.full((len(pairs), 2), math.nan)
        order = sorted(needed, key=lambda i: len(pairs[i][0].ids) + len(pairs[i][1].ids))
        B = self.config.batch_size
        for start in range(0, len(order), B):
            batch = order[start : start + B]
            x, y = (t.to(device) for t in pair_batch([pairs[i] for i in batch], self.pad_id))
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                logps, _, _ = reply_logps(model, x, y)
            out[batch] = logps.float().cpu().view(2, -1).T
        return out

    def epoch_size(self) -> int:
        return len(self.train)

    def _batch(self, split: str, indices: Sequence[int]) -> Batch:
        pairs = self.train if split == "train" else self.val
        x, y = pair_batch([pairs[i] for i in indices], self.pad_id)
        if self.config.objective == "reward":
            return x, y
        ref = self.ref[split][list(indices)]  # [B, 2]
        if ref.isnan().any():  # only a pair outside the run's steps lacks one
            raise RuntimeError("a pair was drawn whose reference log-probability was not computed")
        return x, y, torch.cat([ref[:, 0], ref[:, 1]])

    def train_batch(self, step: int, micro: int) -> Batch:
        B = self.config.batch_size
        start = (step * self.config.grad_accum + micro) * B
        return self._batch("train", self.order.rows(start, B))

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]:
        """The first eval_batches * batch_size val pairs (all when 0)."""
        B, limit = self.config.batch_size, self.config.eval_batches
        n = min(len(self.val), limit * B or len(self.val))
        for b, start in enumerate(range(0, n, B)):
            if b % world_size == rank:
                yield self._batch("val", range(start, min(start + B, n)))

    def _pair_losses(self, model, x, y, ref) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.config.objective == "reward":
            scores = last_scores(model, x, y)
            return reward_loss(scores), pair_stats(scores.detach())
        logps, n, _ = reply_logps(model, x, y)
        loss, rewards = dpo_loss(logps, ref, n, self.config.beta, self.config.loss_type)
        stats = pair_stats(rewards)
        chosen, rejected = logps.detach().chunk(2)
        stats |= {"logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
        return loss, stats

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor | None = None):
        loss, stats = self._pair_losses(model, x, y, ref)
        self._stats.append(stats)
        return loss.mean()

    def val_loss(self, model, x, y, ref=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pairs' summed loss, their count): val loss is the mean loss per pair."""
        loss, _ = self._pair_losses(model, x, y, ref)
        return loss.sum(), torch.tensor(len(loss), device=loss.device)

    def step_values(self) -> dict[str, torch.Tensor]:
        """The loss's statistics averaged over the micro-batches since the last call."""
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        return {k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]}

    def val_metrics(self, model: GPT) -> dict[str, Any]:
        """The held-out pairs scored as `gptkit eval preference` scores them (dpo: against
        init_from, loaded again as the reference)."""
        c = self.config
        reference = load_reference(c.init_from, model) if c.objective == "dpo" else None
        return score_pairs(
            model,
            self.tokenizer,
            self.val_pairs,
            ref=reference,
            beta=c.beta,
            max_length=c.max_length,
            max_prompt_length=c.max_prompt_length,
        )


# -- evaluation ----------------------------------------------------------------------------


def chat_template_of(tokenizer: Tokenizer) -> str:
    """The template pairs are rendered with: the tokenizer's own, else ChatML when it has
    ChatML's tokens (fine-tuning added them)."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if not all(t in tokenizer.special_tokens for t in CHATML_TOKENS):
        raise ConfigError(
            "this model's tokenizer has no chat template and no ChatML tokens to render pairs "
            "with; score a chat model, or one fine-tuned from this one (which adds ChatML)"
        )
    return CHATML


def load_reference(path: str, policy: GPT) -> GPT:
    """The reference model `path`, on the policy's device, its vocabulary grown as fine-tuning
    grew the policy's (the ChatML tokens) so their log-probabilities compare."""
    reference = load_pretrained(path, policy.tok_emb.weight.device).model
    if reference.config.head != "lm":
        raise ConfigError(f"the reference {path} must be a language model")
    return resize_vocab(reference, policy.config.vocab_size).eval()


@torch.inference_mode()
def score_pairs(
    model: GPT,
    tokenizer: Tokenizer,
    pairs: Sequence[Pair],
    *,
    ref: GPT | None = None,
    beta: float = 0.1,
    max_length: int = 1024,
    max_prompt_length: int = 0,
    batch_size: int = 4,
) -> dict[str, Any]:
    """How often the model prefers each pair's chosen reply, by what it can score:

    - a reward model: its reward (accuracy: r(chosen) > r(rejected));
    - a language model with `ref`: DPO's implicit reward beta * (log pi - log pi_ref), and
      the mean per-token KL(pi || pi_ref) over the replies' tokens;
    - a language model alone: its mean log-probability per reply token (a reference-free
      preference: what the untouched model already prefers).

    Ties count as wrong, as in TRL's reward accuracy (a policy equal to its reference ties on
    every pair)."""
    reward = is_reward_model(model)
    if not reward and model.config.head != "lm":
        head = model.config.head
        raise ConfigError(f"preference scoring needs a language or reward model, not a {head} head")
    template = chat_template_of(tokenizer)
    max_length = min(max_length, model.context)
    encoded = [encode_pair(tokenizer, p, template, max_length, max_prompt_length) for p in pairs]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise ConfigError("no pair leaves a reply token within max_length")
    device = model.tok_emb.weight.device
    rows = [reward_rows(e) if reward else lm_rows(e) for e in kept]
    scores, kl, kl_tokens = [], 0.0, 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = pair_batch(rows[start : start + batch_size], tokenizer.pad_id or 0)
            x, y = (t.to(device) for t in batch)
            if reward:
                scores.append(last_scores(model, x, y).float().cpu())
                continue
            logps, n, logits = reply_logps(model, x, y)
            if ref is None:
                scores.append((logps / n).cpu())
                continue
            ref_logps, _, ref_logits = reply_logps(ref, x, y)
            scores.append((beta * (logps - ref_logps)).cpu())
            p = F.log_softmax(logits.float(), -1)  # [N, V]: the replies' tokens
            q = F.log_softmax(ref_logits.float(), -1)
            kl += float((p.exp() * (p - q)).sum())
            kl_tokens += len(p)
    chosen = torch.cat([s.view(2, -1)[0] for s in scores])
    rejected = torch.cat([s.view(2, -1)[1] for s in scores])
    out: dict[str, Any] = {
        "n": len(kept),
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "chosen": float(chosen.mean()),
        "rejected": float(rejected.mean()),
        "score": "reward"
        if reward
        else ("implicit reward" if ref is not None else "mean log-prob"),
    }
    if ref is not None and not reward:
        out["kl_per_token"] = kl / kl_tokens
    if len(kept) < len(pairs):
        out["skipped"] = len(pairs) - len(kept)  # no reply token within max_length
    return out


@torch.inference_mode()
def rewards(
    model: GPT,
    tokenizer: Tokenizer,
    conversations: Sequence[list[dict[str, str]]],
    max_length: int = 1024,
    batch_size: int = 8,
) -> list[float]:
    """A reward model's score of each conversation (ending with the assistant reply to score),
    in batches."""
    if not is_reward_model(model):
        raise ConfigError("lm.reward needs a reward model (from `gptkit finetune reward`)")
    template = chat_template_of(tokenizer)
    rows = []
    for conversation in conversations:
        if not conversation or conversation[-1].get("role") != "assistant":
            raise ConfigError("each conversation must end with the assistant reply to score")
        reply = conversation[-1]["content"]
        e = encode_pair(
            tokenizer, Pair(conversation[:-1], reply, reply), template,
            min(max_length, model.context), 0,
        )  # fmt: skip
        if e is None:
            raise ConfigError("a conversation leaves no reply token within max_length")
        rows.append(reward_rows(e)[0])
    device, out = model.tok_emb.weight.device, []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            x, y = (
                t.to(device)
                for t in collate(rows[start : start + batch_size], tokenizer.pad_id or 0)
            )
            out += last_scores(model, x, y).float().tolist()
    return out
