"""Run untrusted Python (model-written code and its tests) in a child process that can neither
harm the host nor hang the caller.

Layers, outermost first:
- the child is a new session (its own process group), killed as a group when it passes its
  wall-clock limit or finishes, so nothing it started outlives it;
- a fresh temporary directory as its working directory and HOME, removed afterwards; an
  environment of PATH, HOME and LANG only (no inherited secrets), Python's isolated mode (-I);
- resource limits it cannot raise: CPU seconds, address space, file size, open files, no core
  dumps, and a process count (a fork bomb stops at it);
- no network: a new network namespace (only a loopback that is down) where the kernel allows
  one; started as root, it also drops to the user `nobody`, so it can delete or change no file
  it does not own (and the process count limit applies to it);
- inside, before the code runs, the destructive functions of os, shutil and subprocess are
  disabled and sockets cannot be made, as OpenAI's human-eval harness does
  (`reliability_guard`): a guard against accidents, not a wall, which is what the layers above
  are for.

`SANDBOX.isolation` says which of the kernel layers this machine granted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock
    memory_mb: int = 1024  # address space
    processes: int = 32  # beyond the ones the user already runs (a fork bomb stops here)
    file_mb: int = 16  # the largest file it may write


@dataclass
class Outcome:
    passed: bool  # exit status 0 within the limits
    status: str  # "passed", "failed", "timed out"
    output: str  # the end of its stderr (why it failed)


# Run in the child by `python -I -c`, with the limits, the directory and the program's path as
# arguments: limits first, then namespaces and identity, then the guard, then the program.
_CHILD = r"""
import ast, builtins, ctypes, importlib, os, resource, shutil, socket, subprocess, sys, traceback
cpu, memory, processes, file_size, workdir, program, nobody = sys.argv[1:]
source = open(program, encoding="utf-8").read()
root = os.getuid() == 0
if root:
    # The interpreter and its library may be out of nobody's reach (a Python under /root):
    # every module the program names is imported now, while they can still be read.
    try:
        nodes = list(ast.walk(ast.parse(source)))
    except SyntaxError:
        nodes = []
    for node in nodes:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            try:
                importlib.import_module(name)
            except BaseException:
                pass
for limit, value in ((resource.RLIMIT_CPU, int(cpu)), (resource.RLIMIT_AS, int(memory)),
                     (resource.RLIMIT_FSIZE, int(file_size)), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
if root:
    libc.unshare(CLONE_NEWNET)
    os.setgroups([])
    os.setgid(int(nobody))
    os.setuid(int(nobody))
else:
    libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
resource.setrlimit(resource.RLIMIT_NPROC, (int(processes), int(processes)))
os.chdir(workdir)
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
             "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "getcwd", "chdir",
             "execv", "execve", "execvp", "spawnv", "spawnve", "posix_spawn", "setsid",
             "setpgid"):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
socket.socket = socket.create_connection = socket.socketpair = None
builtins.exit = builtins.quit = None
sys.argv = [program]
try:
    exec(compile(source, program, "exec"), {"__name__": "__main__"})
except BaseException:  # an exception, or an exit before the tests finished: no pass
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stderr.flush()
os._exit(0)
"""


def _user_processes() -> int:
    """Processes this user runs now (RLIMIT_NPROC counts them all, not just the child's)."""
    uid = os.getuid()
    count = 0
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # gone meanwhile
            count += entry.name.isdigit() and entry.stat().st_uid == uid
    return count


def _isolation() -> dict[str, str]:
    """Which kernel layers this machine grants, probed once in a throwaway child."""
    probe = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "flags = 0x40000000 if os.getuid() == 0 else 0x50000000\n"
        "print('namespace' if libc.unshare(flags) == 0 else 'guard only')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=30
    )
    network = done.stdout.strip() or "guard only"
    user = "nobody" if os.getuid() == 0 else "the caller's (file deletion: guard only)"
    return {"network": network, "user": user}


class Sandbox:
    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self._isolation: dict[str, str] | None = None

    @property
    def isolation(self) -> dict[str, str]:
        if self._isolation is None:
            self._isolation = _isolation()
        return self._isolation

    def run(self, program: str) -> Outcome:
        """Run `program` (Python source) under the limits; passed when it exits 0 in time."""
        lim = self.limits
        root = os.getuid() == 0
        processes = lim.processes if root else _user_processes() + lim.processes
        with tempfile.TemporaryDirectory(prefix="gptkit-sandbox-") as workdir:
            path = Path(workdir) / "program.py"
            path.write_text(program, encoding="utf-8")
            if root:  # nobody works in it, and may read (not change) the program
                os.chown(workdir, NOBODY, NOBODY)
            args = [
                str(int(lim.timeout_s) + 1),
                str(lim.memory_mb << 20),
                str(processes),
                str(lim.file_mb << 20),
                workdir,
                str(path),
                str(NOBODY),
            ]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
            # stderr goes to a file, where the file-size limit bounds it (a pipe would not)
            with open(Path(workdir) / "stderr", "w+b") as err:
                child = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", _CHILD, *args],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
                try:
                    child.wait(timeout=lim.timeout_s)
                    status = "passed" if child.returncode == 0 else "failed"
                except subprocess.TimeoutExpired:
                    status = "timed out"
                finally:
                    _kill_group(child)
                err.seek(max(0, err.seek(0, os.SEEK_END) - 2000))
                output = err.read().decode("utf-8", "replace")
        return Outcome(status == "passed", status, output)


def _kill_group(child: subprocess.Popen) -> None:
    """Kill the child's whole process group (whatever it started), reap the child, and kill
    again until nothing of the group is left (an orphan is reaped by init, out of the group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    for _ in range(100):
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.01)


SANDBOX = Sandbox()
