"""Parameter-efficient fine-tuning as module swaps: LoRA, bottleneck adapters, prefix tuning.

`apply_peft(model, config)` freezes every pretrained weight and adds small trainable modules:

- LoRA (Hu et al. 2021): each target nn.Linear W becomes W x + (alpha / r) B A x with A [r, in]
  random and B [out, r] zero, so a fresh LoRA leaves the model's outputs unchanged. `merge`
  folds B A into W (no cost at inference); `unmerge` takes it out again.
- DoRA (Liu et al. 2024): LoRA's update, then each output row of the weight rescaled to a
  learned magnitude (`DoRALinear`); same targets, rank and alpha as LoRA.
- (IA)^3 (Liu et al. 2022): learned vectors, initialised to ones, rescale each layer's keys and
  values (their rows of the fused qkv projection's output) and the MLP's hidden units (the
  down projection's input): ~0.04% of SmolLM2's parameters. `merge` folds them into those
  rows and columns.
- Adapters (Houlsby et al. 2019): a bottleneck MLP h + up(gelu(down(h))) after the output
  projection of every attention and MLP sublayer, `up` zero-initialised (identity at start).
- AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to the layers that
  matter during training (adalora.py).
- Prefix tuning (Li & Liang 2021): every layer gets `prefix_length` learned key/value
  positions that all queries may attend to, initialised from the model's own keys and values
  for random tokens (the paper found real activations train better than random vectors).
  These are P-tuning v2's deep prompts (Liu et al. 2022), without its optional MLP.
- Prompt tuning (Lester et al. 2021): `prefix_length` learned input embeddings before every
  sequence, initialised from random tokens' embeddings (`SoftPrompt`).

`quantize="int8"` stores every frozen linear layer of the blocks in int8 (quantize.py), a
quarter of float32's bytes, with the gradient passing through to LoRA and the layers below.

A classify / tag head is new, so it trains too. Parameter names gain a level (a LoRA'd
`attn.qkv.weight` is stored as `attn.qkv.base.weight`); checkpoints record the PeftConfig and
`load_checkpoint` rebuilds the same modules. `save_adapter` writes only the trained tensors
(adapter.safetensors + adapter_config.json), which `load_adapter` puts onto the base model.

Many LoRA adapters served on one base model, each batch row its own: multi_lora.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adalora import AdaLoRALinear
from .config import ConfigError, first_line
from .model import GPT
from .quantize import dequantize, quantize_frozen
from .safeload import read_json
from .surgery import resize_vocab, set_head
from .train_config import PeftConfig

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A) * self.scale
            self.merged = False


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): the LoRA-updated weight W + s B A split into a direction and a
    learned magnitude per output row, m (initialised to W's row norms, so a fresh DoRA changes
    nothing): y = m / ||W + s B A||_row * (W + s B A) x + b. The norm is a constant to the
    backward pass, as the paper's Section 4.3 (and PEFT) do to save memory."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base, r, alpha, dropout)
        self.magnitude = nn.Parameter(base.weight.detach().norm(dim=1).clone())  # [out]
        self._cached: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _rescale(self) -> torch.Tensor:
        """[out]: each row's magnitude over the norm of its updated weight. It costs a
        weight-sized matrix, so without gradients (generation: every token) it is computed
        once and kept until a parameter changes (their version counters say so)."""
        params = (self.base.weight, self.lora_A, self.lora_B, self.magnitude)
        key = tuple(p._version for p in params)
        if not torch.is_grad_enabled() and self._cached and self._cached[0] == key:
            return self._cached[1]
        updated = self.base.weight + (self.lora_B @ self.lora_A) * self.scale  # [out, in]
        rescale = self.magnitude / updated.norm(dim=1).detach()
        self._cached = None if torch.is_grad_enabled() else (key, rescale)
        return rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        bias = self.base.bias
        y = F.linear(x, self.base.weight)  # [..., out]
        y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        y = y * self._rescale()
        return y if bias is None else y + bias

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            rescale = self._rescale()
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
            self.base.weight *= rescale[:, None]
            self.merged = True

    def unmerge(self) -> None:
        raise ConfigError("a merged DoRA layer cannot be unmerged (its norms are folded in)")


class IA3(nn.Module):
    """A linear layer whose output rows from `start` on (keys and values of a fused qkv), or
    whose input (start=None: the MLP's hidden units), are scaled by a learned vector."""

    def __init__(self, base: nn.Linear, start: int | None):
        super().__init__()
        self.base, self.start = base, start
        n = base.in_features if start is None else base.out_features - start
        w = base.weight
        self.ia3_l = nn.Parameter(torch.ones(n, device=w.device, dtype=w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.start is None:
            return self.base(x * self.ia3_l)  # x [..., in]
        y = self.base(x)  # [..., out]: q rows as they are, k and v rows scaled
        return torch.cat([y[..., : self.start], y[..., self.start :] * self.ia3_l], dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.start is None:
            self.base.weight *= self.ia3_l  # [out, in]: scale the input's columns
        else:
            self.base.weight[self.start :] *= self.ia3_l[:, None]
            if self.base.bias is not None:
                self.base.bias[self.start :] *= self.ia3_l
        self.merged = True


class Adapter(nn.Module):
    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.base = base
        n, w = base.out_features, base.weight
        self.down = nn.Linear(n, size, device=w.device, dtype=w.dtype)
        self.up = nn.Linear(size, n, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # [..., C]
        return h + self.up(F.gelu(self.down(h)))


def _prepend(pk, pv, k, v, mask, is_causal: bool):
    """Keys and values pk, pv [Hkv, P, D] put before a layer's k, v [B, Hkv, S, D], with the
    attention mask widened to match: every query may attend to every prefix position.
    Returns (k, v [B, Hkv, P + S, D], mask, is_causal) for the attention call."""
    B, _, S, _ = k.shape
    P = pk.shape[1]
    k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    if mask is None and is_causal:  # a prefill from position 0: T == S queries
        mask = torch.ones(S, S, dtype=torch.bool, device=k.device).tril()[None, None]
    if mask is not None:  # [B or 1, 1, T, S] -> [B or 1, 1, T, P + S]
        visible = mask.new_ones(*mask.shape[:-1], P)
        mask = torch.cat([visible, mask], dim=-1)
    return k, v, mask, False


class Prefix(nn.Module):
    """Learned keys and values [Hkv, P, D] put before a layer's keys; Attention calls it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.k, self.v = nn.Parameter(k.clone()), nn.Parameter(v.clone())

    def forward(self, k, v, mask, is_causal: bool):
        return _prepend(self.k, self.v, k, v, mask, is_causal)


class PromptKV(nn.Module):
    """One layer's keys and values of the soft prompt: kept from the prompt's own pass
    (`recording`), put before the input's keys in every later one. No parameters: they are
    the prompt's, through the frozen layers below."""

    def __init__(self):
        super().__init__()
        self.k = self.v = None  # [Hkv, P, D]
        self.recording = False

    def forward(self, k, v, mask, is_causal: bool):
        if self.recording:  # k, v [1, Hkv, P, D]: the prompt's own causal pass
            self.k, self.v = k[0], v[0]
            return k, v, mask, is_causal
        return _prepend(self.k, self.v, k, v, mask, is_causal)


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al. 2021): P learned input embeddings [P, C] before every
    sequence, the model frozen. They take positions 0..P-1 and the input P on, as in Hugging
    Face PEFT. Since attention is causal, the prompt's keys and values at every layer depend
    on the prompt alone: one pass over it per forward (`attach`) gives them, and each layer
    puts them before its own (PromptKV), so padding, KV caches and task heads see only the
    input's positions."""

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Parameter(embeddings.clone())  # [P, C]
        self._kept: tuple | None = None  # what the last no-grad pass was computed from

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def attach(self, model: GPT) -> int:
        """Run `model`'s layers over the prompt so that each layer's PromptKV holds its keys
        and values; returns the number of positions the prompt takes. Without gradients
        (generation: every token) the result is kept until the embeddings change."""
        e = self.embeddings
        key = (e._version, e.dtype, e.device, model.training)
        if not torch.is_grad_enabled() and self._kept == key:
            return self.length
        layers = [block.attn.prefix for block in model.blocks]  # PromptKV each
        positions = torch.arange(self.length, device=self.embeddings.device)[None]  # [1, P]
        x, rope = model.embed(self.embeddings[None], positions)  # [1, P, C]
        masks = model._masks(1, self.length, 0, None, x.device)  # plain causal
        for layer in layers:
            layer.recording = True
        try:
            for block in model.blocks:
                x = block(x, rope, masks, None)
        finally:
            for layer in layers:
                layer.recording = False
        self._kept = None if torch.is_grad_enabled() else key
        return self.length


def _linears(model: GPT, targets: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for each nn.Linear in the blocks whose name ends with a
    target; an error when a target matches nothing (a typo would silently train nothing)."""
    found, matched = [], set()
    for name, module in model.blocks.named_modules():
        for target in targets:
            if isinstance(module, nn.Linear) and (name == target or name.endswith("." + target)):
                parent_name, _, attr = name.rpartition(".")
                found.append((model.blocks.get_submodule(parent_name), attr, module))
                matched.add(target)
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ConfigError(
            f"peft.targets {missing} match no linear layer; the block's layers are "
            "attn.qkv, attn.proj, mlp.fc and mlp.proj"
        )
    return found


def _prefix_init(model: GPT, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [L, Hkv, P, D] of every layer for `length` random tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen)
    cache = model.new_cache(1, length)
    was_training = model.training
    with torch.no_grad():
        model.eval().features(ids.to(model.tok_emb.weight.device), cache=cache)
    model.train(was_training)
    return cache.k[:, 0], cache.v[:, 0]


def apply_peft(model: GPT, config: PeftConfig, init: bool = True) -> GPT:
    """Freeze `model` and add `config`'s trainable modules, in place. A no-op for "none".

    init=False leaves the prefix at zeros instead of running the model for its starting
    values (a checkpoint is about to overwrite them, and its weights are not loaded yet)."""
    if not config.enabled:
        return model
    if getattr(model, "peft", None) is not None:
        raise ConfigError("the model already has a parameter-efficient method applied")
    c, length = model.config, config.prefix_length
    if config.method in ("prefix", "prompt") and length >= c.block_size:
        raise ConfigError(f"peft.prefix_length must be < the context {c.block_size}")
    w = model.tok_emb.weight
    if config.method == "prefix" and init:
        prefix = _prefix_init(model, length)
    elif config.method == "prefix":
        zeros = torch.zeros(
            c.n_layer, c.n_kv_head, length, c.head_dim, device=w.device, dtype=w.dtype
        )
        prefix = (zeros, zeros)
    elif config.method == "prompt":  # embeddings of random tokens (PEFT's SAMPLE_VOCAB)
        ids = torch.randint(0, c.vocab_size, (length,), generator=torch.Generator().manual_seed(0))
        prompt = w.detach()[ids.to(w.device)] if init else w.new_zeros(length, c.n_embd)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method in ("lora", "dora", "adalora"):
        kind = {"lora": LoRALinear, "dora": DoRALinear, "adalora": AdaLoRALinear}[config.method]
        for parent, attr, linear in _linears(model, config.targets):
            setattr(parent, attr, kind(linear, config.r, config.alpha, config.dropout))
    elif config.method == "ia3":
        queries = c.n_head * c.head_dim  # the fused qkv's first rows
        for block in model.blocks:
            block.attn.qkv = IA3(block.attn.qkv, queries)
            block.mlp.proj = IA3(block.mlp.proj, None)
    elif config.method == "adapter":
        for block in model.blocks:
            block.attn.proj = Adapter(block.attn.proj, config.adapter_size)
            block.mlp.proj = Adapter(block.mlp.proj, config.adapter_size)
    elif config.method == "prompt":
        for block in model.blocks:
            block.attn.prefix = PromptKV()
        model.prompt = SoftPrompt(prompt)
    else:
        keys, values = prefix
        for i, block in enumerate(model.blocks):
            block.attn.prefix = Prefix(keys[i], values[i])
    if model.config.head != "lm":  # a new head has to learn, whatever the method
        model.score.requires_grad_(True)
    if config.quantize == "int8":
        quantize_frozen(model.blocks)
    model.peft = config
    return model


def input_room(model: GPT, config: PeftConfig) -> int:
    """The positions an input may take once `config` is applied to `model`: a soft prompt
    takes prefix_length of the context. ConfigError when it would leave none."""
    room = model.context - config.prompt_positions
    if room < 1:
        raise ConfigError(
            f"peft.prefix_length={config.prefix_length} leaves no room in the context of "
            f"{model.context}; use fewer prompt embeddings"
        )
    return room


def peft_config(model: GPT) -> PeftConfig | None:
    return getattr(model, "peft", None)


# The methods whose update folds into the base weights.
MERGEABLE = ("lora", "dora", "adalora", "ia3")


def merge_peft(model: GPT) -> GPT:
    """Fold every LoRA, DoRA, AdaLoRA or (IA)^3 update into its base weight and drop those
    modules, in place: the result is a plain GPT (exportable, as fast as the base model) with
    the same outputs. An int8 base is dequantized first: the merged weights are float32."""
    config = peft_config(model)
    if config is None or config.method not in MERGEABLE:
        method = "none" if config is None else config.method
        raise ConfigError(f"merging needs LoRA, DoRA, AdaLoRA or (IA)^3; this model has {method}")
    dequantize(model.blocks)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear | AdaLoRALinear | IA3):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.base)
    model.peft = None
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_state(model: GPT) -> dict[str, torch.Tensor]:
    """The tensors a parameter-efficient method trains (adapters, and a task head)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: GPT, directory: str | Path, base: str, tokenizer=None) -> Path:
    """Write only the trained tensors and how to rebuild them onto `base` (a model name or
    path): megabytes instead of the whole model. The tokenizer goes along when given (SFT
    may have added chat tokens to the base model's)."""
    config = peft_config(model)
    if config is None:
        raise ConfigError("save_adapter needs a model with a parameter-efficient method applied")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in trainable_state(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    meta = {
        "base_model": base,
        "peft": config.to_dict(),
        "head": model.config.head,
        "labels": model.config.labels,
        "label_fields": model.config.label_fields,
        "label_sizes": model.config.label_sizes,
        "score_bias": model.config.score_bias,
        "vocab_size": model.config.vocab_size,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        return read_json(path)  # size- and depth-bounded
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; is {directory} a gptkit adapter?") from None
    except ValueError as e:  # safeload's message names the file and what is wrong with it
        raise ConfigError(f"{first_line(e, 300)}; is {directory} a gptkit adapter?") from None


def load_adapter(model: GPT, directory: str | Path) -> GPT:
    """Put a `save_adapter` directory onto its base model (in place): the same head, the same
    modules, then the trained tensors, every name and shape checked."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    # Tokens SFT added sit after the base vocabulary, their embeddings (frozen) set to the
    # mean of the others: resizing the base reproduces them exactly.
    resize_vocab(model, meta["vocab_size"])
    if meta["vocab_size"] != model.config.vocab_size:
        raise ConfigError(
            f"{directory} was trained on a model with {meta['vocab_size']} token ids; this one "
            f"has {model.config.vocab_size}: load the adapter onto {meta['base_model']}"
        )
    if meta["head"] != "lm":
        fields, sizes = meta.get("label_fields"), meta.get("label_sizes")
        bias = meta.get("score_bias", True)  # adapters saved before it was recorded had one
        set_head(model, meta["head"], meta["labels"], fields, sizes, bool(bias))
    apply_peft(model, PeftConfig.from_dict(meta["peft"]))
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(model.tok_emb.weight.device))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{directory / ADAPTER_WEIGHTS} cannot be read ({e})") from None
    expected = trainable_state(model)
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise ConfigError(
            f"{directory / ADAPTER_WEIGHTS} does not fit this model (names or shapes differ); "
            f"load it onto {meta['base_model']}"
        )
    model.load_state_dict(state, strict=False)
    return model
