"""Checkpoints: round trips, atomic writes that survive a crash, and clear errors on damage."""

import json
import os

import pytest
import torch
from conftest import TEXT
from conftest import char_model as make

from gptkit import checkpoint
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

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_die)
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
