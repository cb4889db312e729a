"""Adapters in Hugging Face PEFT's format: LoRA, DoRA, (IA)^3 and prompt tuning out, LoRA in.

Out: `gptkit convert RUN/checkpoint OUT --to peft`. In: `--adapter PEFT_DIR` (and
`gptkit.load(..., adapter=PEFT_DIR)`) on the model the adapter was trained for, merged into
its weights as it loads.

PEFT's adapter directory (adapter_config.json + adapter_model.safetensors) is what
transformers, vLLM, TGI and llama.cpp's LoRA converter read. It targets the Hugging Face
model that `gptkit convert BASE OUT --to hf` writes, so the names come from the same tables
(hf_arch.py):

- a LoRA on a fused gptkit layer (Llama's qkv, gate/up) becomes one LoRA per Hugging Face
  layer: each takes its rows of B and the shared A, so B A splits exactly as the weight does;
  DoRA (PEFT's `use_dora`) splits its per-row magnitudes the same way;
- (IA)^3's key/value scales go to k_proj and v_proj (GPT-2's fused c_attn gets ones for its
  query rows), its hidden-unit scales to the down projection, a "feedforward" module;
- GPT-2's fused c_attn stays fused; its Conv1D stores the weight transposed, which PEFT's
  `fan_in_fan_out` says (A and B themselves are not transposed);
- the scale alpha / r carries over as `lora_alpha` and `r`;
- a soft prompt is PEFT's PROMPT_TUNING `prompt_embeddings` as it is (both put it at
  positions 0..P-1 and the input after it).

Reading maps the other way: each Hugging Face layer's B A (times lora_alpha / r, or / sqrt(r)
with rsLoRA) is added to its rows of the gptkit weight. Merged, the model runs at the base's
speed; serving such an adapter beside others (`--adapter name=DIR`) needs gptkit's own format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .convert import ConversionError
from .hf_arch import Rule, arch_of, expand_rules, gptkit_config_to_hf, stored_names
from .model import GPT
from .peft import IA3, LoRALinear, peft_config
from .safeload import read_json

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _rules(model: GPT, names) -> dict[str, Rule]:
    """gptkit layer name -> its export rule (the Hugging Face layers it becomes)."""
    model_type = gptkit_config_to_hf(model.config)["model_type"]
    rules = expand_rules(arch_of(model_type), model.config, {f"{n}.weight" for n in names})
    return {r.ours.removesuffix(".weight"): r for r in rules}


def _per_layer(rule: Rule, config, rows: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face layer name, its part of `rows`): a tensor over a fused layer's output rows
    (dim 0) split as the export splits the weight."""
    parts = rows.split(rule.split(config)) if rule.split else [rows]
    return [(t.removesuffix(".weight"), p) for t, p in zip(rule.theirs, parts, strict=True)]


def peft_lora_tensors(model: GPT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({PEFT tensor name: tensor}, the Hugging Face module names they adapt) of a LoRA or
    DoRA model. Each Hugging Face layer gets its rows of B (and of DoRA's magnitudes) and a
    copy of the shared A."""
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    rules = _rules(model, loras)
    tensors, modules = {}, []
    for name, lora in loras.items():
        a = lora.lora_A.detach().float()  # [r, in]
        b_parts = _per_layer(rules[name], model.config, lora.lora_B.detach().float())
        m = getattr(lora, "magnitude", None)  # DoRA: [out]
        m_parts = _per_layer(rules[name], model.config, m.detach().float()) if m is not None else []
        for module, b in b_parts:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = a.clone()  # its own copy
            tensors[f"{key}.lora_B.weight"] = b.contiguous()
            modules.append(module)
        for module, magnitude in m_parts:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = magnitude.contiguous()
    return tensors, modules


def peft_ia3_tensors(model: GPT) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """({PEFT tensor name: tensor}, the Hugging Face modules, those of them that scale their
    input ("feedforward" in PEFT's terms)) of an (IA)^3 model. PEFT scales a layer's whole
    output; gptkit scales only the key and value rows of a fused qkv, so Llama's q_proj is
    left out and GPT-2's c_attn gets ones for its query rows."""
    scaled = {name: m for name, m in model.named_modules() if isinstance(m, IA3)}
    rules = _rules(model, scaled)
    tensors, modules, feedforward = {}, [], []
    for name, ia3 in scaled.items():
        scales = ia3.ia3_l.detach().float()
        if ia3.start is None:  # the MLP's hidden units: the down projection's input, [1, in]
            module = rules[name].theirs[0].removesuffix(".weight")
            tensors[f"base_model.model.{module}.ia3_l"] = scales[None].clone()
            modules.append(module)
            feedforward.append(module)
            continue
        rows = torch.cat([scales.new_ones(ia3.start), scales])  # every output row's scale
        end = 0  # where this layer's rows end
        for module, part in _per_layer(rules[name], model.config, rows):
            end += len(part)
            if end > ia3.start:  # a layer with rows gptkit scales (not Llama's q_proj)
                tensors[f"base_model.model.{module}.ia3_l"] = part[:, None].contiguous()
                modules.append(module)
    return tensors, modules, feedforward


def export_peft(model: GPT, out_dir: str | Path, base: str | None = None) -> Path:
    """Write `model`'s LoRA, DoRA, (IA)^3 or soft prompt as a PEFT adapter directory for its
    `--to hf` export.

    Raises ConversionError for what PEFT cannot hold here: another method, or a task head the
    fine-tune trained (export those merged with --to hf instead). Tokens an SFT run added to
    the vocabulary are not in the adapter: such a run exports merged, too.
    """
    peft = peft_config(model)
    if peft is None or peft.method not in ("lora", "dora", "ia3", "prompt"):
        method = "no adapter" if peft is None else f"peft.method={peft.method!r}"
        raise ConversionError(
            "--to peft writes LoRA, DoRA, (IA)^3 and prompt-tuning adapters; this model has "
            + method
        )
    if model.config.head != "lm":
        raise ConversionError(
            f"--to peft writes language-model adapters; this model has a {model.config.head} "
            "head it trained (export it merged with --to hf)"
        )
    c = model.config
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True}
    # GPT-2's Conv1D stores its weights transposed
    fan_in_fan_out = gptkit_config_to_hf(c)["model_type"] == "gpt2"
    if peft.method == "prompt":
        tensors = {"prompt_embeddings": model.prompt.embeddings.detach().float().contiguous()}
        config = {
            "peft_type": "PROMPT_TUNING",
            **common,
            "num_virtual_tokens": peft.prefix_length,
            "token_dim": c.n_embd,
            "num_transformer_submodules": 1,
            "num_attention_heads": c.n_head,
            "num_layers": c.n_layer,
            # how PEFT builds the embedding before the saved tensor replaces it (gptkit started
            # from sampled token embeddings; RANDOM needs nothing and every PEFT version has it)
            "prompt_tuning_init": "RANDOM",
        }
    elif peft.method == "ia3":
        tensors, modules, feedforward = peft_ia3_tensors(model)
        config = {
            "peft_type": "IA3",
            **common,
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": sorted(modules),
            "feedforward_modules": sorted(feedforward),
        }
    else:
        tensors, modules = peft_lora_tensors(model)
        config = {
            "peft_type": "LORA",
            **common,
            "fan_in_fan_out": fan_in_fan_out,
            "r": peft.r,
            "lora_alpha": peft.alpha,
            "lora_dropout": peft.dropout,
            "target_modules": sorted(modules),  # full names: exactly the layers gptkit adapted
            "bias": "none",
            "use_dora": peft.method == "dora",
        }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------ reading


def is_peft_dir(directory: str | Path) -> bool:
    """A PEFT adapter directory (its adapter_config.json names a peft_type)."""
    try:
        return "peft_type" in json.loads((Path(directory) / PEFT_CONFIG).read_text())
    except (OSError, ValueError):
        return False


# PEFT options that change what a LoRA computes and that this reader does not implement.
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_pattern")


def merge_peft_lora(model: GPT, directory: str | Path) -> GPT:
    """Add a PEFT LoRA's updates to `model`'s weights, in place; ConfigError naming what does
    not fit (another PEFT method or option, a layer the model lacks, a shape that differs)."""
    directory = Path(directory)
    try:
        config = read_json(directory / PEFT_CONFIG)
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # MetadataError is a ValueError
        raise ConfigError(f"{directory / PEFT_CONFIG}: not a readable PEFT config ({e})") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{directory}: peft_type {config.get('peft_type')!r}; gptkit reads LORA")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if used:
        raise ConfigError(f"{directory}: PEFT option(s) {', '.join(used)} are not supported")
    scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    try:
        tensors = load_file(str(directory / PEFT_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{directory / PEFT_WEIGHTS} cannot be read ({e})") from None
    rows = _hf_rows(model)
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            if module not in rows:
                raise ConfigError(f"{directory}: {module} is no layer of this model")
            ours, start, size = rows[module]
            a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))  # [r, in]
            weight = state[ours]  # [out, in]
            if b is None or b.shape != (size, a.shape[0]) or a.shape[1] != weight.shape[1]:
                raise ConfigError(f"{directory}: {module}'s LoRA does not fit this model")
            weight[start : start + size] += (b.float() @ a.float()).to(weight.dtype) * scale
    return model


def _hf_rows(model: GPT) -> dict[str, tuple[str, int, int]]:
    """Hugging Face layer name -> (the gptkit weight holding it, first row, rows)."""
    config = model.config
    arch = arch_of(gptkit_config_to_hf(config)["model_type"])
    state, rows = model.state_dict(), {}
    for rule in expand_rules(arch, config, stored_names(config, state)):
        if not rule.ours.endswith(".weight"):
            continue
        sizes = rule.split(config) if rule.split else [state[rule.ours].shape[0]]
        start = 0
        for theirs, size in zip(rule.theirs, sizes, strict=True):
            rows[theirs.removesuffix(".weight")] = (rule.ours, start, size)
            start += size
    return rows
