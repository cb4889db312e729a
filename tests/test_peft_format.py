"""LoRA, DoRA, (IA)^3 and prompt-tuning adapters in Hugging Face PEFT's format, checked by
PEFT itself: `peft.PeftModel` loads what `gptkit convert RUN --to peft` writes onto what
`--to hf` writes of the base, and computes gptkit's logits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from gptkit.checkpoint import save_checkpoint
from gptkit.config import preset
from gptkit.convert import ConversionError, export_hf
from gptkit.model import GPT
from gptkit.peft import apply_peft
from gptkit.peft_format import export_peft
from gptkit.tokenizer import char_tokenizer
from gptkit.train_config import PeftConfig

peft = pytest.importorskip("peft", reason="PEFT is the reference")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")


def lora_model(name: str, targets: list[str], method: str = "lora") -> tuple[GPT, GPT]:
    """(base, the base with an adapter whose trained tensors are random (LoRA's B, DoRA's
    magnitudes, (IA)^3's scales), so every update shows in the logits)."""
    torch.manual_seed(0)
    base = GPT(preset(name, block_size=32)).eval()
    config = PeftConfig(method=method, r=4, alpha=8, targets=targets, prefix_length=4)
    tuned = apply_peft(copy.deepcopy(base), config)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            elif "magnitude" in n or "ia3_l" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return base, tuned.eval()


ALL = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
CASES = {
    "llama-all": ("tiny-llama", ALL),
    "llama-qkv": ("tiny-llama", ["attn.qkv"]),
    "gpt2-all": ("tiny", ALL),
    "llama-dora": ("tiny-llama", ALL, "dora"),
    "gpt2-dora": ("tiny", ALL, "dora"),
    "llama-ia3": ("tiny-llama", ALL, "ia3"),
    "gpt2-ia3": ("tiny", ALL, "ia3"),
    "llama-prompt": ("tiny-llama", ALL, "prompt"),
    "gpt2-prompt": ("tiny", ALL, "prompt"),
}


@pytest.mark.reference("transformers")
@pytest.mark.parametrize("case", CASES)
def test_peft_loads_the_adapter_and_computes_gptkits_logits(tmp_path, case):
    base, tuned = lora_model(*CASES[case])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(export_hf(base, tmp_path / "hf"))
    model = peft.PeftModel.from_pretrained(hf_base, export_peft(tuned, tmp_path / "peft")).eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        # a soft prompt's positions come first in PEFT's logits
        ours, theirs, plain = tuned(ids), model(ids).logits[:, -ids.shape[1] :], base(ids)
    diff = (ours - theirs).abs().max().item()
    moved = (ours - plain).abs().max().item()
    print(f"\n{case}: the adapter moves logits by {moved:.2f}; vs PEFT {diff:.1e}")
    assert moved > 0.05 and diff <= 1e-4


def test_the_cli_writes_the_adapter_of_a_lora_checkpoint(tmp_path):
    _, tuned = lora_model("tiny-llama", ["attn.qkv", "mlp.fc"])
    # the base a fine-tune started from, as its checkpoint records it
    save_checkpoint(tmp_path / "run", tuned, extra={"train": {"config": {"init_from": "base-x"}}})
    cmd = [sys.executable, "-m", "gptkit", "convert", str(tmp_path / "run"), str(tmp_path / "p")]
    done = subprocess.run([*cmd, "--to", "peft"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PEFT adapter directory (lora)" in done.stdout
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "base-x"
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    # fused qkv and gate/up became one LoRA per Hugging Face layer, in both blocks
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    assert len(config["target_modules"]) == 2 * len(names)
    assert {m.rsplit(".", 1)[1] for m in config["target_modules"]} == set(names)


def test_what_peft_lora_cannot_hold_is_refused(char_checkpoint):
    _, tuned = lora_model("tiny-llama", ["attn.qkv"])
    adapters = apply_peft(GPT(preset("tiny-llama")), PeftConfig(method="adapter"))
    with pytest.raises(ConversionError, match="peft.method='adapter'"):
        export_peft(adapters, "/nonexistent")
    with pytest.raises(ConversionError, match="this model has no adapter"):
        export_peft(GPT(preset("tiny-llama")), "/nonexistent")


# ------------------------------------------------------------------------------ reading


@pytest.mark.reference("transformers")
@pytest.mark.parametrize("case", ["llama-qkv", "gpt2-all"])
def test_a_peft_adapter_made_by_peft_loads_with_adapter(tmp_path, case):
    """PEFT's own LoRA (q_proj and v_proj only: a block of the fused qkv it leaves alone),
    trained-looking B, saved by PEFT: gptkit.load(..., adapter=DIR) computes PeftModel's logits."""
    import gptkit

    name = CASES[case][0]
    torch.manual_seed(0)
    base = GPT(preset(name, block_size=32)).eval()
    save_checkpoint(tmp_path / "base", base, char_tokenizer("abc", ["<|endoftext|>"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(base, tmp_path / "hf"))
    targets = ["q_proj", "v_proj", "down_proj"] if name == "tiny-llama" else ["c_attn", "c_fc"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=True)
    model = peft.get_peft_model(hf, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval().save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 256, (2, 20))
    ours = gptkit.load(str(tmp_path / "base"), adapter=str(tmp_path / "peft"))
    with torch.no_grad():
        theirs, mine, plain = model(ids).logits, ours.model(ids), base(ids)
    assert (mine - plain).abs().max() > 0.05
    assert (mine - theirs).abs().max() <= 1e-4


def test_peft_adapters_that_do_not_fit_are_clear_errors(tmp_path):
    from gptkit.config import ConfigError
    from gptkit.peft_format import merge_peft_lora

    _, tuned = lora_model("tiny-llama", ["attn.qkv"])
    export_peft(tuned, tmp_path / "p")
    other = GPT(preset("tiny-llama", n_layer=1))  # no layer 1
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.[qkv]_proj is no layer"):
        merge_peft_lora(other, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora are not supported"):
        merge_peft_lora(GPT(preset("tiny-llama")), tmp_path / "p")


def test_a_damaged_peft_config_is_one_clear_error(tmp_path):
    from gptkit.config import ConfigError
    from gptkit.peft_format import merge_peft_lora

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ConfigError, match="not a readable PEFT config"):
        merge_peft_lora(GPT(preset("tiny-llama")), tmp_path / "p")
