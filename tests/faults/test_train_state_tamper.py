"""A checkpoint's training state changed after it was written: `--resume` refuses it in one line
naming the file, and leaves the run directory (checkpoint and metrics log) as it was.

What an outside probe found resuming silently before train_state/manifest.json: `step` edited
from 4 to 2 (resumed, and dropped the metrics rows of steps 3-4), `step: true` (restarted at
step 1), `step: 1e30` (trained nothing, exit 0), swapped or emptied AdamW moments (NaN loss, no
error), weights of an earlier save beside the latest optimizer state, and `rng: [[5, null]]`
(a traceback). Each is tried as a plain edit (the manifest's sha256 no longer matches) and,
where the fields themselves are wrong, with the manifest recomputed too, as a careful forger
would: then the check of every field's type and range refuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from faultkit import TINY, digest, one_line_error, prepare_data
from safetensors.torch import load_file, save_file

import gptkit.train as train_module
from gptkit.checkpoint import MANIFEST_COVERS, CheckpointError, load_train_state
from gptkit.cli import main
from gptkit.train import train
from gptkit.train_config import load_train_config


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """Measuring the CPU's peak FLOP/s is not under test here."""
    monkeypatch.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)


def settings(data: Path, out: Path, max_steps: int) -> list[str]:
    return [f"data_dir={data}", f"out_dir={out}", *TINY, f"max_steps={max_steps}", "eval_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run checkpointed at step 4, and a copy of its checkpoint from step 2."""
    root = tmp_path_factory.mktemp("tamper")
    data = prepare_data(root)
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "measure_peak_flops", lambda *a, **k: 1e11)
        train(load_train_config(None, settings(data, out, 2)))
        shutil.copytree(out / "checkpoint", root / "step2")
        train(load_train_config(None, settings(data, out, 4)), resume=True)
    return {"data": data, "run": out, "step2": root / "step2"}


def edit_state(checkpoint: Path, change) -> None:
    path = checkpoint / "train_state" / "state.json"
    meta = json.loads(path.read_text())
    change(meta["state"])
    path.write_text(json.dumps(meta))


def set_step(value):
    return lambda c: edit_state(c, lambda s: s.__setitem__("step", value))


def swap_moments(checkpoint: Path) -> None:
    path = checkpoint / "train_state" / "tensors.safetensors"
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(".exp_avg")]:
        tensors[name], tensors[name + "_sq"] = tensors[name + "_sq"], tensors[name]
    save_file(tensors, path)


def empty_moments(checkpoint: Path) -> None:
    edit_state(checkpoint, lambda s: s["optimizer"].__setitem__("state", {}))


def rng_5_null(checkpoint: Path) -> None:
    edit_state(checkpoint, lambda s: s.__setitem__("rng", [[5, None]]))


def edit_config_step(checkpoint: Path) -> None:
    path = checkpoint / "config.json"
    meta = json.loads(path.read_text())
    meta["train"]["step"] = 2
    path.write_text(json.dumps(meta))


def rehash(checkpoint: Path) -> None:
    """What a forger who knows the format does after an edit: a manifest that matches."""
    digests = {
        name: hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
        for name in MANIFEST_COVERS
    }
    manifest = checkpoint / "train_state" / "manifest.json"
    manifest.write_text(json.dumps({"format": 1, "sha256": digests}))


# case -> (edit, phrase of the refusal after a plain edit, phrase with the manifest recomputed
# or None where only the hash can tell: valid fields that belong to another save)
CASES = {
    "step-4-to-2": (set_step(2), "does not match the sha256", "outside [0, 2]"),
    "step-true": (set_step(True), "does not match the sha256", "step must be an integer"),
    "step-1e30": (set_step(1e30), "does not match the sha256", "step must be an integer"),
    "step-negative": (set_step(-1), "does not match the sha256", "step must be an integer"),
    "moments-swapped": (swap_moments, "does not match the sha256", "is negative"),
    "moments-emptied": (empty_moments, "does not match the sha256", "no AdamW moments"),
    "rng-5-null": (rng_5_null, "does not match the sha256", "rng[0][0] must be"),
    "config-step": (edit_config_step, "config.json does not match", "records step 2"),
    "manifest-removed": (
        lambda c: (c / "train_state" / "manifest.json").unlink(),
        "manifest.json is missing",
        None,
    ),
}
PARAMS = [(case, False) for case in CASES] + [
    (case, True) for case, (_, _, forged) in CASES.items() if forged
]


@pytest.mark.parametrize(
    "case, forged", PARAMS, ids=[f"{c}{'-rehashed' if f else ''}" for c, f in PARAMS]
)
def test_tampered_training_state_is_refused(runs, tmp_path, capsys, case, forged):
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    checkpoint = run / "checkpoint"
    edit, phrase, forged_phrase = CASES[case]
    edit(checkpoint)
    if forged:
        rehash(checkpoint)
    before = digest(run)

    with pytest.raises(CheckpointError) as refused:
        load_train_state(checkpoint)
    message = str(refused.value)
    assert "\n" not in message and str(checkpoint) in message, message
    assert (forged_phrase if forged else phrase) in message, message

    capsys.readouterr()
    status = main(["pretrain", *settings(runs["data"], run, 6), "--resume"])
    line = one_line_error(status, capsys.readouterr().err)
    assert (forged_phrase if forged else phrase) in line, line
    assert digest(run) == before  # no metrics row dropped, nothing written


def test_weights_of_an_earlier_save_are_refused(runs, tmp_path, capsys):
    """Step-2 weights beside step-4 optimizer state: valid fields, so only the manifest (which
    holds the weights' sha256) can tell."""
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    weights = run / "checkpoint" / "model.safetensors"
    shutil.copy(runs["step2"] / "model.safetensors", weights)
    before = digest(run)
    capsys.readouterr()
    status = main(["pretrain", *settings(runs["data"], run, 6), "--resume"])
    line = one_line_error(status, capsys.readouterr().err)
    assert f"{weights} does not match the sha256" in line, line
    assert digest(run) == before


def test_untouched_state_resumes(runs, tmp_path):
    """The control: the same copy, unedited, resumes to the end (so each refusal above is the
    edit's doing)."""
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    state = load_train_state(run / "checkpoint")
    assert state["step"] == 4 and state["optimizer"]["state"]
    result = train(load_train_config(None, settings(runs["data"], run, 6)), resume=True)
    assert result.steps == 6
