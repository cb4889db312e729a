"""The Trainer: config parsing, schedule, kill-and-resume to the bit, crash-safe checkpoints,
DDP/FSDP under torchrun equal to one process, and the CLI's errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import processes
import pytest
import torch
from safetensors.torch import load_file

from gptkit import machine, onednn
from gptkit.checkpoint import load_checkpoint, load_train_state
from gptkit.config import ConfigError
from gptkit.metrics import read_metrics
from gptkit.onednn import OneDNNLinear
from gptkit.prepare import prepare
from gptkit.tokenizer import char_tokenizer
from gptkit.train import Trainer, lr_at, train
from gptkit.train_config import TrainConfig, load_train_config

TEXT = "".join(f"{i % 7} the quick brown fox jumps over the lazy dog; " for i in range(400))
# A tiny model and a short run, one thread so every run takes the same arithmetic path.
TINY = [
    "model.preset=tiny",
    "model.block_size=32",
    "batch_size=4",
    "max_steps=12",
    "warmup_steps=2",
    "eval_every=4",
    "eval_batches=2",
    "checkpoint_every=4",
    "log_every=1",
    "threads=1",
    "progress=false",
    "tensorboard=false",
    "model.dropout=0.1",  # so the resumed run must also restore the RNG
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "input.txt").write_text(TEXT)
    tok = char_tokenizer(TEXT, special_tokens=["<|endoftext|>"])
    prepare([root / "input.txt"], root / "data", tok, val_fraction=0.1, workers=1, progress=False)
    return root / "data"


def gptkit(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, **kwargs
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r]


def test_toml_config_with_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data_dir = "d"\nlr = 1e-3\n[model]\npreset = "tiny"\nn_layer = 3\n')
    config = load_train_config(path, ["lr=3e-4", "model.n_embd=32", "compile=true", "out_dir=x/y"])
    assert (config.lr, config.compile, config.out_dir) == (3e-4, True, "x/y")
    model = config.model_config(vocab_size=77)
    assert (model.n_layer, model.n_embd, model.vocab_size, model.n_head) == (3, 32, 77, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data_dir=d", "learning_rate=1"], "unknown training config key 'learning_rate'"),
        (["data_dir=d", "model.layers=2"], "unknown model config key 'model.layers'"),
        (["data_dir=d", "lr"], "not key=value"),
        (["data_dir=d", "batch_size=0"], "batch_size must be >= 1"),
        (["data_dir=d", "objective=bert"], "objective='bert' is not one of"),
        (["lr=1e-3"], "data_dir is not set"),
        (["data_dir=d", "lr=fast"], "lr must be a float, got 'fast'"),
        (["data_dir=d", "max_steps=1.5"], "max_steps must be an integer, got 1.5"),
        (["data_dir=d", "decay_steps=soon"], "decay_steps must be an integer"),
        (["data_dir=d", "model.n_layer=many"], "a model config value has the wrong type"),
        (["data_dir=d", "model.rope_theta=0"], "rope_theta must be > 0"),
        (["data_dir=d", "cpu_matmul=mkl"], "cpu_matmul='mkl': use auto, onednn or torch"),
        (["data_dir=d", "cpu_matmul=onednn", "compile=true"], "eager training, not compile=true"),
        (["data_dir=d", "cpu_matmul=onednn", "dtype=bfloat16"], "not dtype=bfloat16; drop one"),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides).model_config(vocab_size=10)


def test_schedule_warms_up_then_decays_to_min_lr():
    config = TrainConfig(data_dir="d", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, config) == pytest.approx(1 / 11)
    assert lr_at(9, config) == pytest.approx(10 / 11)
    assert lr_at(10, config) == pytest.approx(1.0)  # the peak, then cosine
    assert lr_at(60, config) == pytest.approx(0.55)  # halfway: the mean of lr and min_lr
    assert lr_at(110, config) == pytest.approx(0.1) and lr_at(500, config) == 0.1


def test_a_run_learns_and_writes_checkpoint_metrics_and_plot(data_dir, tmp_path):
    out = tmp_path / "run"
    config = load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", *TINY])
    config.max_steps, config.tensorboard, config.lr = 40, True, 3e-3
    result = train(config)
    assert result.steps == 40 and result.val_loss < 3.0  # from ~ln(29) = 3.37 untrained
    assert result.tokens_per_s > 0 and 0 < result.mfu < 1.5
    model, tok, meta = load_checkpoint(out / "checkpoint")
    assert meta["train"]["step"] == 40 and tok.vocab_size == model.config.vocab_size
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 41))
    assert [r["step"] for r in rows if "val/loss" in r] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    done = gptkit("plot", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # init_from starts a new run from those weights: its first step already has a low loss
    config.init_from, config.out_dir, config.max_steps = str(out / "checkpoint"), str(out) + "2", 1
    train(config)
    assert losses(Path(config.out_dir))[0][1] < losses(out)[0][1] - 0.3


def test_bfloat16_autocast_trains_on_a_cpu_with_float32_weights(data_dir, tmp_path):
    # dtype=bfloat16 on a CPU: the matmuls in bfloat16 (several times faster with AVX-512-BF16
    # or AMX), the weights, optimizer state and checkpoint in float32, and the run still learns.
    out = tmp_path / "bf16"
    config = load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", *TINY])
    config.max_steps, config.lr, config.dtype = 40, 3e-3, "bfloat16"
    result = train(config)
    assert result.val_loss < 3.0  # from ~ln(29) = 3.37 untrained, as in float32
    assert {w.dtype for w in weights(out).values()} == {torch.float32}


@pytest.mark.skipif(not machine.can_pack(), reason="this torch has no oneDNN linear")
def test_oneDNN_products_train_as_f_linear_does(data_dir, tmp_path, monkeypatch):
    # Where this machine measured oneDNN faster (cpu_matmul=auto), the Trainer multiplies
    # through it; the losses then match a run through F.linear up to float rounding.
    results = {}
    for faster in (True, False):
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda f=faster: f)
        out = tmp_path / f"onednn-{faster}"
        config = load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", *TINY])
        trainer = Trainer(config)
        linears = {type(m) for m in trainer.model.modules() if isinstance(m, torch.nn.Linear)}
        assert linears == ({OneDNNLinear} if faster else {torch.nn.Linear})
        trainer.fit()
        results[faster] = [loss for _, loss in losses(out)]
    assert len(results[True]) == len(results[False]) == 12
    assert results[True] == pytest.approx(results[False], rel=1e-4)
    assert results[True][-1] < results[True][0] - 0.5  # it learned
    # cpu_matmul=torch keeps F.linear whatever was measured; onednn asks for oneDNN
    for choice, kind in (("torch", torch.nn.Linear), ("onednn", OneDNNLinear)):
        out = tmp_path / choice
        overrides = [f"data_dir={data_dir}", f"out_dir={out}", *TINY, f"cpu_matmul={choice}"]
        model = Trainer(load_train_config(None, overrides)).model
        assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {kind}


def test_sigkill_at_any_step_then_resume_is_bit_identical(data_dir, tmp_path):
    args = [f"data_dir={data_dir}", *TINY, "max_steps=40"]  # time to kill it mid-run
    whole = tmp_path / "whole"
    done = gptkit("pretrain", f"out_dir={whole}", *args)
    assert done.returncode == 0, done.stderr
    for kill_after in (6, 9):  # between checkpoints (4, 8, ...): both lose logged steps
        out = tmp_path / f"killed-{kill_after}"
        cmd = [sys.executable, "-m", "gptkit", "pretrain", f"out_dir={out}", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not any(s >= kill_after for s, _ in _safe_losses(out)):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = json.loads((out / "checkpoint" / "config.json").read_text())["train"]["step"]
        assert 4 <= killed_at < 40
        done = gptkit("pretrain", f"out_dir={out}", *args, "--resume")
        assert done.returncode == 0, done.stderr
        a, b = weights(whole), weights(out)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ (killed at {kill_after})"
        assert losses(out) == losses(whole)  # no duplicated or missing steps in the log
        state = [load_train_state(d / "checkpoint") for d in (whole, out)]
        moments = [s["optimizer"]["state"]["tok_emb.weight"]["exp_avg_sq"] for s in state]
        assert torch.equal(*moments)


def _safe_losses(out: Path) -> list[tuple[int, float]]:
    try:
        return losses(out)
    except (OSError, ValueError):
        return []


def test_a_crash_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    import gptkit.checkpoint as checkpoint_module

    out = tmp_path / "run"
    config = load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", *TINY])
    real_save, saves = checkpoint_module.save_file, []

    def save_then_die(tensors, path, *a, **k):
        saves.append(path)
        if len(saves) == 4:  # the second checkpoint (step 8): its train state dies half written
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint_module, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    assert Path(saves[3]).name == "tensors.safetensors"
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["train"]["step"] == 4  # the last whole checkpoint is untouched
    assert not list(tmp_path.glob("run/.checkpoint.tmp-*"))  # the half-written one is gone
    result = train(config, resume=True)
    assert result.steps == 12


def test_cli_refuses_to_clobber_or_to_resume_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [f"data_dir={data_dir}", f"out_dir={out}", *TINY, "max_steps=2"]
    assert (
        gptkit("pretrain", *args, "--resume")
        .stderr.strip()
        .endswith("run without --resume to start a run")
    )
    assert gptkit("pretrain", *args).returncode == 0
    again = gptkit("pretrain", *args)
    assert again.returncode == 2 and "pass --resume to continue it" in again.stderr
    bad = gptkit("pretrain", *args, "lerning_rate=1")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines() == [bad.stderr.strip().splitlines()[0]]
        and "'lerning_rate'" in bad.stderr
    )


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(data_dir, tmp_path, fsdp):
    """Same global batch (grad_accum=2: one micro-batch per rank) -> the same loss curve; only
    rank 0 writes the log and the checkpoint."""
    args = [f"data_dir={data_dir}", *TINY, "grad_accum=2", "max_steps=6", "model.dropout=0.0"]
    args += [f"fsdp={str(fsdp).lower()}", "tensorboard=true"]
    single = gptkit("pretrain", f"out_dir={tmp_path / 'one'}", *args)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = processes.run(
        [*torchrun, "--nproc_per_node=2", "-m", "gptkit", "pretrain"]
        + [f"out_dir={tmp_path / 'two'}", *args],
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one_curve, two_curve = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in two_curve] == list(range(1, 7))  # one line per step: rank 0 only
    assert [s for s, _ in one_curve] == [s for s, _ in two_curve]
    for (_, a), (_, b) in zip(one_curve, two_curve, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.*"))) == 1
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert two.stdout.count("trained to step 6") == 1


def test_torchrun_bad_input_is_one_line_before_joining(tmp_path):
    """Missing data under torchrun: a rank says so in one line before joining the others, so
    none is left joining a group another has left (gloo's traceback), and ends with status 2
    through end_worker; torchrun then stops the job (the other rank may be stopped before it
    prints its own line)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    bad = processes.run(
        [*torchrun, "--nproc_per_node=2", "-m", "gptkit", "pretrain"]
        + [f"out_dir={tmp_path / 'out'}", f"data_dir={tmp_path / 'missing'}", *TINY],
        timeout=600,
    )
    assert bad.returncode != 0
    assert "gptkit: error: " in bad.stderr and "meta.json is missing" in bad.stderr
    assert "Gloo" not in bad.stderr and "exitcode: 2" in bad.stderr, bad.stderr[-2000:]


def test_flops_per_token_counts_matmul_weights_and_spares_frozen_gradients():
    from gptkit.config import preset
    from gptkit.model import GPT
    from gptkit.peft import apply_peft
    from gptkit.train_config import PeftConfig
    from gptkit.train_needs import flops_per_token

    with torch.device("meta"):
        gpt2 = GPT(preset("gpt2"))
    # nanoGPT's estimate_mfu for GPT-2 124M: 6 N (N without position embeddings) + 12 L H Q T
    attention = 12 * 12 * 12 * 64 * 1024
    assert flops_per_token(gpt2) == 6 * (124_439_808 - 1024 * 768) + attention
    model = GPT(preset("tiny"))
    weights = model.num_params() - model.pos_emb.weight.numel()
    apply_peft(model, PeftConfig(method="lora", r=2))  # base frozen: no weight gradients
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = 12 * 2 * 4 * 16 * 128
    assert flops_per_token(model) == 4 * weights + 6 * lora + attention
