"""Directories replaced whole: write the next version beside the old one, then swap it in.

A checkpoint and a retrieval index are written this way, so a crash mid-write never leaves a
half directory where a whole one was, and what a killed write leaves behind is cleaned up by
the next write that succeeds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _remove_stale(directory: Path) -> None:
    """Delete what earlier, killed saves of `directory` left beside it: temporary directories
    of dead processes and backups from between the two renames. Each is a whole copy of the
    weights, so a run killed during saves would otherwise fill the disk, and an old backup
    must not be mistaken for the latest checkpoint after a later crash."""
    for path in directory.parent.glob(f".{directory.name}.old-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_dir(directory: Path) -> Path:
    """An empty hidden directory beside `directory` to write its next version into."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_in(tmp: Path, directory: Path) -> None:
    """Make `tmp` (from staging_dir, written and flushed with fsync_tree) the new `directory`,
    atomically as far as readers go: between the two renames only the backup exists, and
    resolve_directory falls back to it, so there is no moment without a whole copy (a
    checkpoint, an index)."""
    backup = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, backup)
    os.replace(tmp, directory)
    shutil.rmtree(backup, ignore_errors=True)
    _remove_stale(directory)


def resolve_directory(directory: Path) -> Path | None:
    """`directory`, or the backup that a crash between swap_in's renames left; None if
    neither is there. swap_in removes stale backups after each success, so there is normally
    one; if not, the newest."""
    if directory.is_dir():
        return directory
    backups = sorted(
        directory.parent.glob(f".{directory.name}.old-*"), key=lambda p: p.stat().st_mtime
    )
    return backups[-1] if backups else None
