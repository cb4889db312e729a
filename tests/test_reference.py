"""A reference library's crash fails one test and names the signal and the library
(tests/reference.py), instead of killing the whole pytest run."""

import faulthandler
import os
import signal

import pytest
import torch
from reference import run_in_child


def crash(sig: signal.Signals) -> None:
    """Die of `sig`, quietly: a pytest-xdist worker's fault handler would print a "Fatal
    Python error" dump of this deliberate crash into the run's output."""
    faulthandler.disable()
    os.kill(os.getpid(), sig)


def test_a_crash_in_the_child_is_a_failure_naming_signal_and_library():
    with pytest.raises(pytest.fail.Exception, match=r"^llama\.cpp crashed .* with SIGSEGV$"):
        run_in_child("llama.cpp", lambda: crash(signal.SIGSEGV))
    with pytest.raises(pytest.fail.Exception, match="SIGABRT"):
        run_in_child("transformers", lambda: crash(signal.SIGABRT))


def test_the_child_reports_failures_skips_and_passes():
    def fails():
        assert 1 + 1 == 3, "arithmetic"

    with pytest.raises(pytest.fail.Exception, match="(?s)running llama.cpp.*AssertionError.*arith"):
        run_in_child("llama.cpp", fails)
    with pytest.raises(pytest.skip.Exception, match="no model here"):
        run_in_child("llama.cpp", lambda: pytest.skip("no model here"))
    assert run_in_child("llama.cpp", lambda: None) is None


def test_torch_runs_in_the_child_after_the_parent_used_its_threads():
    """GNU OpenMP's pool does not survive fork: without run_in_child's one-thread setting the
    child's first parallel op waits for ever (a pytest timeout, not a failure)."""
    x = torch.randn(1000, 1000)
    (x @ x).sum()  # the parent's OpenMP pool is up

    def body():
        assert torch.allclose((x @ x).sum(), (x @ x).sum())

    run_in_child("torch", body)


@pytest.mark.reference("llama.cpp")
def test_a_marked_test_runs_in_a_child():
    """Marked tests run in a forked child: its pid is not pytest's."""
    assert os.getpid() != PYTEST_PID


PYTEST_PID = os.getpid()
