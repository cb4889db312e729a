"""A chain of real SIGKILLs of `gptkit pretrain`, at seeded-random steps and inside every stage
of a checkpoint write, each followed by `--resume`: the final weights, optimizer moments and
metrics log equal those of a run that was never interrupted, bit for bit (CPU, one thread).

tests/test_train.py kills from outside between checkpoints; this chain also kills while the
weights or the optimizer state are half written, after the files are fsynced but before the
rename, between the two renames (only the backup is left), and while a metrics line is half
written; and it checks that the killed saves leave nothing behind on disk.
"""

import random
import signal

import pytest
import torch
from faultkit import (
    TINY,
    assert_same_tensors,
    checkpoint_step,
    gptkit,
    leftovers,
    metric_rows,
    prepare_data,
    start_gptkit,
    weights,
)

from gptkit.checkpoint import load_train_state

SEED = 20261201  # the kill points below are drawn from this; change it to explore others
MAX_STEPS, EVERY = 40, 3
ARGS = [*TINY, f"max_steps={MAX_STEPS}", f"checkpoint_every={EVERY}", "eval_every=6"]
# The order of fault kinds; steps and save numbers are drawn at random. "step"/"log" kill
# between checkpoints; the others kill inside a save (see fault_run.py).
CHAIN = ["step", "train_state", "log", "weights", "step", "fsync", "swap", "step", "weights"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("kill"))


def plan(rng: random.Random) -> list[tuple[str, int, int]]:
    """(fault kind, its argument, the checkpoint step it must leave) for each kill in CHAIN."""
    steps, at = [], 0  # `at`: the step of the checkpoint the next run resumes from
    for kind in CHAIN:
        if kind in ("step", "log"):  # a step past the next save, so the run makes progress
            arg = at + rng.randint(EVERY + 1, 2 * EVERY)
            at = max(at, (arg - 1) // EVERY * EVERY)  # saves up to step arg - 1 completed
        else:  # the arg-th save of this process dies; the one before it completed
            arg = rng.randint(1, 2)
            at += (arg - 1) * EVERY
        steps.append((kind, arg, at))
    assert at + EVERY < MAX_STEPS  # the chain ends before the run would
    return steps


def test_a_chain_of_sigkills_then_resume_is_bit_identical(data_dir, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted reference runs alongside the chain (two cores).
    reference = start_gptkit("pretrain", f"data_dir={data_dir}", f"out_dir={whole}", *ARGS)
    kills = plan(random.Random(SEED))
    for i, (kind, arg, expected) in enumerate(kills):
        resume = ["--resume"] if i else []  # the first kind is "step": nothing to resume yet
        run = ["pretrain", f"data_dir={data_dir}", f"out_dir={out}", *ARGS, *resume]
        done = gptkit(*run, fault=f"{kind}:{arg}")
        what = f"kill {i + 1} ({kind}:{arg})"
        assert done.returncode == -signal.SIGKILL, f"{what} did not kill: {done.stderr[-1500:]}"
        assert checkpoint_step(out / "checkpoint") == expected, what
        if kind in ("weights", "train_state", "fsync"):  # killed with the new save in a tmp dir
            assert any(n.startswith(".checkpoint.tmp-") for n in leftovers(out)), what
            assert (out / "checkpoint").is_dir(), what
        if kind == "swap":  # killed between the renames: only the backup holds the checkpoint
            assert not (out / "checkpoint").exists(), what
            assert any(n.startswith(".checkpoint.old-") for n in leftovers(out)), what

    done = gptkit("pretrain", f"data_dir={data_dir}", f"out_dir={out}", *ARGS, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"trained to step {MAX_STEPS}" in done.stdout
    stdout, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-2000:]

    # Bit for bit: weights, AdamW moments and step, and every logged value.
    assert_same_tensors(weights(whole / "checkpoint"), weights(out / "checkpoint"), "weights")
    states = [load_train_state(d / "checkpoint") for d in (whole, out)]
    assert states[0]["step"] == states[1]["step"] == MAX_STEPS
    for name, moments in states[0]["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[key], states[1]["optimizer"]["state"][name][key]), name
    rows = metric_rows(out)
    assert rows == metric_rows(whole)  # no step lost, none logged twice, same losses
    train_steps = [step for step, key, _ in rows if key == "train/loss"]
    assert train_steps == list(range(1, MAX_STEPS + 1))
    # Every killed save's temporary directory and backup is gone once a save succeeds.
    assert leftovers(out) == []
