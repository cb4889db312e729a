"""tensorfile.read_safetensors: the same tensors as safetensors' load_file, each owning its
memory, and the same errors for a damaged file."""

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptkit.tensorfile import read_safetensors


def test_same_tensors_as_load_file_in_every_dtype(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(7),
        "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors")
    want = load_file(tmp_path / "t.safetensors")
    assert got.keys() == want.keys() == tensors.keys()
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
    # Each tensor owns its storage (no shared mapping keeps the file resident).
    pointers = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(pointers) == sum(1 for t in got.values() if t.numel())


def test_a_truncated_file_is_a_safetensors_error(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorError):
        read_safetensors(tmp_path / "t.safetensors")


def test_a_dtype_gptkit_cannot_read_is_a_safetensors_error(tmp_path, monkeypatch):
    import gptkit.tensorfile as tensorfile

    save_file({"w": torch.randn(4)}, tmp_path / "t.safetensors")
    monkeypatch.delitem(tensorfile._DTYPES, "F32")  # as if the file held a newer dtype
    with pytest.raises(SafetensorError, match="tensor w has dtype F32"):
        read_safetensors(tmp_path / "t.safetensors")
