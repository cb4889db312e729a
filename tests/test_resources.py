"""Memory guards: a model that cannot fit is refused with one line before anything big is
allocated (gpt3-175b on this machine), a small one passes, and the threshold works both ways."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_text, prepare_corpus

from gptkit import resources
from gptkit.checkpoint import FORMAT
from gptkit.config import PRESETS, preset
from gptkit.convert import gptkit_config_to_hf, load_hf
from gptkit.model import GPT
from gptkit.resources import ResourceError
from gptkit.tokenizer import char_tokenizer
from gptkit.train_config import load_train_config

TEXT = corpus_text()
# What the refusing processes may reach: Python, torch and the data, nothing model-sized
# (gpt3-175b's float32 weights alone are ~700 GB).
SMALL_RSS = 1 << 30


@pytest.mark.parametrize(
    "name", ["tiny", "tiny-llama", "gpt1", "gpt2", "gpt3-125m", "smollm2-135m"]
)
def test_counts_match_a_meta_model(name):
    """count() extrapolates from one and two layers; it must equal the whole model's count."""
    if name not in PRESETS:
        pytest.skip(f"no preset {name}")
    config = preset(name)
    with torch.device("meta"):
        model = GPT(config)
    counts = resources.count(config)
    assert counts.params == model.num_params()
    assert counts.buffers == sum(b.numel() for b in model.buffers())


def test_gpt3_175b_is_refused_for_inference_and_training():
    config = preset("gpt3-175b")
    inference = resources.inference_need(config)
    assert 170e9 * 4 < inference.weights < 180e9 * 4  # ~175 B float32 parameters
    training = resources.training_need(config, batch_size=1)
    assert training.total > 4 * inference.weights  # + gradients and two AdamW moments
    available = resources.available_bytes("cpu")
    assert available is not None and 0 < available < inference.total  # no 700 GB machine here
    with pytest.raises(ResourceError) as err:
        resources.check_inference(config, "gpt3-175b")
    message = str(err.value)
    assert message.startswith("gpt3-175b needs ~") and "for inference in float32" in message
    assert "GB available; use a smaller model" in message and "\n" not in message
    with pytest.raises(ResourceError, match=r"for training in float32 \(weights .* AdamW"):
        resources.check_fits(training, "gpt3-175b")


def test_small_model_passes():
    config = preset("tiny")
    resources.check_inference(config, "tiny")
    resources.check_fits(resources.training_need(config, batch_size=8), "tiny")


@pytest.mark.parametrize("purpose", ["inference", "training"])
def test_threshold_works_both_ways(monkeypatch, purpose):
    config = preset("tiny")
    need = (
        resources.inference_need(config)
        if purpose == "inference"
        else resources.training_need(config, batch_size=4)
    )
    monkeypatch.setattr(resources, "available_bytes", lambda device: need.total)
    resources.check_fits(need, "tiny")  # exactly enough
    with pytest.raises(ResourceError, match=f"for {purpose}"):
        resources.check_fits(need, "tiny", copies=2)  # two processes need twice as much
    monkeypatch.setattr(resources, "available_bytes", lambda device: need.total - 1)
    with pytest.raises(ResourceError, match=f"tiny needs ~.* for {purpose}"):
        resources.check_fits(need, "tiny")
    monkeypatch.setenv(resources.SKIP_ENV, "1")  # the escape hatch the message names
    resources.check_fits(need, "tiny")


def test_available_memory_on_this_machine(monkeypatch):
    available = resources.available_bytes("cpu")
    assert available is not None and available > 0
    assert resources._meminfo_available() > 0
    # The figure is the smaller of the kernel's and the cgroup's. Fixed readings here: the real
    # ones move between two calls while other tests allocate (CI read 1 MB more the second time).
    monkeypatch.setattr(resources, "_meminfo_available", lambda: 8_000)
    monkeypatch.setattr(resources, "_cgroup_headroom", lambda: 5_000)
    assert resources.available_bytes("cpu") == 5_000
    monkeypatch.setattr(resources, "_cgroup_headroom", lambda: None)  # no cgroup limit
    assert resources.available_bytes("cpu") == 8_000
    monkeypatch.undo()
    # With no /proc/meminfo (macOS) the fallback still gives a figure.
    monkeypatch.setattr(resources, "Path", lambda p: Path("/nonexistent") / str(p).lstrip("/"))
    assert resources._meminfo_available() > 0
    assert resources.available_bytes("meta") is None  # no figure: no check


# ------------------------------------------------------------------------------ entry points


def gpt3_checkpoint(directory: Path) -> Path:
    """A checkpoint whose config.json describes gpt3-175b and that has no weights at all:
    the guard must refuse from the config alone."""
    directory.mkdir()
    meta = {"format": FORMAT, "model": preset("gpt3-175b").to_dict(), "tokenizer": None}
    (directory / "config.json").write_text(json.dumps(meta))
    return directory


def gpt3_hf_dir(directory: Path) -> Path:
    config = preset("gpt3-175b", attention="dense")  # the shape, as a GPT-2-style HF config
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(gptkit_config_to_hf(config)))
    return directory


# Runs `gptkit ARGS...` and writes the process's own peak resident memory (VmHWM) to a file.
# Not ru_maxrss from wait4: Linux carries a child's high-water mark across exec, so a child
# forked from a large pytest process would report the parent's size.
MEASURED_CLI = """
import sys
from gptkit.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
with open(sys.argv[1], "w") as out:
    out.write(str(peak))
sys.exit(code)
"""


def run_and_measure(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, int]:
    """(result of `gptkit ARGS...`, the peak resident bytes of that process)."""
    peak_file = tmp_path / "peak.txt"
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_CLI, str(peak_file), *args], capture_output=True, text=True
    )
    return result, int(peak_file.read_text())


def assert_refused(result: subprocess.CompletedProcess, rss: int, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("gptkit: error: ") and "needs ~" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert rss < SMALL_RSS, f"peak RSS {rss / 1e6:.0f} MB"


def test_load_refuses_gpt3_175b_without_allocating(tmp_path):
    import gptkit

    ckpt = gpt3_checkpoint(tmp_path / "ckpt")
    hf = gpt3_hf_dir(tmp_path / "hf")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for path in (ckpt, hf):
        with pytest.raises(ResourceError, match=f"{path} needs ~.* for inference"):
            gptkit.load(path, device="cpu")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < 256 << 20, f"this process's peak grew by {grown / 1e6:.0f} MB"
    with pytest.raises(ResourceError, match="for inference in bfloat16"):
        load_hf(hf, dtype=torch.bfloat16)
    # A fresh process's peak memory shows that nothing big was allocated on the way.
    result, rss = run_and_measure(["generate", "--model", str(ckpt), "--prompt", "hi"], tmp_path)
    assert_refused(result, rss, str(ckpt), "for inference")


def test_a_hub_model_too_big_is_refused_before_its_weights_download(tmp_path, monkeypatch):
    import huggingface_hub

    from gptkit.convert import resolve_hf

    repo = gpt3_hf_dir(tmp_path / "repo")
    asked: list[list[str]] = []

    def snapshot_download(name, allow_patterns):  # the hub, served from a local directory
        asked.append(allow_patterns)
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ResourceError, match="^someone/gpt3-175b needs ~.* for inference"):
        resolve_hf("someone/gpt3-175b")
    assert len(asked) == 1 and not any("safetensors" in p for p in asked[0]), asked


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("data"), TEXT)


def settings(data_dir: Path, out: Path, model: str) -> list[str]:
    return [
        f"data_dir={json.dumps(str(data_dir))}",
        f"out_dir={json.dumps(str(out))}",
        f"model.preset={json.dumps(model)}",
        "batch_size=2",
        "max_steps=1",
        "progress=false",
        "tensorboard=false",
    ]


def test_pretrain_refuses_gpt3_175b_before_allocating(tmp_path, data_dir):
    from gptkit.train import train

    args = settings(data_dir, tmp_path / "run", "gpt3-175b")
    with pytest.raises(ResourceError, match=r"^gpt3-175b needs ~.* for training in float32"):
        train(load_train_config(None, args))
    result, rss = run_and_measure(["pretrain", *args], tmp_path)
    assert_refused(result, rss, "for training", "AdamW moments", "batch_size")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_training_a_loaded_model_counts_what_training_adds(tmp_path, data_dir, monkeypatch):
    """init_from: the weights pass the load check; gradients, moments and activations are
    checked once the model is built (the Trainer's second check), and the weights, in memory
    by then, are not counted against what is left."""
    from gptkit.train import train

    source = tmp_path / "source"
    train(load_train_config(None, settings(data_dir, source, "tiny")))
    model = preset("tiny", vocab_size=char_vocab())
    load_need = resources.inference_need(model).total
    # A batch whose activations alone are more than loading needed.
    batch = load_need // resources.activation_bytes(model, 1, torch.float32) + 1
    training = resources.training_need(model, batch_size=batch, weights_allocated=True)
    assert training.to_allocate == training.total - training.weights > load_need

    def tuned(name: str, batch_size: int):
        return load_train_config(
            None,
            [
                *settings(data_dir, tmp_path / name, "tiny"),
                f"batch_size={batch_size}",
                f"init_from={json.dumps(str(source / 'checkpoint'))}",
            ],
        )

    monkeypatch.setattr(resources, "available_bytes", lambda device: load_need)
    with pytest.raises(ResourceError, match=r"needs ~.* for training in float32 \(gradients"):
        train(tuned("refused", batch))
    # The load sees what loading needs, the Trainer's check exactly what training adds: that
    # is enough, as the loaded weights are not counted twice.
    small = resources.training_need(model, batch_size=2, weights_allocated=True).to_allocate
    left = iter([load_need, small])
    monkeypatch.setattr(resources, "available_bytes", lambda device: next(left))
    assert train(tuned("fits", 2)).steps == 1


def char_vocab() -> int:
    return char_tokenizer(TEXT, special_tokens=["<|endoftext|>"]).vocab_size
