"""Hostile files: a crafted pickle never runs, with or without --allow-pickle, and a GGUF
whose header lies about sizes, offsets or counts is one GGUFError naming the file.

Every pickle here would create a marker file when unpickled by plain `pickle` (the first test
proves they are live); gptkit must refuse each with a one-line error and no marker.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import corpus_text, prepare_corpus
from safetensors.torch import load_file

import gptkit
from gptkit.checkpoint import CheckpointError, load_train_state
from gptkit.cli import main
from gptkit.config import preset
from gptkit.convert import ConversionError, PickleNotAllowedError, export_hf, load_hf
from gptkit.model import GPT
from gptkit.resources import ResourceError
from gptkit.tokenizer import char_tokenizer
from gptkit.train import train
from gptkit.train_config import load_train_config

TEXT = corpus_text()


# ------------------------------------------------------------------------------ pickles


class Payload:
    """Unpickles as `function(*args)`: the classic pickle exploit."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Three ways a pickle can act on the machine, each creating `marker`."""
    return {
        "os.system": Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": Payload(builtins.open, str(marker), "w"),
    }


KINDS = ["os.system", "builtins.exec", "builtins.open"]
# torch.save's zip container (what pytorch_model.bin is) and a bare pickle stream (what
# torch.load also accepts, the legacy format).
CONTAINERS = ["torch-zip", "bare-pickle"]


def write_payload(path: Path, kind: str, container: str, marker: Path, wrap=None) -> Path:
    """A file whose unpickling would run payload `kind`; `wrap` builds the object around it."""
    payload = payloads(marker)[kind]
    obj = wrap(payload) if wrap else {"transformer.wte.weight": payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "torch-zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))  # torch.load's own protocol
    return path


def gptkit_cli(*args: str, fresh_process: bool = False) -> subprocess.CompletedProcess:
    """The CLI's exit status and output: from cli.main in this process (what `python -m gptkit`
    runs; an uncaught exception fails the test), or from a real process (~3 s of imports)."""
    if fresh_process:
        command = [sys.executable, "-m", "gptkit", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptkit: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_payloads_are_live(tmp_path, kind):
    """Plain pickle runs each payload: the refusals below are refusals of real exploits."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(payloads(marker)[kind])
    pickle.loads(data)  # noqa: S301 - the point of the test
    assert marker.exists()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[Path, GPT]:
    """A tiny GPT-2 Hugging Face directory (safetensors) and the model it holds."""
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=64, block_size=32)).eval()
    directory = export_hf(model, tmp_path_factory.mktemp("hf") / "tiny")
    return directory, model


def hostile_hf_dir(tmp_path: Path, tiny_hf, kind: str, container: str) -> tuple[Path, Path, Path]:
    """(directory, its pytorch_model.bin, marker) for an HF dir whose weights are a payload."""
    directory = tmp_path / "hostile"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_hf[0] / "config.json").read_text())
    marker = tmp_path / "pwned"
    weights = write_payload(directory / "pytorch_model.bin", kind, container, marker)
    return directory, weights, marker


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", KINDS)
def test_crafted_bin_never_runs_in_python(tmp_path, tiny_hf, kind, container):
    directory, weights, marker = hostile_hf_dir(tmp_path, tiny_hf, kind, container)
    # Without the opt-in the file is not even opened.
    with pytest.raises(PickleNotAllowedError, match="--allow-pickle") as refused:
        load_hf(directory)
    assert str(weights) in str(refused.value) and "safetensors" in str(refused.value)
    with pytest.raises(PickleNotAllowedError):
        gptkit.load(directory, device="cpu")
    # With it, torch's weights-only unpickler refuses the payload's global.
    for load in (
        lambda: load_hf(directory, allow_pickle=True),
        lambda: gptkit.load(directory, device="cpu", allow_pickle=True),
    ):
        with pytest.raises(ConversionError, match="refused to unpickle") as err:
            load()
        message = str(err.value)
        assert str(weights) in message and "\n" not in message
        # What was refused is named; torch's advice to retry without weights_only is not.
        assert "it calls for " in message and "weights_only" not in message
    assert not marker.exists()


@pytest.mark.parametrize("allow", [False, True])
def test_crafted_bin_never_runs_from_the_cli(tmp_path, tiny_hf, allow):
    directory, weights, marker = hostile_hf_dir(tmp_path, tiny_hf, "os.system", "torch-zip")
    flag = ["--allow-pickle"] if allow else []
    for command in (
        ["generate", "--model", str(directory), "--prompt", "hi", "--device", "cpu"],
        ["convert", str(directory), str(tmp_path / "out")],
    ):
        # One real process (exit status, stderr), the other command through cli.main.
        result = gptkit_cli(*command, *flag, fresh_process=command[0] == "generate" and allow)
        line = assert_one_line_error(result, str(weights))
        assert ("refused to unpickle" if allow else "--allow-pickle") in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_sharded_index_cannot_point_outside_its_directory(tmp_path, tiny_hf):
    directory = tmp_path / "sharded"
    directory.mkdir()
    (directory / "config.json").write_text((tiny_hf[0] / "config.json").read_text())
    index = {"weight_map": {"lm_head.weight": "../../elsewhere/model.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="names a shard outside its directory"):
        load_hf(directory)


def test_legit_pytorch_bin_loads_only_with_allow_pickle(tmp_path, tiny_hf):
    source, model = tiny_hf
    directory = tmp_path / "legacy"
    directory.mkdir()
    (directory / "config.json").write_text((source / "config.json").read_text())
    torch.save(load_file(source / "model.safetensors"), directory / "pytorch_model.bin")
    with pytest.raises(PickleNotAllowedError):
        load_hf(directory)
    loaded = load_hf(directory, allow_pickle=True)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # The CLI's flag reaches loaders that do not take the argument (the context switch).
    char_tokenizer("abcdefgh").save(directory)
    out = tmp_path / "converted"
    assert_one_line_error(gptkit_cli("convert", str(directory), str(out)), "--allow-pickle")
    result = gptkit_cli("convert", str(directory), str(out), "--allow-pickle")
    assert result.returncode == 0, result.stderr
    stored = load_file(out / "model.safetensors")
    assert torch.equal(stored["tok_emb.weight"], want["tok_emb.weight"])


# ------------------------------------------------------------------------------ train_state

RUN = [
    'model.preset="tiny"',
    "model.block_size=16",
    "batch_size=2",
    "warmup_steps=0",
    "eval_batches=1",
    "threads=1",
    "progress=false",
    "tensorboard=false",
]


def run_settings(data_dir: Path, out: Path, max_steps: int) -> list[str]:
    """KEY=VALUE settings of a tiny pretraining run, as the CLI takes them."""
    paths = [f"data_dir={json.dumps(str(data_dir))}", f"out_dir={json.dumps(str(out))}"]
    return [*paths, *RUN, f"max_steps={max_steps}"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("data"), TEXT)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A one-step run whose checkpoint a resume would read train_state/state.pt from."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(load_train_config(None, run_settings(data_dir, out, max_steps=1)))
    return out


def test_train_state_is_written_without_pickle(finished_run):
    folder = finished_run / "checkpoint" / "train_state"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "state.json", "tensors.safetensors"]
    state = load_train_state(finished_run / "checkpoint")
    assert state["step"] == 1 and state["optimizer"]["state"]  # AdamW moments came back


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_crafted_legacy_train_state_never_runs(tmp_path, data_dir, finished_run, kind):
    """Older gptkit pickled the training state to train_state/state.pt: such a file is read
    only with --allow-pickle, and then weights-only, so a crafted one never runs."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    folder = run / "checkpoint" / "train_state"
    for name in ("state.json", "tensors.safetensors"):
        (folder / name).unlink()
    state = folder / "state.pt"
    marker = tmp_path / "pwned"
    # The payload hides inside a train state of the right shape.
    wrap = lambda p: {"step": 1, "optimizer": p, "rng": []}  # noqa: E731
    write_payload(state, kind, "torch-zip", marker, wrap=wrap)
    settings = run_settings(data_dir, run, max_steps=2)
    with pytest.raises(CheckpointError, match="pickled training state.*--allow-pickle") as err:
        train(load_train_config(None, settings), resume=True)
    assert str(state) in str(err.value) and "\n" not in str(err.value)
    for flag in ([], ["--allow-pickle"]):
        result = gptkit_cli("pretrain", *settings, "--resume", *flag)
        assert_one_line_error(result, str(state))
        if flag:
            assert "refused to unpickle" in result.stderr, result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ metadata, sizes

# What an outside probe got a traceback, a segfault or an 18.5 GB read from; each must now be
# one `gptkit: error:` line and exit status 2.
HUGE = {"block_size": 2**62, "vocab_size": 2**62, "n_embd": 2**40}


def gptkit_bounded(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`gptkit ARGS` in a fresh process that cannot take more than 8 GiB of address space or
    60 s, so that reading /dev/zero whole (what it did before) fails the test, not the machine."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    command = [sys.executable, "-m", "gptkit", *args]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=60, preexec_fn=limit, cwd=cwd
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"gptkit {' '.join(args)} did not finish in 60 s")


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory) -> Path:
    from conftest import char_model

    from gptkit.checkpoint import save_checkpoint

    model, tok = char_model(block_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", model, tok)


def copy_ckpt(char_ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(char_ckpt, tmp_path / "ckpt"))


GENERATE = ["generate", "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu", "--model"]


@pytest.mark.parametrize("key", list(HUGE))
def test_huge_sizes_in_a_checkpoint_config(char_ckpt, tmp_path, key):
    """2**62 rows overflowed torch's storage size inside the memory check itself."""
    ckpt = copy_ckpt(char_ckpt, tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"][key] = HUGE[key]
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert_one_line_error(gptkit_cli(*GENERATE, str(ckpt)), key, str(ckpt))


@pytest.mark.parametrize("key", list(HUGE))
def test_huge_sizes_in_pretrain_settings(data_dir, tmp_path, key):
    settings = run_settings(data_dir, tmp_path / "run", max_steps=1)
    result = gptkit_cli("pretrain", *settings, f"model.{key}={HUGE[key]}", "model.n_head=1")
    assert_one_line_error(result, key)
    assert not (tmp_path / "run").exists()


def test_deeply_nested_metadata_files(char_ckpt, tmp_path, tiny_hf, data_dir):
    """100k levels of `[` made Python's JSON and TOML parsers raise RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    ckpt = copy_ckpt(char_ckpt, tmp_path)
    (ckpt / "config.json").write_text(deep)
    assert_one_line_error(gptkit_cli(*GENERATE, str(ckpt)), str(ckpt / "config.json"), "nests")
    hf = Path(shutil.copytree(tiny_hf[0], tmp_path / "hf"))
    (hf / "config.json").write_text('{"model_type": "gpt2", "x": ' + deep + "}")
    result = gptkit_cli("convert", str(hf), str(tmp_path / "out"))
    assert_one_line_error(result, str(hf / "config.json"), "nests")
    toml = tmp_path / "run.toml"
    toml.write_text(f"data_dir = {json.dumps(str(data_dir))}\nx = {deep}\n")
    assert_one_line_error(gptkit_cli("pretrain", str(toml)), str(toml))
    result = gptkit_cli("pretrain", "data_dir=d", f"model.labels={deep}")
    assert_one_line_error(result, "nests too deep")


def test_metadata_files_that_are_devices_or_huge(char_ckpt, data_dir, tmp_path):
    """config.json, meta.json or a run's TOML symlinked to /dev/zero (read whole: 18.5 GB,
    then the OOM killer), or a 20 GB config.json (sparse: no disk used)."""
    ckpt = copy_ckpt(char_ckpt, tmp_path)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to("/dev/zero")
    result = gptkit_bounded(*GENERATE, str(ckpt))
    assert_one_line_error(result, str(ckpt / "config.json"), "not a regular file")

    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(20 << 30)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(tmp_path / "big.json")
    result = gptkit_bounded(*GENERATE, str(ckpt))
    assert_one_line_error(result, str(ckpt / "config.json"), "more than the")

    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    (data / "meta.json").unlink()
    (data / "meta.json").symlink_to("/dev/zero")
    settings = run_settings(data, tmp_path / "run", max_steps=1)
    assert_one_line_error(gptkit_bounded("pretrain", *settings), str(data / "meta.json"))

    toml = tmp_path / "run.toml"
    toml.symlink_to("/dev/zero")
    assert_one_line_error(gptkit_bounded("pretrain", str(toml)), str(toml), "not a regular")


def test_tokenizer_config_with_wrong_types(char_ckpt, tmp_path):
    ckpt = copy_ckpt(char_ckpt, tmp_path)
    path = ckpt / "tokenizer" / "tokenizer_config.json"
    good = json.loads(path.read_text())
    for key, value in [("chars", 5), ("special_tokens", "abc"), ("eos_token", [1])]:
        path.write_text(json.dumps({**good, key: value}))
        assert_one_line_error(gptkit_cli(*GENERATE, str(ckpt)), str(path), key)


def test_settings_this_machine_cannot_honour(data_dir, tmp_path):
    """threads=100000 segfaulted in libgomp (so: a fresh process); a GPU that is not there."""
    settings = run_settings(data_dir, tmp_path / "run", max_steps=1)
    result = gptkit_bounded("pretrain", *settings, "threads=100000")
    assert_one_line_error(result, "threads=100000", "CPU cores")
    if torch.cuda.device_count() < 100:
        result = gptkit_cli("pretrain", *settings, 'device="cuda:99"')
        assert_one_line_error(result, "cuda:99")
    assert not (tmp_path / "run").exists()


def test_empty_out_dir_is_refused(data_dir, tmp_path, monkeypatch):
    """out_dir="" wrote the run into the current directory."""
    monkeypatch.chdir(tmp_path)
    settings = run_settings(data_dir, tmp_path / "unused", max_steps=1)
    result = gptkit_cli("pretrain", *settings, 'out_dir=""')
    assert_one_line_error(result, "out_dir is empty")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ GGUF

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package")


def tiny_gguf(path: Path) -> Path:
    """A valid one-layer llama GGUF (F32), as llama.cpp's converter lays one out."""
    rng = np.random.default_rng(0)
    C, H, KV, I, V = 32, 4, 2, 64, 260  # noqa: E741 - GGUF's own names
    tokens = ["<s>", "</s>", "<unk>", *(chr(0x100 + i) for i in range(V - 3))]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(C)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges([])
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_eos_token_id(1)
    D = C // H
    shapes = {
        "token_embd.weight": (V, C),
        "output_norm.weight": (C,),
        "blk.0.attn_norm.weight": (C,),
        "blk.0.attn_q.weight": (H * D, C),
        "blk.0.attn_k.weight": (KV * D, C),
        "blk.0.attn_v.weight": (KV * D, C),
        "blk.0.attn_output.weight": (C, H * D),
        "blk.0.ffn_norm.weight": (C,),
        "blk.0.ffn_gate.weight": (I, C),
        "blk.0.ffn_up.weight": (I, C),
        "blk.0.ffn_down.weight": (C, I),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "valid.gguf")


def _field_value_offset(reader, key: str) -> int:
    """Byte offset of a metadata field's value (after its key length, key and type)."""
    field = reader.fields[key]
    return field.offset + 8 + len(key.encode()) + 4


def _tensor_offsets(reader, name: str) -> dict[str, int]:
    """Byte offsets of a tensor info's n_dims, first dim, type and data offset."""
    field = next(t.field for t in reader.tensors if t.name == name)
    n_dims_at = field.offset + 8 + len(name.encode())
    n_dims = int(field.parts[2][0])
    dims_at = n_dims_at + 4
    type_at = dims_at + 8 * n_dims
    return {"n_dims": n_dims_at, "dim0": dims_at, "type": type_at, "offset": type_at + 4}


def patched(source: Path, target: Path, edits: list[tuple[int, str, int]]) -> Path:
    data = bytearray(source.read_bytes())
    for at, fmt, value in edits:
        struct.pack_into("<" + fmt, data, at, value)
    target.write_bytes(bytes(data))
    return target


# name -> (edits made from the valid file's reader, phrase the error must contain)
def hostile_edits(reader) -> dict[str, tuple[list[tuple[int, str, int]], str]]:
    q = _tensor_offsets(reader, "blk.0.attn_q.weight")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first_token_length = tokens.offset + 8 + len(b"tokenizer.ggml.tokens") + 4 + 4 + 8
    return {
        "offset-past-eof": ([(q["offset"], "Q", 1 << 40)], "past the end of the file"),
        # 2**32 * 2**32 elements: 2**64 wraps to 0 in gguf-py's uint64 arithmetic.
        "size-overflow": (
            [(q["dim0"], "Q", 1 << 32), (q["dim0"] + 8, "Q", 1 << 32)],
            "past the end of the file",
        ),
        "absurd-dim": ([(q["dim0"], "Q", 1 << 50)], "past the end of the file"),
        "absurd-n-dims": ([(q["n_dims"], "I", 1 << 31)], "dimensions (at most 4)"),
        "unknown-type": ([(q["type"], "I", 9999)], "type 9999"),
        "huge-key-length": ([(24, "Q", 1 << 62)], "past the end of the file"),
        "huge-string-length": ([(first_token_length, "Q", 1 << 62)], "past the end of the file"),
        "huge-array-length": (
            [(_field_value_offset(reader, "tokenizer.ggml.tokens") + 4, "Q", 1 << 60)],
            "more than the file's bytes",
        ),
        "huge-tensor-count": ([(8, "Q", 1 << 60)], "more than the file could hold"),
    }


HOSTILE = [
    "offset-past-eof",
    "size-overflow",
    "absurd-dim",
    "absurd-n-dims",
    "unknown-type",
    "huge-key-length",
    "huge-string-length",
    "huge-array-length",
    "huge-tensor-count",
]


def test_valid_gguf_loads(valid_gguf):
    """The control: the unpatched file reads, so each failure below is the patch's doing."""
    from gptkit.convert_gguf import read_gguf

    config, tensors, _ = read_gguf(valid_gguf)
    assert config.n_layer == 1 and "blocks.0.attn.qkv.weight" in tensors


@pytest.mark.parametrize("variant", HOSTILE)
def test_hostile_gguf_is_a_clear_error(tmp_path, valid_gguf, variant):
    from gptkit.convert_gguf import load_gguf_tokenizer, read_gguf
    from gptkit.gguf_header import GGUFError

    edits, phrase = hostile_edits(gguf.GGUFReader(valid_gguf))[variant]
    path = patched(valid_gguf, tmp_path / f"{variant}.gguf", edits)
    for read in (read_gguf, load_gguf_tokenizer):
        with pytest.raises(GGUFError) as err:
            read(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and phrase in message, message
        assert "\n" not in message


def test_hostile_gguf_from_the_cli(tmp_path, valid_gguf):
    edits, _ = hostile_edits(gguf.GGUFReader(valid_gguf))["huge-array-length"]
    path = patched(valid_gguf, tmp_path / "evil.gguf", edits)
    result = gptkit_cli("generate", "--model", str(path), "--prompt", "hi", "--device", "cpu")
    assert_one_line_error(result, str(path), "not a readable GGUF file")


def test_gguf_claiming_a_billion_layers_is_refused_before_reading(tmp_path, valid_gguf):
    """Metadata can lie too: block_count=10**9 meets the memory guard, not a hang."""
    from gptkit.convert_gguf import read_gguf

    at = _field_value_offset(gguf.GGUFReader(valid_gguf), "llama.block_count")
    path = patched(valid_gguf, tmp_path / "deep.gguf", [(at, "I", 10**9)])
    with pytest.raises(ResourceError, match="needs ~") as err:
        read_gguf(path)
    assert str(path) in str(err.value)
