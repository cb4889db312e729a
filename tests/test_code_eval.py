"""`gptkit eval code`: pass@k against its closed form, HumanEval's canonical solutions through
the sandbox, and hostile completions that must neither harm the host nor hang the run."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_chat_lm

from gptkit.checkpoint import save_checkpoint
from gptkit.code_eval import (
    INSTRUCTION,
    STOP,
    check,
    code_prompt,
    eval_code,
    pass_at_k,
    program,
    read_problems,
)
from gptkit.config import ConfigError
from gptkit.sandbox import Limits, Sandbox
from gptkit.taskdata import DataError

HUMANEVAL = Path(__file__).parents[1] / "../shared/data/humaneval/HumanEval.jsonl.gz"
FAST = Sandbox(Limits(timeout_s=3.0))
ROOT = os.getuid() == 0


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    if not HUMANEVAL.is_file():
        pytest.skip(f"shared data {HUMANEVAL} is absent (expected beside the repo)")
    return read_problems(HUMANEVAL)


def run(source: str) -> dict:
    return vars(FAST.run(source))


@pytest.mark.parametrize("n, c, k", [(10, 1, 1), (10, 3, 5), (20, 0, 10), (200, 17, 100)])
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_edges():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(10, 1, 10) == 1.0  # every sample is drawn
    assert pass_at_k(5, 0, 1) == 0.0


def test_every_canonical_solution_passes_and_a_wrong_one_fails(problems):
    assert len(problems) == 164
    results = check(problems, [[p["canonical_solution"]] for p in problems], FAST)
    failed = [p["task_id"] for p, r in zip(problems, results, strict=True) if not r[0]["passed"]]
    assert failed == []
    wrong = check(problems[:3], [["    return None\n"]] * 3, FAST)
    assert [r[0]["status"] for r in wrong] == ["failed"] * 3
    assert "AssertionError" in wrong[0][0]["output"]


class Canonical:
    """Stands in for an LM: answers each prompt with its canonical solution (and a wrong one
    for the second sample), so eval_code's bookkeeping is checked against known outcomes."""

    model = SimpleNamespace(context=10_000)  # the positions a prompt may take
    tokenizer = SimpleNamespace(encode=str.split, chat_template=None)  # plain prompts

    def __init__(self, problems):
        self.answers = {p["prompt"]: p["canonical_solution"] for p in problems}

    def generate(self, prompts, num_return_sequences=1, stop=None, **_):
        assert stop == STOP
        if isinstance(prompts, list):  # greedy: a batch of prompts, one answer each
            return [self.answers[p] for p in prompts]
        return [self.answers[prompts], "    return None\n"][:num_return_sequences]


def test_eval_code_scores_known_outcomes(problems, tmp_path):
    path = tmp_path / "five.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems[:5]))
    lm = Canonical(problems)
    scores, records = eval_code(lm, path, n=1, batch_size=2, sandbox=FAST)
    assert scores["pass@1"] == 100.0 and scores["problems"] == 5
    scores, records = eval_code(lm, path, n=2, temperature=0.8, sandbox=FAST)
    assert scores["pass@1"] == pytest.approx(50.0)  # one of two samples passes, everywhere
    assert [r["passed"] for r in records[0]["results"]] == [True, False]
    with pytest.raises(ConfigError, match="greedy decoding gives one answer per problem"):
        eval_code(lm, path, n=10, temperature=0.0)


def test_a_chat_model_is_asked_and_continues_the_prompt_in_a_code_block(problems):
    lm = tiny_chat_lm()
    prompt = code_prompt(lm, problems[0], chat=True)
    asked = INSTRUCTION.format(prompt=problems[0]["prompt"])
    assert prompt.startswith(f"<|im_start|>user\n{asked}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.endswith("<|im_start|>assistant\n```python\n")  # the code comes next
    assert code_prompt(lm, problems[0], chat=False) == problems[0]["prompt"]


def test_a_problems_file_that_is_wrong_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "x", "prompt": "def f():\\n"}\n')
    with pytest.raises(DataError, match="line 1.*: .* missing test, entry_point"):
        read_problems(bad)
    with pytest.raises(DataError, match="no such file"):
        read_problems(tmp_path / "absent.jsonl")


# --- hostile completions ---------------------------------------------------------------------


def test_an_endless_loop_is_stopped_at_the_time_limit():
    start = time.monotonic()
    outcome = run("while True:\n    pass\n")
    assert outcome["status"] == "timed out"
    assert time.monotonic() - start < 3.0 + 5  # the limit, plus killing and cleaning up


def _processes_of(uid: int) -> int:
    """Live processes of this user (zombies, which only wait for init to reap them, hold no
    memory or CPU and are not counted)."""
    return sum(1 for e in Path("/proc").iterdir() if e.name.isdigit() and _alive(e, uid))


def _alive(entry: Path, uid: int) -> bool:
    try:
        state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return entry.stat().st_uid == uid and state not in "ZX"
    except OSError:  # gone meanwhile
        return False


def test_a_fork_bomb_is_bounded_and_nothing_it_started_survives():
    uid = 65534 if ROOT else os.getuid()
    before = _processes_of(uid)
    # ctypes' fork goes around the in-process guard: the kernel limits must hold it
    outcome = run("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n")
    assert not outcome["passed"]
    time.sleep(0.5)
    assert _processes_of(uid) <= before


def test_a_10_gb_allocation_fails_inside_the_child():
    outcome = run("x = bytearray(10 << 30)\n")
    assert outcome["status"] == "failed" and "MemoryError" in outcome["output"]


def test_a_huge_file_is_cut_off_by_the_file_size_limit():
    outcome = run("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n")
    assert not outcome["passed"]


def test_files_outside_its_directory_are_not_deleted(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    outcome = run(f"import os, shutil\nos.remove({str(victim)!r})\n")  # the guard
    assert not outcome["passed"] and victim.read_text() == "precious"
    outcome = run(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n")
    assert not outcome["passed"] and victim.read_text() == "precious"
    if not ROOT:
        pytest.skip(
            "going around the guard (ctypes unlink) is stopped by the drop to nobody, root only"
        )
    outcome = run(
        f"import ctypes\nassert ctypes.CDLL(None).unlink({str(victim).encode()!r}) == 0\n"
    )
    assert not outcome["passed"] and victim.read_text() == "precious"


def test_no_connection_leaves_the_child(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    outcome = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n")  # guard
    assert not outcome["passed"]
    if FAST.isolation["network"] != "namespace":
        pytest.skip("this kernel grants no network namespace: the guard is the only layer")
    # _socket goes around the guard: the empty network namespace must hold it
    outcome = run(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n")
    assert not outcome["passed"] and "unreachable" in outcome["output"]
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_the_environment_and_the_callers_directory_stay_out(monkeypatch):
    monkeypatch.setenv("GPTKIT_TEST_SECRET", "hunter2")
    source = (
        "import os\nassert 'GPTKIT_TEST_SECRET' not in os.environ, dict(os.environ)\n"
        f"assert not os.path.exists('pyproject.toml') and {os.getcwd()!r} != os.environ['HOME']\n"
    )
    assert run(source)["passed"]


def test_the_program_is_prompt_completion_tests_and_check():
    p = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert run(program(p, "    return 1\n"))["passed"]
    assert not run(program(p, "    return 2\n"))["passed"]


def test_cli_eval_code_runs_a_model_on_problems(tmp_path, problems):
    lm = tiny_chat_lm(block_size=2048)  # a random model: its code fails, the run must not
    model = save_checkpoint(tmp_path / "m", lm.model, lm.tokenizer)
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems[:2]))
    args = ["eval", "code", "--model", str(model), "--data", str(path), "--max-new-tokens", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "gptkit", *args, "--out", str(tmp_path / "code.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "code.json").read_text())
    assert saved["pass@1"] == 0.0 and saved["problems"] == 2 and len(saved["samples"]) == 2
    assert saved["samples"][0]["results"][0]["status"] in ("failed", "timed out")
