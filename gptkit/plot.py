"""Loss curves of one or more training runs as a PNG (`gptkit plot`).

Reads each run's `metrics.jsonl` (see metrics.py) and draws train and validation loss against
step (log-scale y, validation points marked), and below it the learning rate when the runs
logged one. Several runs share one figure, one color a run, labelled by run directory name.

The figure is a bare `matplotlib.figure.Figure` on an Agg canvas, never pyplot: pyplot would
pick a GUI backend (or need `matplotlib.use`, which changes global state for whatever process
imported gptkit), while an Agg canvas renders straight to a file and works with no display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from .metrics import METRICS_FILE, read_metrics

TRAIN_LOSS, VAL_LOSS, LR = "train/loss", "val/loss", "lr"
DEFAULT_OUT = "loss.png"


class PlotError(ValueError):
    """A user-facing plotting problem (no such run, no metrics, nothing to draw)."""


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold a finite `key`; null (non-finite) rows are gaps."""
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
    points = [(step, float(value)) for step, value in points if math.isfinite(value)]
    return [step for step, _ in points], [value for _, value in points]


def _load(run_dir: Path) -> list[dict[str, Any]]:
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} does not exist")
    if not (run_dir / METRICS_FILE).is_file():
        raise PlotError(f"{run_dir} has no {METRICS_FILE}; is it a gptkit training run?")
    rows = read_metrics(run_dir)
    if not any(_series(rows, key)[0] for key in (TRAIN_LOSS, VAL_LOSS)):
        raise PlotError(f"{run_dir / METRICS_FILE} has no {TRAIN_LOSS} or {VAL_LOSS} values yet")
    return rows


def plot_run(run_dir: str | Path | Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Draw the loss curves of `run_dir` (or of several run dirs, overlaid) into a PNG.

    `out` defaults to `run_dir/loss.png` for one run; several runs need an explicit `out`.
    Returns the path written. Raises PlotError for a missing run dir, a run without
    metrics.jsonl, or one with no loss values.
    """
    single = isinstance(run_dir, str | Path)
    run_dirs = [Path(run_dir)] if single else [Path(d) for d in run_dir]
    if not run_dirs:
        raise PlotError("no run directories to plot")
    if out is None:
        if len(run_dirs) > 1:
            raise PlotError("plotting several runs needs an output file (out=...)")
        out = run_dirs[0] / DEFAULT_OUT
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise PlotError(f"output {out} must be a .png file")
    runs = [(d, _load(d)) for d in run_dirs]
    with_lr = any(_series(rows, LR)[0] for _, rows in runs)

    fig = Figure(figsize=(8, 6.5 if with_lr else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    if with_lr:
        loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        loss_ax, lr_ax = fig.subplots(), None
    losses: list[float] = []
    for i, (d, rows) in enumerate(runs):
        color = f"C{i % 10}"
        name = d.resolve().name
        prefix = "" if single else f"{name} "
        steps, values = _series(rows, TRAIN_LOSS)
        if steps:
            loss_ax.plot(steps, values, color=color, lw=1, alpha=0.7, label=f"{prefix}train")
            losses += values
        steps, values = _series(rows, VAL_LOSS)
        if steps:
            label = f"{prefix}val (final {values[-1]:.4f})"
            loss_ax.plot(steps, values, color=color, lw=1.5, ls="--", marker="o", ms=4, label=label)
            losses += values
        if lr_ax is not None:
            steps, values = _series(rows, LR)
            lr_ax.plot(steps, values, color=color, lw=1, label=name)
    if min(losses) > 0:  # cross-entropy always is; a custom loss may not be
        loss_ax.set_yscale("log")
        # Plain numbers ("3", "0.5") rather than the default "3 x 10^0" labels.
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        loss_ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    loss_ax.set_ylabel("loss")
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend(fontsize="small")
    if lr_ax is not None:
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        lr_ax.grid(True, alpha=0.3)
    (lr_ax or loss_ax).set_xlabel("step")
    loss_ax.set_title(_title(runs) if single else f"{len(runs)} runs: " + _title(runs))

    # Written beside the target and renamed into place, so a viewer never sees half a PNG.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _title(runs: list[tuple[Path, list[dict[str, Any]]]]) -> str:
    """The run name, with its final validation loss when it has one (a single run), or the run
    names (several; their final losses are in the legend)."""
    if len(runs) > 1:
        return ", ".join(d.resolve().name for d, _ in runs)
    d, rows = runs[0]
    val = _series(rows, VAL_LOSS)[1]
    return d.resolve().name + (f" (final val loss {val[-1]:.4f})" if val else "")
