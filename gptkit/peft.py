"""Parameter-efficient fine-tuning as module swaps: LoRA, bottleneck adapters, prefix tuning.

`apply_peft(model, config)` freezes every pretrained weight and adds small trainable modules:

- LoRA (Hu et al. 2021): each target nn.Linear W becomes W x + (alpha / r) B A x with A [r, in]
  random and B [out, r] zero, so a fresh LoRA leaves the model's outputs unchanged. `merge`
  folds B A into W (no cost at inference); `unmerge` takes it out again.
- Adapters (Houlsby et al. 2019): a bottleneck MLP h + up(gelu(down(h))) after the output
  projection of every attention and MLP sublayer, `up` zero-initialised (identity at start).
- Prefix tuning (Li & Liang 2021): every layer gets `prefix_length` learned key/value
  positions that all queries may attend to, initialised from the model's own keys and values
  for random tokens (the paper found real activations train better than random vectors).

A classify / tag head is new, so it trains too. Parameter names gain a level (a LoRA'd
`attn.qkv.weight` is stored as `attn.qkv.base.weight`); checkpoints record the PeftConfig and
`load_checkpoint` rebuilds the same modules. `save_adapter` writes only the trained tensors
(adapter.safetensors + adapter_config.json), which `load_adapter` puts onto the base model.

Serving many LoRA adapters on one base (as vLLM and LoRAX/punica do): `load_loras` puts
several adapter directories on the model side by side (`MultiLoRALinear`), and each batch row
of a forward pass picks its own adapter, or none (`MultiLoRA.select`): the base matmul runs
once for the whole batch, each row's low-rank update is added on top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, first_line
from .model import GPT
from .safeload import first_non_finite, read_json
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


class Prefix(nn.Module):
    """Learned keys and values [Hkv, P, D] put before a layer's keys; Attention calls it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.k, self.v = nn.Parameter(k.clone()), nn.Parameter(v.clone())

    def forward(self, k, v, mask, is_causal: bool):
        """k, v [B, Hkv, S, D] -> [B, Hkv, P + S, D], with the attention mask widened to match:
        every query may attend to every prefix position."""
        B, _, S, _ = k.shape
        P = self.k.shape[1]
        k = torch.cat([self.k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([self.v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None and is_causal:  # a prefill from position 0: T == S queries
            mask = torch.ones(S, S, dtype=torch.bool, device=k.device).tril()[None, None]
        if mask is not None:  # [B or 1, 1, T, S] -> [B or 1, 1, T, P + S]
            visible = mask.new_ones(*mask.shape[:-1], P)
            mask = torch.cat([visible, mask], dim=-1)
        return k, v, mask, False


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
    if config.method == "prefix" and length >= c.block_size:
        raise ConfigError(f"peft.prefix_length must be < the context {c.block_size}")
    prefix = None
    if config.method == "prefix" and init:
        prefix = _prefix_init(model, length)
    elif config.method == "prefix":
        w = model.tok_emb.weight
        zeros = torch.zeros(
            c.n_layer, c.n_kv_head, length, c.head_dim, device=w.device, dtype=w.dtype
        )
        prefix = (zeros, zeros)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.method == "lora":
        for parent, attr, linear in _linears(model, config.targets):
            setattr(parent, attr, LoRALinear(linear, config.r, config.alpha, config.dropout))
    elif config.method == "adapter":
        for block in model.blocks:
            block.attn.proj = Adapter(block.attn.proj, config.adapter_size)
            block.mlp.proj = Adapter(block.mlp.proj, config.adapter_size)
    else:
        keys, values = prefix
        for i, block in enumerate(model.blocks):
            block.attn.prefix = Prefix(keys[i], values[i])
    if model.config.head != "lm":  # a new head has to learn, whatever the method
        model.score.requires_grad_(True)
    model.peft = config
    return model


def peft_config(model: GPT) -> PeftConfig | None:
    return getattr(model, "peft", None)


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its base weight and drop the LoRA modules, in place: the
    result is a plain GPT (exportable, as fast as the base model) with the same outputs."""
    config = peft_config(model)
    if config is None or config.method != "lora":
        raise ConfigError("merge_lora needs a model with LoRA applied")
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
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


# --- many LoRA adapters on one base model, one per batch row (serving) -----------------------


class MultiLoRA:
    """The LoRA adapters a served model holds side by side (`load_loras`), and which one each
    batch row of the forward passes running now uses: the model's `multi_lora`.

    Adapter i (1..N) is names[i - 1]; index 0 is the base model, with no update. The serving
    engine wraps every forward pass in `select`, one index per batch row: a decoding step
    names each running row's adapter, a prefill (one row) its sequence's.

    Why state set around a forward pass rather than an argument of it: the row -> adapter
    map would have to pass through GPT.forward, every Block, Attention and MLP to reach the
    linear layers, for what only the engine uses. The engine thread is the model's only
    caller, so nothing races for it; `select` is a context manager so that a pass that fails
    cannot leave its rows to the next one. Outside `select` every row is the base model.
    """

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        self.rows: torch.Tensor | None = None  # [B] each row's adapter; None: no row has one

    @contextmanager
    def select(self, adapters: Sequence[int]) -> Iterator[None]:
        """Batch row i of the forward passes inside uses adapter adapters[i] (0: none)."""
        if not all(0 <= a <= len(self.names) for a in adapters):
            raise ValueError(f"adapters {list(adapters)} are not all in 0..{len(self.names)}")
        if any(adapters):  # else the base model, computed exactly as without adapters
            self.rows = torch.tensor(adapters, device=self.device)
        try:
            yield
        finally:
            self.rows = None


class MultiLoRALinear(nn.Module):
    """A linear layer holding several LoRA adapters, each batch row adding its own update:
    y[b] = base(x[b]) + scale_a * x[b] A_a^T B_a^T, a = the row's adapter (MultiLoRA.rows).

    The base matmul runs once for the whole batch. lora_A [N + 1, in, r] and lora_B
    [N + 1, r, out] stack the adapters' A^T and scale * B^T (alpha / r folded in: one op
    fewer per layer): slot 0 (the base model) and the slot of an adapter that does not adapt
    this layer are zeros, and a rank below the largest is padded with zeros, so those rows
    add exact zeros. They are stored transposed so that the rows' gathered copies are
    contiguous operands of torch.bmm.

    Gather and bmm (punica's BGMV, in PyTorch) rather than grouping the rows by adapter (a pair
    of matmuls per adapter, plus indexing the rows out and back): a CPU decoding step is many
    small ops, and this is the fewest, two gathers and two batched matmuls per layer. In
    bench/multi_lora.py (SmolLM2-135M, 4 requests for 4 adapters with r=16 on q, k, v and o,
    2-core AMD EPYC, busy) it decoded at 0.96x and 1.04x a merged model's tokens/s in two
    runs, grouping at 0.85x and 0.84x.
    Multiplying every row by every adapter and masking would need no gathers, but its cost
    grows with the adapters loaded; this one's grows with the rows in the batch.
    """

    def __init__(
        self,
        base: nn.Module,
        loras: MultiLoRA,
        updates: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
    ):
        """updates: adapter index -> (A [r, in], B [out, r], alpha / r) for the adapters of
        this layer."""
        super().__init__()
        self.base, self.loras = base, loras
        a0 = next(iter(updates.values()))[0]
        rank = max(a.shape[0] for a, _, _ in updates.values())
        slots = len(loras.names) + 1
        lora_A = a0.new_zeros(slots, base.in_features, rank)
        lora_B = a0.new_zeros(slots, rank, base.out_features)
        for i, (a, b, scale) in updates.items():
            lora_A[i, :, : a.shape[0]] = a.t()
            lora_B[i, : a.shape[0]] = b.t() * scale
        # Buffers, to move with the model; not persistent: a served model is never saved.
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, out]
        rows = self.loras.rows
        if rows is None:
            return y
        B = rows.shape[0]
        if x.shape[0] != B:
            raise ValueError(f"MultiLoRA.select named {B} rows for a batch of {x.shape[0]}")
        x3, y3 = x.reshape(B, -1, x.shape[-1]), y.reshape(B, -1, y.shape[-1])  # [B, T, in/out]
        h = torch.bmm(x3, self.lora_A.index_select(0, rows))  # [B, T, in] @ [B, in, r]
        # y + h @ [B, r, out]: one fused op; rows of slot 0 add zeros
        return torch.baddbmm(y3, h, self.lora_B.index_select(0, rows)).view(y.shape)

    def extra_repr(self) -> str:
        return f"adapters={len(self.loras.names)}, rank={self.lora_A.shape[-1]}"


def load_loras(model: GPT, adapters: Mapping[str, str | Path]) -> MultiLoRA:
    """Put LoRA adapters (`save_adapter` directories, by name) on `model` side by side, in
    place, and return its `multi_lora` (adapter i is the i-th name). Every directory is read
    and checked before the model changes; a one-line error names the one refused: a method
    other than LoRA, a classify or tag head, another vocabulary, or tensors that do not fit
    this model. Adapters may adapt different layers: a row whose adapter lacks a layer gets
    no update there. The base weights stay as they are (any layout, int8 too)."""
    if getattr(model, "multi_lora", None) is not None or peft_config(model) is not None:
        raise ConfigError(
            "the model already has adapters; load LoRA adapters side by side onto the base model"
        )
    weight = model.tok_emb.weight
    names = []
    layers: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for index, (name, directory) in enumerate(adapters.items(), start=1):
        config, pairs = _read_lora(model, Path(directory))
        names.append(name)
        for layer, (a, b) in pairs.items():
            update = (a.to(weight.dtype), b.to(weight.dtype), config.alpha / config.r)
            layers.setdefault(layer, {})[index] = update
    loras = MultiLoRA(names, weight.device)
    for layer, updates in layers.items():
        parent, _, attr = layer.rpartition(".")
        wrapped = MultiLoRALinear(model.get_submodule(layer), loras, updates)
        setattr(model.get_submodule(parent), attr, wrapped)
    model.multi_lora = loras
    return loras


def _read_lora(model: GPT, directory: Path) -> tuple[PeftConfig, dict[str, tuple]]:
    """A LoRA adapter's config and {layer name: (A [r, in], B [out, r])}, checked against
    `model`."""
    meta = read_adapter_config(directory)
    try:
        config = PeftConfig.from_dict(dict(meta["peft"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{directory / ADAPTER_CONFIG}: {first_line(e, 200)}") from None
    if config.method != "lora":
        raise ConfigError(
            f"{directory} is a {config.method} adapter; only LoRA adapters are served side by "
            f"side (serve it alone with --adapter {directory})"
        )
    if meta.get("head") != "lm":
        raise ConfigError(f"{directory} has a {meta.get('head')} head; a served adapter needs lm")
    base = meta.get("base_model")
    if meta.get("vocab_size") != model.config.vocab_size:
        raise ConfigError(
            f"{directory} was trained with {meta.get('vocab_size')} token ids, this model has "
            f"{model.config.vocab_size} (another base, or tokens its fine-tuning added): serve "
            f"it alone with --adapter {directory}, on {base}"
        )
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(model.tok_emb.weight.device))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{directory / ADAPTER_WEIGHTS} cannot be read ({e})") from None
    misfit = ConfigError(
        f"{directory / ADAPTER_WEIGHTS} does not fit this model (names or shapes differ); "
        f"it was trained on {base}"
    )
    if (bad := first_non_finite(state.items())) is not None:  # it would poison its rows
        raise ConfigError(f"{directory / ADAPTER_WEIGHTS}: {bad} holds NaN or infinity")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not layer.startswith("blocks."):
            raise misfit
        found.setdefault(layer, {})[kind] = tensor
    pairs = {}
    for layer, tensors in found.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise misfit from None
        a, b = tensors.get("lora_A"), tensors.get("lora_B")
        shape_in = (config.r, getattr(module, "in_features", None))
        shape_out = (getattr(module, "out_features", None), config.r)
        if a is None or b is None or a.shape != shape_in or b.shape != shape_out:
            raise misfit
        pairs[layer] = (a, b)
    if not pairs:
        raise misfit
    return config, pairs
