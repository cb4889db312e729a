"""Checkpoints: round trips, atomic writes that survive a crash, and clear errors on damage."""

import json
import os

import pytest
import torch
from conftest import TEXT
from conftest import char_model as make

from gptkit import atomic_dir, checkpoint
from gptkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gptkit.tokenizer import char_tokenizer


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny", {}),
        ("tiny-llama", {}),
        ("tiny", {"tie_embeddings": False, "positions": "sinusoidal"}),
    ],
)
def test_round_trip_gives_identical_logits_and_tokenizer(tmp_path, name, overrides):
    model, tok = make(name, **overrides)
    save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 7})
    loaded, loaded_tok, meta = load_checkpoint(tmp_path / "ckpt")
    idx = torch.tensor([tok.encode("the lazy dog")])
    assert torch.equal(model(idx), loaded(idx))
    assert loaded_tok.encode(TEXT) == tok.encode(TEXT)
    assert meta["step"] == 7 and meta["model"] == model.config.to_dict()
    assert loaded.lm_head.weight is loaded.tok_emb.weight or not loaded.config.tie_embeddings
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer",
    ]


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 1})
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 2})
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert load_checkpoint(tmp_path / "ckpt")[2]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind


def test_crash_between_the_renames_falls_back_to_the_backup(tmp_path, monkeypatch):
    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 1})
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(f".old-{os.getpid()}"):
            raise KeyboardInterrupt  # the process dies right after moving the old one aside

    monkeypatch.setattr(atomic_dir.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", model, tok, extra={"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / "ckpt").exists()
    assert checkpoint.is_checkpoint(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt")[2]["step"] == 1


def test_truncated_weights_name_the_file(tmp_path):
    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_and_damaged_files_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")
    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")


def test_shape_mismatch_names_the_tensor(tmp_path):
    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["n_embd"] = 128
    config["model"]["head_dim"] = 32
    config["model"]["intermediate_size"] = 512
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"tok_emb.weight has shape \(\d+, 64\), the config needs"
    ):
        load_checkpoint(tmp_path / "ckpt")


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model, _ = make()
    big = char_tokenizer("".join(chr(0x4E00 + i) for i in range(300)))
    save_checkpoint(tmp_path / "ckpt", model, big)
    with pytest.raises(
        CheckpointError, match="tokenizer has 300 token ids but the model's vocabulary"
    ):
        load_checkpoint(tmp_path / "ckpt")


def nan_weights(state: dict, name: str, value: float = float("nan")) -> dict:
    state = dict(state)
    state[name] = state[name].clone()
    state[name].view(-1)[7] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, capsys, value):
    """All-NaN (or one-NaN) weights answered "" greedily, 503 sampled and a traceback from the
    CLI; now every loader refuses them in one line naming the tensor."""
    from safetensors.torch import load_file, save_file

    from gptkit.cli import main

    model, tok = make()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    weights = tmp_path / "ckpt" / "model.safetensors"
    save_file(nan_weights(load_file(weights), "blocks.1.mlp.fc.weight", value), weights)
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc.weight holds NaN or infinite"):
        load_checkpoint(tmp_path / "ckpt")
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "the", "--device", "cpu"]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"gptkit: error: {weights}: tensor blocks.1.mlp.fc.weight"), line


def test_non_finite_hf_and_gguf_weights_are_refused(tmp_path):
    from ggufkit import tiny_weights, write_gguf
    from safetensors.torch import load_file, save_file

    from gptkit.convert import ConversionError, export_hf, load_hf
    from gptkit.convert_gguf import load_gguf

    model, _ = make()
    hf = export_hf(model, tmp_path / "hf")
    state = load_file(hf / "model.safetensors")
    save_file(nan_weights(state, "transformer.h.0.attn.c_attn.weight"), hf / "model.safetensors")
    with pytest.raises(ConversionError, match=f"{hf}: tensor blocks.0.attn.qkv.weight holds"):
        load_hf(hf)

    shape = dict(C=64, I=128)
    tensors = tiny_weights(tied=True, **shape)[0]
    tensors["blk.0.ffn_up.weight"][3, 5] = float("nan")
    path = write_gguf(tmp_path / "nan.gguf", tensors, shape=shape)
    with pytest.raises(ConversionError, match=f"{path}: tensor blocks.0.mlp.fc.weight holds"):
        load_gguf(path)
