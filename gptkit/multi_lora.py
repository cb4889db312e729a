"""Many LoRA adapters on one base model, one per batch row, for serving (as vLLM and
LoRAX/punica do).

`load_loras` puts several adapter directories (peft.py's `save_adapter`) on the model side by
side (`MultiLoRALinear`), and each batch row of a forward pass picks its own adapter, or none
(`MultiLoRA.select`): the base matmul runs once for the whole batch, each row's low-rank
update is added on top.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ConfigError, first_line
from .model import GPT
from .peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_config, read_adapter_config
from .safeload import first_non_finite
from .train_config import PeftConfig


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
