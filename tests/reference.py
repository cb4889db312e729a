"""Reference libraries run in a child process, so that their crash costs one test, not the suite.

The parity tests call native code we do not control: llama.cpp segfaulted in its AMX kernel on
an Intel Xeon, and pytest died with it (exit 2, nothing after it ran). A test marked
`@pytest.mark.reference("llama.cpp")` runs its body in a forked child (conftest.py's
pytest_pyfunc_call). Fixtures are still built in the parent, so module-scoped ones are built
once; the child gets them by fork. A child that dies of a signal is a failed test naming the
signal and the library; an exception in the child fails (or skips) the test with the child's
traceback.

GNU OpenMP's thread pool does not survive fork, and llama.cpp uses the libgomp that torch
loaded: in the child, torch runs on one thread (set here) and llama.cpp must be given one
thread (n_threads=1, n_threads_batch=1), or its first parallel region waits for ever.
Playwright's chromium needs none of this: it is a process of its own already.
"""

import os
import pickle
import signal
import traceback
from collections.abc import Callable

import pytest
import torch


def run_in_child(library: str, body: Callable[[], object]) -> None:
    """Run body() in a forked child; fail, skip or return as the child did."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report how body() ended, then leave without running atexit
        os.close(read_end)
        outcome: tuple[str, str] = ("passed", "")
        try:
            # GNU OpenMP's thread pool does not survive fork; torch's ops in the child then use
            # one thread, as DataLoader workers do, instead of hanging on a pool that is gone.
            torch.set_num_threads(1)
            body()
        except pytest.skip.Exception as e:
            outcome = ("skipped", str(e.msg))
        except BaseException:  # noqa: BLE001 - every way out of the body goes to the parent
            outcome = ("failed", traceback.format_exc())
        with os.fdopen(write_end, "wb") as pipe:
            pickle.dump(outcome, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        pytest.fail(f"{library} crashed the test's child process with {name}", pytrace=False)
    if not data:
        pytest.fail(f"the child running {library} exited ({status}) without a result")
    kind, detail = pickle.loads(data)
    if kind == "skipped":
        pytest.skip(detail)
    if kind == "failed":
        pytest.fail(f"in the child process running {library}:\n{detail}", pytrace=False)
