"""A gptkit LoRA in Hugging Face PEFT's format: `gptkit convert RUN/checkpoint OUT --to peft`.

PEFT's adapter directory (adapter_config.json + adapter_model.safetensors) is what
transformers, vLLM, TGI and llama.cpp's LoRA converter read. It targets the Hugging Face
model that `gptkit convert BASE OUT --to hf` writes, so the names come from the same tables
(hf_arch.py):

- a LoRA on a fused gptkit layer (Llama's qkv, gate/up) becomes one LoRA per Hugging Face
  layer: each takes its rows of B and the shared A, so B A splits exactly as the weight does;
- GPT-2's fused c_attn stays fused; its Conv1D stores the weight transposed, which PEFT's
  `fan_in_fan_out` says (A and B themselves are not transposed);
- the scale alpha / r carries over as `lora_alpha` and `r`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .convert import ConversionError
from .hf_arch import arch_of, expand_rules, gptkit_config_to_hf
from .model import GPT
from .peft import LoRALinear, peft_config

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_lora_tensors(model: GPT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({PEFT tensor name: tensor}, the Hugging Face module names they adapt)."""
    config = model.config
    model_type = gptkit_config_to_hf(config)["model_type"]
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    rules = {
        r.ours.removesuffix(".weight"): r
        for r in expand_rules(arch_of(model_type), config, {f"{n}.weight" for n in loras})
    }
    tensors, modules = {}, []
    for name, lora in loras.items():
        rule = rules[name]
        a, b = lora.lora_A.detach(), lora.lora_B.detach()  # [r, in], [out, r]
        parts = b.split(rule.split(config)) if rule.split else [b]
        for theirs, b_part in zip(rule.theirs, parts, strict=True):
            module = theirs.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.float().clone()  # own copy
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_part.float().contiguous()
            modules.append(module)
    return tensors, modules


def export_peft(model: GPT, out_dir: str | Path, base: str | None = None) -> Path:
    """Write `model`'s LoRA as a PEFT adapter directory for its `--to hf` export.

    Raises ConversionError for what PEFT's LoRA cannot hold here: another method, a task head
    or vocabulary the fine-tune trained (export those merged with --to hf instead).
    """
    peft = peft_config(model)
    if peft is None or peft.method != "lora":
        method = "no adapter" if peft is None else f"peft.method={peft.method!r}"
        raise ConversionError(f"--to peft writes LoRA adapters; this model has {method}")
    if model.config.head != "lm":
        raise ConversionError(
            f"--to peft writes language-model LoRAs; this model has a {model.config.head} head "
            "it trained (export it merged with --to hf)"
        )
    tensors, modules = peft_lora_tensors(model)
    model_type = gptkit_config_to_hf(model.config)["model_type"]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": peft.r,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": sorted(modules),  # full names: exactly the layers gptkit adapted
        "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
        "bias": "none",
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
