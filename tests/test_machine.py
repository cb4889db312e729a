"""Machine facts: CPU flags, the per-machine cache, the matmul peak behind MFU (never above
100%), and the CPU decode plan (every candidate computes what F.linear computes)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import corpus_text, prepare_corpus

from gptkit import cpu_plan, machine
from gptkit.cpu_plan import CANDIDATES, DecodePlan, plan_linear
from gptkit.metrics import read_metrics
from gptkit.train import train
from gptkit.train_config import load_train_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test measures into a cache of its own, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    return tmp_path / "cache"


def test_cpu_facts_match_proc_cpuinfo():
    cpu = machine.cpu()
    assert cpu.model and cpu.cores >= 1 and cpu.threads == torch.get_num_threads()
    assert set(cpu.flags) <= set(machine.SIMD_FLAGS.values())
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    flags = set(flags.split(":", 1)[1].split())
    assert ("AVX2" in cpu.flags) == ("avx2" in flags)
    assert ("AVX-512" in cpu.flags) == ("avx512f" in flags)
    assert ("AMX" in cpu.flags) == ("amx_tile" in flags)
    assert cpu.simd in ("AMX", "AVX-512", "AVX2", "baseline")
    assert cpu.model.split()[0] in cpu.describe()


def test_cache_dir_is_per_machine_and_torch_version_under_xdg(cache_home, monkeypatch):
    here = machine.cache_dir()
    assert here.is_relative_to(cache_home / "gptkit" / "machine")
    assert here.name == f"torch-{torch.__version__}"
    other = machine.CPU("Other CPU 9000", ("AVX2",), 64, 2, 0)
    monkeypatch.setattr(machine, "cpu", lambda: other)
    assert machine.cache_dir().parent != here.parent
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert machine.cache_dir().is_relative_to(Path.home() / ".cache")


def test_peak_is_measured_once_then_read_and_only_ever_raised(monkeypatch):
    runs = []
    real = machine.measure_matmul_flops

    def counted(device, dtype=torch.float32):
        runs.append(dtype)
        return real(device, dtype, runs=2)

    monkeypatch.setattr(machine, "measure_matmul_flops", counted)
    monkeypatch.setattr(machine, "busy", lambda: False)
    peak = machine.peak_flops(CPU)
    assert peak > 0 and len(runs) == 3  # the best of three measurements
    assert machine.peak_flops(CPU) == peak and len(runs) == 3  # then cached
    assert machine.raise_peak(CPU, torch.float32, peak / 2) == peak  # never lowered
    assert machine.raise_peak(CPU, torch.float32, 3 * peak) == 3 * peak
    assert machine.peak_flops(CPU) == 3 * peak and len(runs) == 3


def test_the_cpu_fp32_peak_times_the_packed_product_too(monkeypatch):
    """Prompts multiply through oneDNN's packed weights, which can outrun `a @ b` (MKL) by 2x
    on an AMD EPYC: the fp32 peak must time that product too, or prompt processing would
    read as more than 100% of it."""
    if not machine.can_pack():
        pytest.skip("this torch has no oneDNN packed linear")
    packed = []
    real = machine.pack
    monkeypatch.setattr(machine, "pack", lambda w: packed.append(w.shape) or real(w))
    assert machine.measure_matmul_flops(CPU, runs=1) > 0
    assert packed == [(1024, 1024)]
    assert machine.measure_matmul_flops(CPU, torch.bfloat16, runs=1) > 0
    assert packed == [(1024, 1024)]  # bfloat16 is timed as a @ b alone


def test_a_peak_measured_busy_or_a_damaged_cache_is_measured_again(monkeypatch):
    monkeypatch.setattr(machine, "measure_matmul_flops", lambda d, t=torch.float32: 5e10)
    monkeypatch.setattr(machine, "busy", lambda: True)
    assert machine.peak_flops(CPU) == 5e10
    path = machine.cache_dir() / machine._device_key(CPU, torch.float32)
    assert json.loads(path.read_text())["busy"] is True
    monkeypatch.setattr(machine, "measure_matmul_flops", lambda d, t=torch.float32: 9e10)
    assert machine.peak_flops(CPU) == 5e10  # still busy: the cached value stands
    monkeypatch.setattr(machine, "busy", lambda: False)
    assert machine.peak_flops(CPU) == 9e10  # quiet now: measured again, and kept
    path.write_text("{not json")
    monkeypatch.setattr(machine, "measure_matmul_flops", lambda d, t=torch.float32: 7e10)
    assert machine.peak_flops(CPU) == 7e10


@pytest.mark.parametrize("plan", CANDIDATES, ids=lambda p: p.name)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_decode_plan_computes_what_f_linear_computes(plan, threads):
    """Numerically equivalent across layouts, splits, row counts (split and not), shapes
    that do and do not divide by the split, with and without a bias."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        for n, k in ((96, 64), (60, 48), (50, 35)):
            weight = cpu_plan.lay_out(torch.randn(n, k, generator=gen), plan)
            assert weight.t().is_contiguous() == plan.column_major
            bias = torch.randn(n, generator=gen)
            for shape in ((1, 1, k), (2, 1, k), (3, k), (1, 9, k), (2, 20, k)):
                x = torch.randn(*shape, generator=gen)
                for b in (None, bias):
                    want = F.linear(x, weight.contiguous(), b)
                    got = plan_linear(x, weight, b, plan)
                    assert got.shape == want.shape
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not machine.can_pack(), reason="this torch has no oneDNN packed linear")
@pytest.mark.parametrize("split", [0, 2])
def test_a_packed_copy_computes_what_f_linear_computes_from_its_row_count_on(split):
    """From packed_from rows on the packed copy multiplies; below it the split plan does."""
    plan = DecodePlan(False, split, 8, weight_first=True, packed_from=3)
    gen = torch.Generator().manual_seed(0)
    for n, k in ((96, 64), (50, 35)):
        weight = torch.randn(n, k, generator=gen)
        packed = machine.pack(weight)
        bias = torch.randn(n, generator=gen)
        for shape in ((1, 1, k), (2, k), (3, k), (1, 4, k), (2, 20, k)):
            x = torch.randn(*shape, generator=gen)
            for b in (None, bias):
                got = plan_linear(x, weight, b, plan, packed)
                torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    # the packed copy is what the rows from packed_from on are multiplied by
    wrong = machine.pack(torch.zeros(50, 35))
    assert plan_linear(torch.ones(2, 35), weight, None, plan, wrong).abs().sum() > 0
    assert plan_linear(torch.ones(3, 35), weight, None, plan, wrong).abs().sum() == 0


def test_busy_counts_what_other_work_does_on_our_cores_now(tmp_path, monkeypatch):
    """Busy = other work held more than a quarter of this process's cores while it looked;
    cores it may not run on do not count."""
    monkeypatch.setattr(machine, "_own_cores", lambda: {0, 1})

    def stat(cpu0, cpu1, cpu7):  # (busy, idle) ticks per core; cpu7 is not ours
        lines = ["cpu  999 0 0 999 0 0 0 0 0 0"]  # the all-core line is never read
        for n, (b, i) in ((0, cpu0), (1, cpu1), (7, cpu7)):
            lines.append(f"cpu{n} {b - 5} 0 5 {i - 3} 3 0 0 0 0 0")  # user+system, idle+iowait
        return "\n".join(lines) + "\nintr 1 2 3\n"

    real = machine._core_ticks
    snapshots = iter([])
    monkeypatch.setattr(machine, "_core_ticks", lambda: real(str(next(snapshots))))

    def looks(first, then):
        nonlocal snapshots
        a, b = tmp_path / "a", tmp_path / "b"
        a.write_text(stat(*first)), b.write_text(stat(*then))
        snapshots = iter([a, b])
        return machine.busy(look_s=0)

    # one core of two fully busy: busy; a tenth of one: quiet; another core's load: not ours
    assert looks(((100, 100), (100, 100), (0, 0)), ((200, 100), (100, 200), (0, 0)))
    assert not looks(((100, 100), (100, 100), (0, 0)), ((110, 190), (100, 200), (0, 0)))
    assert not looks(((100, 100), (100, 100), (0, 0)), ((100, 200), (100, 200), (900, 0)))
    monkeypatch.setattr(machine, "_core_ticks", lambda: None)  # no /proc/stat: load average
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert not machine.busy(look_s=0)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert machine.busy(look_s=0)


@pytest.mark.parametrize("plan", [*CANDIDATES, cpu_plan.PACKED], ids=lambda p: p.name)
def test_gemv_sampler_streams_the_block_matrices_as_the_plan_does(plan, monkeypatch):
    if plan is cpu_plan.PACKED and not machine.can_pack():
        pytest.skip("this torch has no oneDNN packed linear")
    calls = []
    real = cpu_plan.plan_linear
    monkeypatch.setattr(cpu_plan, "plan_linear", lambda *a: calls.append(a) or real(*a))
    sample = cpu_plan.gemv_sampler(plan, d_model=128)
    rate = sample()
    assert 0 < rate < float("inf")
    matrices = cpu_plan.block_matrices(128)
    assert len(calls) == 4 * len(matrices)  # a warm-up pass, then the best of 3
    x, w, bias, used, packed = calls[-1]
    assert used is plan and x.shape[0] == 1 and bias is None
    assert (packed is w) == (plan is cpu_plan.PACKED)


def test_decode_tuning_picks_a_candidate_and_caches_it(monkeypatch):
    measured = []
    real = cpu_plan.measure_decode

    def small(d_model=768, rounds=5):
        measured.append(1)
        return real(d_model=128, rounds=1)  # the same code, fewer and smaller timings

    monkeypatch.setattr(cpu_plan, "measure_decode", small)
    monkeypatch.setattr(machine, "busy", lambda: False)
    tuning = cpu_plan.decode_tuning()
    plan = tuning.plan
    assert DecodePlan(plan.column_major, plan.splits_per_thread) in CANDIDATES
    assert plan.max_split_rows in (1, *cpu_plan.SPLIT_ROWS)
    assert plan.packed_from in (0, *cpu_plan.PACKED_ROWS)
    assert tuning.gemv_bytes_per_s == max(tuning.candidates.values()) > 0
    assert set(tuning.candidates) == {p.name for p in CANDIDATES}
    monkeypatch.setattr(cpu_plan, "_tunings", {})  # a new process reads the file
    assert cpu_plan.decode_plan() == plan and cpu_plan.gemv_bandwidth() == tuning.gemv_bytes_per_s
    assert len(measured) == 1
    path = machine.cache_dir() / f"decode-t{torch.get_num_threads()}.json"
    data = json.loads(path.read_text())
    data["busy"] = True  # as if measured while other work held the cores
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    cpu_plan.decode_plan()
    assert len(measured) == 2  # quiet now: measured again
    path.write_text('{"plan": {"column_major": "sideways"}}')
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    cpu_plan.decode_plan()
    assert len(measured) == 3  # a damaged file is measured again, not an error
    data["busy"] = False
    del data["candidates"][CANDIDATES[-1].name]  # written before that candidate existed
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    cpu_plan.decode_plan()
    assert len(measured) == 4  # a plan chosen without today's candidates is measured again
    data["candidates"][CANDIDATES[-1].name] = 1e9
    data["split_rows"] = [2, 4, 8, 16, 32]  # split rows searched without 3, 5 and 6
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    cpu_plan.decode_plan()
    assert len(measured) == 5
    data["split_rows"] = list(cpu_plan.SPLIT_ROWS)
    del data["plan"]["packed_from"]  # chosen before the packed copy was tried
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_plan, "_tunings", {})
    cpu_plan.decode_plan()
    assert len(measured) == 6


def test_mfu_never_shows_above_100_percent_and_raises_the_peak(tmp_path, monkeypatch):
    """A peak cached far too low (as a busy machine measures it) would make every step look
    faster than the hardware; the run must show at most 100% and raise the cached peak."""
    data = prepare_corpus(tmp_path, corpus_text(400))
    key = machine.cache_dir() / machine._device_key(CPU, torch.float32)
    key.parent.mkdir(parents=True)
    key.write_text(json.dumps({"flops": 1e3, "busy": False}))
    monkeypatch.setattr(machine, "busy", lambda: False)
    config = load_train_config(
        None,
        [
            f"data_dir={data}",
            f"out_dir={tmp_path / 'run'}",
            "model.preset=tiny",
            "model.block_size=32",
            "batch_size=4",
            "max_steps=6",
            "eval_batches=1",
            "log_every=1",
            "progress=false",
            "tensorboard=false",
        ],
    )
    result = train(config)
    mfus = [r["mfu"] for r in read_metrics(tmp_path / "run") if "mfu" in r]
    assert len(mfus) == 6 and all(0 < m <= 1 for m in mfus)
    assert 0 < result.mfu <= 1
    raised = json.loads(key.read_text())
    assert raised["flops"] > 1e6 and raised["source"] == "a training step"


def test_training_flops_count_attention_at_the_batch_length_not_the_context():
    """A fine-tuning batch of 40 tokens on an 8192-context model does not attend over 8192
    positions; counting them made MFU 4x too high for SmolLM2 classify runs."""
    from gptkit.config import preset
    from gptkit.model import GPT
    from gptkit.train_needs import flops_per_token

    with torch.device("meta"):
        model = GPT(preset("smollm2-135m"))
    dense, per_position = flops_per_token(model, 0), flops_per_token(model, 1)
    assert flops_per_token(model) == flops_per_token(model, model.config.block_size)
    assert flops_per_token(model, 40) == dense + 40 * (per_position - dense)
    assert flops_per_token(model) > 3 * flops_per_token(model, 40)
