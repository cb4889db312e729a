"""Hugging Face ⇄ gptkit: the only module that knows foreign parameter names.

Supported Hugging Face architectures: GPT-2 (`gpt2`) and Llama-style models (`llama`, and
`mistral` / `qwen2`, which are Llama with a sliding window or q/k/v biases).

Both directions are driven by one table per architecture (hf_arch.py). Import checks every
tensor against the shapes of a meta-device `GPT` built from the converted config, so a
mismatch names the Hugging Face tensor rather than failing deep inside `load_state_dict`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import resources
from .config import ConfigError, GPTConfig, first_line
from .hf_arch import (
    Arch,
    ConversionError,
    Rule,
    arch_of,
    expand_rules,
    gptkit_config_to_hf,
    hf_config_to_gptkit,
    model_type_of,
    stored_names,
)
from .model import GPT
from .safeload import MetadataError, first_non_finite, read_json
from .tensorfile import read_safetensors
from .tokenizer import Tokenizer


class PickleNotAllowedError(ConversionError):
    """A pickled weights file met without the user's explicit allow_pickle / --allow-pickle."""


# Whether pickled weights files may be read when a caller does not say (allow_pickle=None).
# Off unless a caller turns it on with `allowing_pickle`: the CLI does for --allow-pickle, so
# that commands whose loading happens deep inside (finetune's init_from, a distill teacher)
# honour the flag without every layer passing it down.
_PICKLE_ALLOWED: ContextVar[bool] = ContextVar("gptkit_allow_pickle", default=False)


@contextmanager
def allowing_pickle(allow: bool = True) -> Iterator[None]:
    """Within the block, loaders given allow_pickle=None read pickled weights (weights-only)."""
    token = _PICKLE_ALLOWED.set(allow)
    try:
        yield
    finally:
        _PICKLE_ALLOWED.reset(token)


def pickle_allowed(allow_pickle: bool | None) -> bool:
    """An explicit True/False, or else the setting `allowing_pickle` made (default False)."""
    return _PICKLE_ALLOWED.get() if allow_pickle is None else allow_pickle


# ------------------------------------------------------------------------------ weights


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory whose config.json describes a Hugging Face model."""
    file = Path(path) / "config.json"
    try:
        hf = read_json(file)  # size- and depth-bounded: see safeload.py
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and ("model_type" in hf or "architectures" in hf)


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    return _read_json(Path(directory) / "config.json")


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, or a ConversionError naming the file."""
    try:
        data = read_json(file)  # size- and depth-bounded: see safeload.py
    except OSError as e:
        raise ConversionError(f"{file}: cannot read ({e.strerror})") from None
    except MetadataError as e:
        raise ConversionError(f"{file}: {first_line(e, 200).removeprefix(f'{file} ')}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def unpickling_problem(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in a few words. Its own message runs to a
    dozen lines and suggests retrying with the weights-only guard off, which for a hostile file is
    exactly what must not be done."""
    found = re.search(r"GLOBAL ([\w.]+)|([Uu]nsupported operand \S+)", str(e))
    if found and found.group(1):
        return f"it calls for {found.group(1)}"
    return found.group(2) if found else "torch's weights-only unpickler refused it"


def _load_weights_file(file: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    if file.suffix != ".safetensors" and not allow_pickle:
        raise PickleNotAllowedError(
            f"{file} is a pickle, which can run code when loaded; convert it to safetensors "
            "(from a copy you trust) or pass --allow-pickle (allow_pickle=True in Python)"
        )
    try:
        if file.suffix == ".safetensors":
            return read_safetensors(file)  # tensors of their own: see tensorfile.py
        # weights_only, always (even when pickles are allowed): torch's restricted unpickler
        # builds tensors and plain containers, and refuses any other global a file names.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{file}: refused to unpickle: it holds more than tensors ({unpickling_problem(e)}); "
            "a weights file never needs that, so it may be hostile"
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError) as e:
        raise ConversionError(
            f"{file}: cannot read the weights ({first_line(e)}); damaged?"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{file}: not a state dict of named tensors")
    return state


def load_hf_state_dict(
    directory: str | Path, allow_pickle: bool | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: single or sharded safetensors, else pytorch_model.bin
    (only with allow_pickle: see `pickle_allowed`)."""
    directory = Path(directory)
    allow = pickle_allowed(allow_pickle)
    for stem in ("model.safetensors", "pytorch_model.bin"):
        if (directory / stem).is_file():
            return _load_weights_file(directory / stem, allow)
        index = directory / f"{stem}.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map: not a Hugging Face index")
            shards = sorted({str(s) for s in weight_map.values()})
            outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
            if outside:  # a shard must sit beside its index, not anywhere on the disk
                raise ConversionError(f"{index} names a shard outside its directory: {outside[0]}")
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(_load_weights_file(directory / shard, allow))
            return sd
    raise ConversionError(
        f"{directory} has no weights: expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin"
    )


def _canonical_name(name: str, arch: Arch) -> str:
    """Base-model checkpoints (GPT2Model, original gpt2) lack the wrapper prefix: add it."""
    return name if name.startswith((arch.prefix, "lm_head.", "score.")) else arch.prefix + name


def _part_shapes(rule: Rule, shape: torch.Size, config: GPTConfig) -> list[tuple[int, ...]]:
    """Shapes each HF tensor of `rule` must have for the gptkit tensor to be `shape`."""
    rows = rule.split(config) if rule.split else [shape[0]]
    parts = [(n, *shape[1:]) for n in rows]
    return [p[::-1] if rule.transpose else p for p in parts]


def listing(label: str, items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{label} {', '.join(items[:limit])}{more}"


class LazyTensors:
    """Named tensors, each read only when taken with `pop`.

    `hf_to_gptkit_state_dict` takes every source once, fuses it and drops it, so with lazy
    sources loading holds the converted weights plus one layer's sources, never a second copy.
    """

    # glibc keeps the pages of freed blocks resident unless asked: the holes dropped sources
    # and dequantization temporaries leave add ~10% to SmolLM2's loading peak without this.
    _return_freed_pages = staticmethod(resources.return_freed_pages)

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]) -> None:
        self._readers = readers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._readers))

    def pop(self, name: str) -> torch.Tensor:
        self._return_freed_pages()
        return self._readers.pop(name)()


def _join(parts: list[torch.Tensor], column_major: bool) -> torch.Tensor:
    """One new tensor from a rule's parts (stacked along dim 0), column-major if asked."""
    if not column_major or parts[0].dim() != 2:
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)
    rows = sum(p.shape[0] for p in parts)
    return torch.cat(parts, out=torch.empty(parts[0].shape[1], rows, dtype=parts[0].dtype).t())


def hf_to_gptkit_state_dict(
    sd: dict[str, torch.Tensor] | LazyTensors,
    config: GPTConfig,
    model_type: str,
    decode_layout: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename, transpose and fuse HF tensors into gptkit's names for a model of `config`.

    Returns what a gptkit checkpoint stores (no lm_head.weight when tied). Raises one
    ConversionError listing every missing, unexpected and mis-shaped Hugging Face tensor.
    Each tensor is taken out of `sd` when its rule is reached and dropped once fused or
    copied, so loading holds about one copy of the weights at a time. decode_layout=True
    makes each matrix column-major as it is copied (cpu.use_decode_layout's layout, made here
    with one tensor's sources in memory rather than later with the whole model's).
    """
    arch = arch_of(model_type)
    stored = {_canonical_name(k, arch): k for k in sd}  # canonical name -> name in `sd`
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misshaped: list[str] = []
    for rule in expand_rules(arch, config, stored_names(config, shapes)):
        parts = []
        expected = _part_shapes(rule, shapes[rule.ours], config)
        for name, shape in zip(rule.theirs, expected, strict=True):
            tensor = sd.pop(stored.pop(name)) if name in stored else None
            if tensor is None and re.search(arch.zero_if_absent, name):
                tensor = torch.zeros(shape)
            if tensor is None:
                missing.append(name)
            elif tuple(tensor.shape) != shape:
                misshaped.append(f"{name} {list(tensor.shape)} (expected {list(shape)})")
            else:
                parts.append(tensor.t() if rule.transpose else tensor)
        if len(parts) == len(rule.theirs):
            out[rule.ours] = _join(parts, decode_layout)
    ignore = arch.ignore + (r"|^lm_head\.weight$" if config.tie_embeddings else "")
    unexpected = sorted(k for k in stored if not re.search(ignore, k))
    if missing or unexpected or misshaped:
        problems = [
            listing(label, items)
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", misshaped),
            )
            if items
        ]
        raise ConversionError(
            f"checkpoint does not match its {model_type} config: " + "; ".join(problems)
        )
    return out


def gptkit_to_hf_state_dict(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_gptkit_state_dict: HF names, split and transposed, contiguous."""
    arch = arch_of(model_type)
    state = model.state_dict()
    stored = stored_names(model.config, state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in expand_rules(arch, model.config, stored):
        tensor = state[rule.ours].detach()
        parts = tensor.split(rule.split(model.config)) if rule.split else [tensor]
        for name, part in zip(rule.theirs, parts, strict=True):
            out[name] = (part.t() if rule.transpose else part).contiguous().cpu()
        used.add(rule.ours)
    left = sorted(stored - used)
    if left:
        raise ConversionError(
            listing("model has tensors Hugging Face cannot hold:", left)
            + " (merge adapters or drop task heads before exporting)"
        )
    return out


# ------------------------------------------------------------------------------ entry points


def load_hf(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    decode_layout: bool = False,
    *,
    allow_pickle: bool | None = None,
) -> GPT:
    """A gptkit GPT with the weights of a Hugging Face directory, in eval mode (matrices
    column-major with decode_layout=True; see hf_to_gptkit_state_dict).

    allow_pickle=True lets a pytorch_model.bin be read (weights-only); None: see
    `pickle_allowed`. Raises ResourceError before reading any weight when the model cannot
    fit on `device`."""
    directory = Path(directory)
    hf = read_hf_config(directory)
    config = hf_config_to_gptkit(hf)
    resources.check_inference(config, str(directory), device, dtype)
    sd = load_hf_state_dict(directory, allow_pickle)
    sd = hf_to_gptkit_state_dict(sd, config, model_type_of(hf), decode_layout)
    return model_from_state_dict(config, sd, device, dtype, source=directory)


def model_from_state_dict(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    device,
    dtype: torch.dtype,
    source: str | Path = "the weights",
) -> GPT:
    """A GPT in eval mode holding `state`, as `hf_to_gptkit_state_dict` returns it (every name
    and shape already checked; a tied lm_head absent), with no random init on the way.

    Weights holding NaN or infinity are refused (ConversionError naming `source`): such a model
    answers "" greedily and fails every sampled request. Checked once built, as GGUF tensors
    are only dequantized then."""
    model = GPT.from_state_dict(config, state, device, dtype).eval()
    bad = first_non_finite(model.named_parameters())
    if bad is not None:
        raise ConversionError(
            f"{source}: tensor {bad} holds NaN or infinite values; the weights are unusable "
            "(a diverged training run, or damage)"
        )
    return model


def export_hf(
    model: GPT,
    out_dir: str | Path,
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write config.json + model.safetensors that transformers' AutoModelForCausalLM loads
    (a classifier: AutoModelForSequenceClassification, which pools at the last token that is
    not pad_token_id, so give the text its EOS as gptkit does and pad with pad_token_id).

    Raises ConversionError naming the knob when the model has no Hugging Face equivalent.
    Tokenizer files are not written (gptkit.tokenizer owns them).
    """
    dtype = model.tok_emb.weight.dtype
    hf = gptkit_config_to_hf(model.config, dtype, bos_token_id, eos_token_id, pad_token_id)
    tensors = gptkit_to_hf_state_dict(model, hf["model_type"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return out


def classifier_padding(tokenizer: Tokenizer) -> int:
    """An id to pad an exported classifier's batches with: Hugging Face's classifier reads
    the last token that is not padding, which must be the EOS gptkit appends, so padding
    cannot be EOS. The tokenizer's pad token if it is not EOS, else a special token that is
    neither BOS nor EOS, else the last id."""
    ends = {tokenizer.eos_id, tokenizer.bos_id}
    if tokenizer.pad_id is not None and tokenizer.pad_id != tokenizer.eos_id:
        return tokenizer.pad_id
    spare = sorted(i for i in tokenizer.special_tokens.values() if i not in ends)
    return spare[0] if spare else tokenizer.vocab_size - 1


# Files a model needs: config, weights and tokenizer (no optimizer states, no other formats).
_HUB_METADATA = ["*.json", "merges.txt", "vocab.json", "tokenizer*"]


def resolve_hf(
    name_or_path: str | Path,
    allow_pickle: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A local directory as is; otherwise download a hub repo's model files (cached).

    The config and tokenizer come first: a model gptkit cannot run, or one too big for
    `device` in `dtype`, is refused before its weights are downloaded. safetensors weights
    are preferred; a repo that has only pickled ones (pytorch_model.bin) is fetched only with
    allow_pickle (None: see `pickle_allowed`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")):
        raise ConversionError(f"{name}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(name, allow_patterns=_HUB_METADATA))
        config = hf_config_to_gptkit(read_hf_config(local))
        resources.check_inference(config, name, device, dtype)
        local = Path(snapshot_download(name, allow_patterns=["*.safetensors"]))
        if not any(local.glob("*.safetensors")):  # older repos ship only pickled weights
            if not pickle_allowed(allow_pickle):
                raise PickleNotAllowedError(
                    f"{name!r} on the Hugging Face hub has no safetensors weights; its "
                    "pickled pytorch_model.bin can run code when loaded: pass --allow-pickle "
                    "(allow_pickle=True in Python) to fetch and read it weights-only"
                )
            local = Path(snapshot_download(name, allow_patterns=["pytorch_model*.bin*"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as e:
        if isinstance(e, ConversionError | ConfigError):  # already clear (ResourceError, too)
            raise
        raise ConversionError(
            f"cannot fetch {name!r} from the Hugging Face hub: {first_line(e)}"
        ) from None
    return local
