"""MetricsLogger (JSONL + TensorBoard, resume after a kill) and plot_run."""

import errno
import json
import math
import os
import sys
import time

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptkit.metrics import MetricsError, MetricsLogger, read_metrics
from gptkit.plot import PlotError, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json(line: str):
    """json.loads that rejects NaN/Infinity, as strict JSON parsers do."""

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def write_run(run_dir, steps, loss=lambda s: 3.0 / s, **kwargs):
    with MetricsLogger(run_dir, **kwargs) as m:
        for s in steps:
            m.log(s, {"train/loss": loss(s), "lr": 1e-3 * s})


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_round_trip_and_non_finite_as_null(tmp_path):
    run = tmp_path / "run"  # does not exist yet: the logger creates it
    before = time.time()
    with MetricsLogger(run, tensorboard=False) as m:
        m.log(1, {"train/loss": 2.5, "lr": 6e-4, "tokens": 4096})
        m.log(2, {"train/loss": float("nan"), "val/ppl": float("inf")})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [strict_json(line) for line in lines]  # valid JSON despite nan and inf
    assert before - 1 <= rows[0]["time"] <= time.time() + 1
    assert {k: v for k, v in rows[0].items() if k != "time"} == {
        "step": 1,
        "train/loss": 2.5,
        "lr": 6e-4,
        "tokens": 4096,
    }
    assert rows[1]["train/loss"] is None and rows[1]["val/ppl"] is None
    assert read_metrics(run) == rows
    assert not (run / "tensorboard").exists()


def test_each_row_is_on_disk_before_close(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=False)
    m.log(7, {"train/loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [7]  # flushed, not buffered
    m.close()


def test_a_full_disk_is_one_clear_error_naming_the_file(tmp_path):
    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    m = MetricsLogger(tmp_path, tensorboard=False)
    m._file = FullDisk()
    with pytest.raises(MetricsError, match=r"metrics\.jsonl \(No space left on device\).*--resume"):
        m.log(1, {"train/loss": 1.0})


def test_reserved_key_is_rejected(tmp_path):
    with (
        MetricsLogger(tmp_path, tensorboard=False) as m,
        pytest.raises(MetricsError, match="'step' is reserved"),
    ):
        m.log(1, {"step": 3.0})


def test_read_metrics_skips_torn_last_line_but_not_damage(tmp_path):
    write_run(tmp_path, [1, 2], tensorboard=False)
    path = tmp_path / "metrics.jsonl"
    intact = path.read_text()
    path.write_text(intact + '{"step": 3, "time": 1.0, "train/lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    # The kill fell just before the newline: the row is whole and kept.
    path.write_text(intact + '{"step": 3, "train/loss": 1.0}')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2 is not a metrics row"):
        read_metrics(tmp_path)
    with pytest.raises(MetricsError, match="does not exist"):
        read_metrics(tmp_path / "nowhere")


def test_resume_drops_rows_after_step_and_torn_line(tmp_path):
    write_run(tmp_path, [1, 2, 3, 4, 5], tensorboard=False)
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 6, "time": 1.0, "train/lo')  # killed mid-write
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        m.resume(3)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        assert path.read_text().endswith("}\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file
        m.log(4, {"train/loss": 9.0})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train/loss"] == 9.0
    assert rows[0]["train/loss"] == 3.0


def test_resume_without_metrics_file_is_fine(tmp_path):
    with MetricsLogger(tmp_path / "run", tensorboard=False) as m:
        m.resume(10)
        m.log(11, {"train/loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [11]


def test_appending_after_a_torn_line_repairs_it(tmp_path):
    write_run(tmp_path, [1], tensorboard=False)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "tr')
    write_run(tmp_path, [2], tensorboard=False)  # no resume(): a plain append
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_scalars_are_written(tmp_path):
    write_run(tmp_path, [1, 2, 3])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    loss = scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([3.0, 1.5, 1.0])
    assert [v for _, v in scalars(tmp_path, "lr")] == pytest.approx([1e-3, 2e-3, 3e-3])


def test_tensorboard_purges_orphaned_events_on_resume(tmp_path, monkeypatch):
    write_run(tmp_path, [1, 2, 3, 4, 5])  # checkpoint at 3, killed after logging 5
    # TensorBoard reads a run's event files in name order, and the name starts with the creation
    # time in seconds; a resumed process starts seconds later, so make this one do too.
    later = time.time() + 60
    monkeypatch.setattr(time, "time", lambda: later)
    with MetricsLogger(tmp_path) as m:
        m.resume(3)
        # The first step logged after resuming is past the orphans, so TensorBoard's own
        # "step went backwards" purge does not fire: only purge_step removes steps 4 and 5.
        m.log(6, {"train/loss": 106.0})
    loss = scalars(tmp_path, "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3, 6]
    assert [v for _, v in loss] == pytest.approx([3.0, 1.5, 1.0, 106.0])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 6]


def test_disabled_logger_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, enabled=False) as m:
        m.resume(3)
        m.log(1, {"train/loss": 1.0})
        m.flush()
    assert not run.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(MetricsError, match="pip install tensorboard") as e:
        MetricsLogger(tmp_path)
    assert "\n" not in str(e.value)
    MetricsLogger(tmp_path, tensorboard=False).close()  # the way out the message offers
    MetricsLogger(tmp_path, enabled=False).close()  # other ranks never import it


def read_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0
    return image


def test_plot_run_writes_a_png(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, tensorboard=False) as m:
        for s in range(1, 21):
            m.log(s, {"train/loss": 4.0 / s, "lr": 1e-3})
            if s % 5 == 0:
                m.log(s, {"val/loss": 5.0 / s, "val/ppl": math.exp(5.0 / s)})
    out = plot_run(run)
    assert out == run / "loss.png"
    with_lr = read_png(out)
    # Without an lr key there is no learning-rate panel, so the figure is shorter.
    run2 = tmp_path / "run2"
    with MetricsLogger(run2, tensorboard=False) as m:
        for s in range(1, 4):
            m.log(s, {"train/loss": 4.0 / s})
    no_lr = read_png(plot_run(run2, tmp_path / "plots" / "b.png"))
    assert no_lr.shape[0] < with_lr.shape[0]
    assert not list(tmp_path.rglob("*.tmp"))


def test_plot_several_runs(tmp_path):
    write_run(tmp_path / "a", [1, 2, 3], tensorboard=False)
    write_run(tmp_path / "b", [1, 2, 3, 4], loss=lambda s: 2.0 / s, tensorboard=False)
    out = plot_run([tmp_path / "a", tmp_path / "b"], tmp_path / "both.png")
    assert out == tmp_path / "both.png"
    read_png(out)
    with pytest.raises(PlotError, match="needs an output file"):
        plot_run([tmp_path / "a", tmp_path / "b"])


def test_plot_errors(tmp_path):
    with pytest.raises(PlotError, match="does not exist"):
        plot_run(tmp_path / "nowhere")
    with pytest.raises(PlotError, match="has no metrics.jsonl"):
        plot_run(tmp_path)
    with MetricsLogger(tmp_path, tensorboard=False) as m:
        m.log(1, {"lr": 1e-3})
        m.log(2, {"train/loss": float("nan")})
    with pytest.raises(PlotError, match="no train/loss or val/loss values"):
        plot_run(tmp_path)
    write_run(tmp_path / "ok", [1], tensorboard=False)
    with pytest.raises(PlotError, match=r"must be a \.png file"):
        plot_run(tmp_path / "ok", tmp_path / "loss.jpg")
    assert not list(tmp_path.rglob("*.png"))
