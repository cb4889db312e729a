"""Running a command whose hang should say where it hangs.

`run` is `subprocess.run(..., capture_output=True, text=True, timeout=...)` for commands that
start processes of their own (torchrun, the bench scripts). When the command outlives its
timeout, a bare TimeoutExpired says nothing about which process waited on what, and killing the
command leaves its descendants running: torchrun starts each worker in a session of its own.
So on a timeout every process of the tree gets SIGABRT, on which Python's faulthandler (switched
on through PYTHONFAULTHANDLER) prints each thread's stack to the stderr the test captures; then
the tree is killed and the test fails with those stacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

GRACE_S = 20  # for the stacks to be written and the pipes drained after SIGABRT


def _descendants(root: int) -> list[int]:
    """The processes below `root`, deepest first (from /proc: no dependency for a test helper)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()  # "pid (name) state ppid ...", and a name may hold ") "
            pid, ppid = int(text.split(" ", 1)[0]), int(text.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []

    def walk(pid: int) -> None:
        for child in children.get(pid, []):
            walk(child)
            out.append(child)

    walk(root)
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.kill(pid, sig)


def run(
    argv: list[str],
    *,
    timeout: float,
    input: str | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = [*_descendants(proc.pid), proc.pid]
            _signal(tree, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                out, err = "", "(no output within the grace period after SIGABRT)"
            _signal(tree, signal.SIGKILL)
            proc.wait()
            pytest.fail(
                f"{' '.join(argv)} ran past {timeout:.0f} s; the stacks of its processes:\n"
                f"{out[-3000:]}\n{err[-12000:]}"
            )
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
