"""Facts about this machine that gptkit's speed depends on: measured once, cached per machine.

Sessions land on different CPUs (an AMD EPYC with AVX2, an Intel Xeon with AVX-512 and AMX),
and what is fast on one is not on the other. So nothing here is a constant of one CPU:

    cpu()          model name, SIMD flags (AVX2 / AVX-512 / AMX), cores, torch threads
    peak_flops()   the matmul FLOP/s this device reaches: the best of several short runs,
                   raised (never lowered) when a training step is seen going faster
    busy()         whether other work holds this process's cores now (a timing would be low)

(cpu_plan.py caches the decode plan here, and onednn.py which library multiplies training's
fp32 matrices faster.)

Measurements are cached as JSON in cache_dir(): $XDG_CACHE_HOME/gptkit/machine/<cpu>/<torch>
(~/.cache when XDG_CACHE_HOME is unset), one file per fact and thread count, so a new CPU, a
new torch or another thread count measures afresh, like FFTW's wisdom or oneDNN's tuning.
Delete the directory to measure again (`python -m bench` always re-measures).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flag -> the name people know; only the ones that change which kernels run.
SIMD_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512-BF16",
    "avx512_vnni": "AVX-512-VNNI",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


@dataclass(frozen=True)
class CPU:
    model: str  # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8481C", ...
    flags: tuple[str, ...]  # the SIMD_FLAGS names this CPU has, in SIMD_FLAGS order
    cores: int  # logical CPUs this process may run on
    threads: int  # torch's intra-op threads
    l3_bytes: int  # last-level cache (0: unknown)

    @property
    def simd(self) -> str:
        """The widest vector unit: AMX, AVX-512, AVX2 or baseline."""
        return next((s for s in ("AMX", "AVX-512", "AVX2") if s in self.flags), "baseline")

    def describe(self) -> str:
        flags = ", ".join(self.flags) or "no AVX2"
        return f"{self.model} ({flags}), {self.cores} cores, torch {self.threads} threads"


def cpu() -> CPU:
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    present = set(info.get("flags", "").split())
    if not present:  # not Linux: torch knows the vector width it dispatches to
        capability = torch.backends.cpu.get_cpu_capability()
        present = {"avx512f", "avx2"} if "512" in capability else {"avx2"} & {capability.lower()}
    flags = tuple(name for flag, name in SIMD_FLAGS.items() if flag in present)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CPU(" ".join(model.split()), flags, cores or 1, torch.get_num_threads(), _l3_bytes())


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _l3_bytes() -> int:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        match = re.fullmatch(r"(\d+)([KMG]?)", path.read_text().strip())
        if match:
            sizes.append(int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]])
    return max(sizes, default=0)


def busy(look_s: float = 0.2) -> bool:
    """Whether other work holds more than a quarter of this process's cores now: timings taken
    then are kept only until a quieter moment can take them again.

    Where /proc/stat exists, this looks at the cores for `look_s` while this process sleeps,
    so all the time they spent busy is other work's (hypervisor steal included); elsewhere it
    falls back to the 1-minute load average. That average lags: a command that ended a minute
    ago still counts, and on a 2-core AMD EPYC (AVX-512) a plan measured while another job
    held one core (the split plans streamed 1.1 GB/s, one call 14, against 32 quiet) was kept
    for as long as the average stayed high."""
    before = _core_ticks()
    if before is None:
        try:
            return os.getloadavg()[0] > 0.75 * cpu().cores
        except OSError:  # no load average on this platform
            return False
    time.sleep(look_s)
    after = _core_ticks()
    if after is None or after[1] <= before[1]:
        return False
    return (after[0] - before[0]) / (after[1] - before[1]) > 0.25  # a share of our cores' time


def _own_cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def _core_ticks(stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) clock ticks so far of the cores this process may run on; None where
    /proc/stat cannot be read."""
    cores = _own_cores()
    busy = total = 0
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
            continue
        # user nice system idle iowait irq softirq steal: idle and iowait are idle time
        ticks = [int(f) for f in fields[:8]]
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    return (busy, total) if total else None


# -- the cache ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where this machine's measurements live: one directory per CPU (model, flags, cores)
    and torch version, under the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    c = cpu()
    key = f"{c.model}|{','.join(c.flags)}|{c.cores}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", c.model).strip("-")[:40] or "cpu"
    name = f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return Path(base) / "gptkit" / "machine" / name / f"torch-{torch.__version__}"


def read_fact(name: str) -> dict | None:
    """The cached measurement `name` (a JSON object in cache_dir()), or None when absent or
    damaged."""
    try:
        data = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):  # absent or damaged: measure again
        return None
    return data if isinstance(data, dict) else None


def write_fact(name: str, data: dict) -> None:
    """Cache the measurement `name` atomically (two processes measuring at once each write a
    whole file); a read-only cache costs a re-measurement next time, never an error."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, directory / name)
    except OSError:
        pass


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device))
        return f"peak-cuda-{name}-{str(dtype).removeprefix('torch.')}.json"
    threads = torch.get_num_threads()
    # "-packed": measured with oneDNN's packed product too (see measure_matmul_flops); a peak
    # cached before that was timed is not read, so it is measured again
    packed = "-packed" if dtype == torch.float32 and can_pack() else ""
    return f"peak-{device.type}-{str(dtype).removeprefix('torch.')}-t{threads}{packed}.json"


# -- matmul peak ----------------------------------------------------------------------------


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, runs: int = 10
) -> float:
    """One fresh measurement: the best of `runs` timings of square matmuls (the first ones warm
    up caches, clocks and kernels; a busy machine only ever makes a run slower). On a CPU in
    fp32 the product through oneDNN's packed weight (`pack`, as prompts are multiplied) is
    timed too: on a 2-core AMD EPYC it reached ~540 GFLOP/s where `a @ b` (MKL) reached
    203-230."""
    slow = device.type == "cpu" and dtype != torch.float32  # CPU bf16 may be ~100x slower
    n = 4096 if device.type == "cuda" else 256 if slow else 1024
    gen = torch.Generator(device).manual_seed(0)  # not the global RNG: dropout owns that
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    products = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and can_pack():
        packed = pack(b)
        products.append(lambda: onednn_linear(a, packed))
    best = math.inf
    for _ in range(runs):
        for product in products:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(3):
                product()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """This device's matmul FLOP/s at `dtype`: the cached value, else the best of three fresh
    measurements (cached). A single measurement on a busy machine comes out low, and an MFU
    against it comes out over 100%."""
    name = _device_key(device, dtype)
    cached = read_fact(name) or {}
    old = cached.get("flops") if isinstance(cached.get("flops"), int | float) else 0.0
    if old > 0 and not (cached.get("busy") and not busy()):
        return float(old)
    was_busy = busy()
    flops = max(old, *(measure_matmul_flops(device, dtype) for _ in range(3)))
    was_busy = was_busy or busy()  # other work that started meanwhile counts too
    write_fact(name, {"flops": flops, "source": "measured", "busy": was_busy, "when": time.time()})
    return flops


def raise_peak(device: torch.device, dtype: torch.dtype, flops: float) -> float:
    """Record that `device` did `flops` FLOP/s (a training step measured it doing so), if that
    beats the cached peak; returns the peak now in force."""
    name = _device_key(device, dtype)
    cached = read_fact(name) or {}
    old = cached.get("flops") if isinstance(cached.get("flops"), int | float) else 0.0
    if flops > old:
        record = {"flops": flops, "source": "a training step", "busy": cached.get("busy", False)}
        write_fact(name, {**record, "when": time.time()})
        return flops
    return float(old)


# -- oneDNN's packed product (prompts, speculative checks and the matmul peak) -----------


def can_pack() -> bool:
    """Whether this torch has oneDNN's linear kernel for prepacked weights."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# oneDNN picks its blocked layout for a row count; 4 (a speculative check of 3 guesses) served
# 1 to 256 rows as well as any other hint on that AMD EPYC, and better than 1.
PACK_ROWS = 4


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [N, K] float32 as a packed plan multiplies it: an opaque oneDNN tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS)


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, weight, bias) through oneDNN's linear kernel: x [..., K] -> [..., N].
    `weight` is `pack(W)` (prompts, speculative checks) or W [N, K] itself, any strides
    (training's products, onednn.py: W.t() there costs no copy)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
