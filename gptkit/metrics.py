"""Training metrics: one JSONL file (the source of truth) plus TensorBoard scalars.

The trainer's rank 0 owns an enabled `MetricsLogger`; every other rank holds a disabled one, so
the training loop calls `log` unconditionally and only one process touches the disk.

    with MetricsLogger(run_dir) as metrics:
        metrics.resume(start_step)  # only when resuming from a checkpoint taken at start_step
        metrics.log(step, {"train/loss": 2.31, "lr": 6e-4, "tokens_per_s": 5.1e4})

`run_dir/metrics.jsonl` holds one JSON object a line: `{"step": 10, "time": 1712345678.123,
"train/loss": 2.31, ...}` (`time` is Unix seconds). Each line is written and flushed on its own,
so a killed run loses at most the line being written; readers drop such a torn last line. JSON
has no NaN or infinity (`json.dumps(nan)` gives `NaN`, which strict parsers reject), so a
non-finite value is written as `null`; TensorBoard gets the value itself (it draws NaN and inf).

A run resumed from a checkpoint at step S may have logged steps after S before it was killed;
those steps are about to be trained again. `resume(S)` drops them from the JSONL (rewriting it
atomically) and opens TensorBoard with `purge_step=S + 1`, which tells TensorBoard to discard
its own orphaned events, so both views show each step once.

TensorBoard events land in `run_dir/tensorboard/`; `tensorboard --logdir runs/` shows every run.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "time")
# SummaryWriter buffers events and writes them every flush_secs (default 120 s). The JSONL is the
# record that survives a kill; 30 s keeps a live TensorBoard reasonably current for little I/O.
TENSORBOARD_FLUSH_SECS = 30


class MetricsError(ValueError):
    """A user-facing metrics problem (damaged metrics.jsonl, TensorBoard not installed)."""


def metrics_path(run_dir: str | Path) -> Path:
    """`run_dir/metrics.jsonl`; a path that already names a .jsonl file is taken as is."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".jsonl" else run_dir / METRICS_FILE


def _parse(path: Path, text: str) -> tuple[list[dict[str, Any]], int]:
    """The rows of a metrics file's text, and the length of its intact prefix.

    Every line but the last ends with a newline, so only the last line can be torn (a killed
    writer stops mid-line). A last line without a newline is kept if it parses as a whole row
    (the kill fell just before the newline) and dropped otherwise. A bad line elsewhere is not a
    torn write but damage, and is reported rather than skipped.
    """
    rows: list[dict[str, Any]] = []
    lines = text.split("\n")  # the last item is "" when the text ends with a newline
    offset = intact = 0
    for number, line in enumerate(lines, 1):
        is_tail = number == len(lines)
        end = offset + len(line) + (0 if is_tail else 1)
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a row")
            except ValueError:
                if is_tail:
                    break  # a torn last line: the writer was killed while writing it
                raise MetricsError(
                    f"{path}:{number} is not a metrics row (a JSON object with an integer "
                    f'"step"); fix or delete that line'
                ) from None
            rows.append(row)
        offset = intact = end
    return rows, intact


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of `run_dir/metrics.jsonl`, in file order, without a torn last line.

    Non-finite values come back as None (see the module docstring). Raises MetricsError when the
    file is missing or damaged.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise MetricsError(f"{path} does not exist; has the run logged anything yet?")
    return _parse(path, path.read_text(encoding="utf-8"))[0]


def _json_value(value: Any) -> float | int | None:
    # float() also accepts 0-dim tensors and numpy scalars; ints stay ints (token counts).
    value = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Appends metric rows to `run_dir/metrics.jsonl` and TensorBoard; a no-op when disabled.

    Nothing is created on disk until the first `log` (or a `resume` that has rows to drop), and
    never when `enabled` is False, so non-zero ranks can hold one and call it freely.
    """

    def __init__(
        self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self._file: IO[str] | None = None
        self._writer: Any = None  # torch.utils.tensorboard.SummaryWriter, opened on first log
        self._purge_step: int | None = None
        self._summary_writer: Any = None
        if self.tensorboard:
            # Fail here, before any training, rather than warn and go on with JSONL only: a
            # warning scrolls past in a long log and the run ends with no curves where the
            # user asked for them. tensorboard is a declared dependency, so its absence means a
            # broken install, and the fix is one command (or opting out).
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise MetricsError(
                    f"TensorBoard logging needs the tensorboard package ({e}); "
                    "run `pip install tensorboard` or turn TensorBoard logging off"
                ) from None
            self._summary_writer = SummaryWriter

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def resume(self, step: int) -> None:
        """Continue a run from a checkpoint taken at `step`: forget everything logged after it.

        Rewrites metrics.jsonl atomically with only the rows whose step is <= `step` (a torn last
        line goes too), and makes TensorBoard purge its events from `step + 1` on. Call it
        before the first `log` of the resumed run.
        """
        if not self.enabled:
            return
        self._close_handles()
        self._purge_step = step + 1
        if not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8")
        rows, intact = _parse(self.path, text)
        kept = [row for row in rows if row["step"] <= step]
        if len(kept) == len(rows) and intact == len(text):
            return  # nothing to drop: leave the file alone
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data on a power cut
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (e.g. {"train/loss": 2.3, "lr": 6e-4}) at `step`: one JSONL row, and
        one TensorBoard scalar per key with the key as its tag."""
        if not self.enabled:
            return
        clash = [key for key in RESERVED_KEYS if key in values]
        if clash:
            raise MetricsError(f"metric name {clash[0]!r} is reserved; pick another name")
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update((key, _json_value(value)) for key, value in values.items())
        # allow_nan=False: a non-finite value that slipped through is a bug, not a silent NaN.
        line = json.dumps(row, allow_nan=False) + "\n"
        f = self._file or self._open_jsonl()
        try:
            f.write(line)
            f.flush()  # to the OS now: a killed process then loses only a line it had not written
        except OSError as e:  # a full disk: the last checkpoint is intact, resume drops torn lines
            raise MetricsError(
                f"cannot write {self.path} ({e.strerror}); free some space, then run again "
                "with --resume"
            ) from None
        if self.tensorboard:
            writer = self._writer or self._open_tensorboard()
            for key, value in values.items():
                writer.add_scalar(key, float(value), int(step))

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the JSONL is flushed on every `log`);
        worth calling when a checkpoint is saved."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the files. Logging again afterwards reopens them (appending)."""
        self._close_handles()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_jsonl(self) -> IO[str]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            # Appending after a torn line would glue the new row onto it and damage both; cut
            # the file back to its intact prefix first (a no-op for a cleanly closed file).
            text = self.path.read_text(encoding="utf-8")
            intact = _parse(self.path, text)[1]
            if intact < len(text):
                with self.path.open("r+b") as f:
                    f.truncate(len(text[:intact].encode("utf-8")))
            elif text and not text.endswith("\n"):
                with self.path.open("a", encoding="utf-8") as f:
                    f.write("\n")  # an intact last row that lost only its newline
        self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def _open_tensorboard(self) -> Any:
        # purge_step makes TensorBoard drop events at or after it that an earlier (killed)
        # process wrote, the TensorBoard half of resume().
        self._writer = self._summary_writer(
            log_dir=str(self.run_dir / TENSORBOARD_DIR),
            purge_step=self._purge_step,
            flush_secs=TENSORBOARD_FLUSH_SECS,
        )
        # Once only: a writer reopened later (after close) must not purge this run's own events.
        self._purge_step = None
        return self._writer

    def _close_handles(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
