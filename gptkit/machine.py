"""Facts about this machine that gptkit's speed depends on: measured once, cached per machine.

Sessions land on different CPUs (an AMD EPYC with AVX2, an Intel Xeon with AVX-512 and AMX),
and what is fast on one is not on the other. So nothing here is a constant of one CPU:

    cpu()          model name, SIMD flags (AVX2 / AVX-512 / AMX), cores, torch threads
    peak_flops()   the matmul FLOP/s this device reaches: the best of several short runs,
                   raised (never lowered) when a training step is seen going faster
    decode_plan()  how CPU decoding multiplies a few rows by a weight matrix (DecodeLinear):
                   weight layout, how many parts the threads split it into, which operand
                   goes first, and up to how many rows the split pays; chosen by timing every
                   candidate on matrices larger than the last-level cache, with the GEMV
                   bandwidth that best one streams

(onednn.py caches one more fact here: which library multiplies training's fp32
matrices faster.)

Measurements are cached as JSON in cache_dir(): $XDG_CACHE_HOME/gptkit/machine/<cpu>/<torch>
(~/.cache when XDG_CACHE_HOME is unset), one file per fact and thread count, so a new CPU, a
new torch or another thread count measures afresh, like FFTW's wisdom or oneDNN's tuning.
Delete the directory to measure again (`python -m bench` always re-measures).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


# -- the decode plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePlan:
    """How DecodeLinear multiplies a few rows by a weight W [N, K] (y = x @ W.T).

    column_major: W is stored column-major (W.T a contiguous [K, N]); else row-major.
    splits_per_thread: 0 runs one F.linear call; s > 0 splits the product into s * threads
        parts, one batched-matmul entry each (column-major: K is split and the partial
        products summed; row-major: N is split and the parts laid side by side).
    max_split_rows: with more rows than this, one F.linear call (a GEMM is no longer bound by
        streaming the weight).
    weight_first: (row-major, split) each part computes W_i @ x.T, the weight as the left
        operand, instead of x @ W_i.T. BLAS then streams W's rows as a matrix-vector product
        does: on an AMD EPYC (2 cores) SmolLM2's matrices streamed at 31 GB/s this way against
        27 for the column-major split, and two or three rows (speculative decoding's
        verification) cost little more than one.
    packed_from: from this many rows on (0: never), a copy of W reordered into oneDNN's
        blocked layout (`pack`) multiplies them in one oneDNN call. On that AMD EPYC its kernel
        took 4 rows for 1.0-1.2x the time of one where BLAS took 1.4-1.9x (speculative
        decoding's checks), and a 256-token prompt in a third of F.linear's time; one row it
        streamed a little slower than the split. The price is that second copy, so
        `use_decode_layout` makes it only for a model whose copy fits in an eighth of the free
        memory.
    """

    column_major: bool = True
    splits_per_thread: int = 1
    max_split_rows: int = 8
    weight_first: bool = False
    packed_from: int = 0

    @property
    def name(self) -> str:
        if self.packed_from == 1:
            return "oneDNN packed"
        packed = f", oneDNN packed from {self.packed_from} rows" if self.packed_from else ""
        layout = "column-major" if self.column_major else "row-major"
        if not self.splits_per_thread:
            return f"{layout}, one call{packed}"
        axis = "K" if self.column_major else "N"
        order = ", W @ x" if self.weight_first else ""
        return f"{layout}, split {axis} {self.splits_per_thread}x threads{order}{packed}"


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


CANDIDATES = [
    DecodePlan(column_major, splits, 8) for column_major in (True, False) for splits in (0, 1, 2)
] + [DecodePlan(False, splits, 8, weight_first=True) for splits in (1, 2)]
PACKED = DecodePlan(False, 0, packed_from=1)  # every row count through the packed copy


def plan_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: DecodePlan,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as `plan` says (the same numbers, up to float
    rounding of a split sum). x [..., K], weight [N, K], packed: `pack(weight)` or None
    -> [..., N]."""
    N, K = weight.shape
    rows = x.numel() // K
    if packed is not None and plan.packed_from and rows >= plan.packed_from:
        return onednn_linear(x, packed, bias)
    splits = plan.splits_per_thread * torch.get_num_threads()
    if splits < 2 or rows > plan.max_split_rows or rows == 0:
        return F.linear(x, weight, bias)
    out = (*x.shape[:-1], N)
    if plan.column_major and K % splits == 0 and weight.t().is_contiguous():
        # thread i multiplies x[:, K_i] by the rows K_i of W.T; the partial products are summed
        x_parts = x.reshape(rows, splits, K // splits).transpose(0, 1)  # [s, rows, K/s]
        y = torch.bmm(x_parts, weight.t().view(splits, K // splits, N)).sum(0).view(out)
    elif plan.weight_first and splits <= N and weight.is_contiguous():
        # thread i computes the outputs N_i as W[N_i] @ x.T; the rows past a multiple of the
        # split (GPT-2's head of 50,257 tokens) take one more small product
        x2 = x.reshape(rows, K)
        main = N - N % splits
        x_t = x2.t().expand(splits, K, rows)  # [s, K, rows], no copy
        w = weight if main == N else weight[:main]  # (a slice is one more op per token)
        y = torch.bmm(w.view(splits, main // splits, K), x_t)  # [s, main/s, rows]
        if rows == 1 and main == N:  # [N, 1] is one row's [1, N] in memory already
            y = y.view(out)
        else:
            y = y.view(main, rows).t()  # [rows, main]
            if main < N:
                y = torch.cat([y, F.linear(x2, weight[main:])], dim=1)
            # a transposed copy: a strided view would slow every op after it, the next
            # matmul most
            y = y.contiguous().view(out)
    elif not plan.column_major and N % splits == 0 and weight.is_contiguous():
        # thread i computes the outputs N_i from the rows N_i of W
        w_parts = weight.view(splits, N // splits, K).transpose(1, 2)  # [s, K, N/s]
        y = torch.bmm(x.reshape(1, rows, K).expand(splits, rows, K), w_parts)  # [s, rows, N/s]
        # One row's [s, 1, N/s] is [1, N] in memory already (a view); more rows need a copy.
        y = y.view(out) if rows == 1 else y.transpose(0, 1).reshape(out)
    else:
        return F.linear(x, weight, bias)
    if bias is not None:
        y += bias
    return y


def lay_out(weight: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """`weight` [N, K] with the strides `plan` wants (same values; a copy only if they differ)."""
    return weight.t().contiguous().t() if plan.column_major else weight.contiguous()


@dataclass(frozen=True)
class Tuning:
    plan: DecodePlan
    gemv_bytes_per_s: float  # the best candidate's weight streaming rate, one row
    seconds: float  # how long the measurement took
    candidates: dict[str, float]  # every candidate's bytes/s at one row
    busy: bool = False  # measured while other work held the cores: measure again when quiet


# Row counts tried for the split, in order, up to the first where one call is faster. Every
# count up to 6 is tried: speculative decoding checks k + 1 rows a pass, and when 4 rows was
# the last count below 8, a 5-row pass (k = 4) fell back to one call, 1.5-2x dearer than a
# 1-row pass on a 2-core AMD EPYC (AVX-512).
SPLIT_ROWS = (2, 3, 4, 5, 6, 8, 12, 16, 32)
# Row counts tried for the packed copy, from the most down: a prompt, then speculative checks.
PACKED_ROWS = (2, 3, 4, 5, 8, 64)


def decode_plan() -> DecodePlan:
    """The plan for this machine and thread count (measured on first use, then cached)."""
    return decode_tuning().plan


def gemv_bandwidth() -> float:
    """Bytes/s the best matrix-vector product streams weights at here (cached)."""
    return decode_tuning().gemv_bytes_per_s


_tunings: dict[Path, Tuning] = {}


def decode_tuning(refresh: bool = False) -> Tuning:
    name = f"decode-t{torch.get_num_threads()}.json"
    key = cache_dir() / name
    if not refresh and key in _tunings:
        return _tunings[key]
    cached = None if refresh else read_fact(name)
    tuning = _tuning_from_json(cached) if cached else None
    if tuning is None or (tuning.busy and not busy()):
        tuning = measure_decode()
        record = {**dataclasses.asdict(tuning), "split_rows": list(SPLIT_ROWS)}
        write_fact(name, {**record, "cpu": cpu().describe()})
    _tunings[key] = tuning
    return tuning


def _tuning_from_json(data: dict) -> Tuning | None:
    try:
        if set(data["candidates"]) != {p.name for p in CANDIDATES}:
            return None  # measured before today's candidates existed: measure them all
        if data.get("split_rows") != list(SPLIT_ROWS) or "packed_from" not in data["plan"]:
            return None  # split rows searched differently, or before packing: search again
        return Tuning(
            DecodePlan(**data["plan"]),
            float(data["gemv_bytes_per_s"]),
            float(data["seconds"]),
            {str(k): float(v) for k, v in data["candidates"].items()},
            bool(data.get("busy", False)),
        )
    except (KeyError, TypeError, ValueError):  # an older or damaged file: measure again
        return None


def block_matrices(d_model: int) -> list[torch.Tensor]:
    """The matrices of a transformer block of width `d_model` (qkv [3d, d], MLP up [4d, d] and
    down [d, 4d]), row-major, repeated until they outgrow the last-level cache four times over:
    decoding streams every weight from memory once per token."""
    target = min(max(4 * cpu().l3_bytes, 128 << 20), 256 << 20)
    shapes = [(3 * d_model, d_model), (4 * d_model, d_model), (d_model, 4 * d_model)]
    copies = max(1, math.ceil(target / sum(n * k * 4 for n, k in shapes)))
    return [torch.empty(n, k).uniform_(-0.05, 0.05) for _ in range(copies) for n, k in shapes]


def _held(matrices: list[torch.Tensor], form: str) -> list[torch.Tensor]:
    """`matrices` as a plan of `form` (see _form) multiplies them."""
    if form == "packed":
        return [pack(w) for w in matrices]
    return [lay_out(w, DecodePlan(column_major=form == "column")) for w in matrices]


def gemv_sampler(plan: DecodePlan | None = None, d_model: int = 768) -> Callable[[], float]:
    """A function that streams `block_matrices` once at one row as `plan` (default: this
    machine's) multiplies them, best of 3 passes, and returns the bytes/s: the GEMV bound
    sampled whenever a benchmark wants, e.g. between its rounds, so that the bound and what
    it bounds see the same load. Holds the matrices (~256 MB) while it lives."""
    plan = plan or decode_plan()
    rows = block_matrices(d_model)
    weights = {"row": rows, _form(plan): _held(rows, _form(plan))}
    total = sum(w.numel() * w.element_size() for w in rows)
    return lambda: total / _time_plans(weights, 1, [plan], 3, math.inf)[plan]


def measure_decode(d_model: int = 768, rounds: int = 5, budget_s: float = 3.0) -> Tuning:
    """Time every candidate plan on `block_matrices(d_model)`. Then find up to how many rows
    the winner's split still beats one call. About two seconds; never much more than
    `budget_s` (a busy machine gets fewer rounds). Holds the matrices in every form a
    candidate multiplies (row-major, column-major, packed: 384-768 MB), so every round times
    every candidate: a busy moment slows one timing, not one layout's."""
    start, was_busy = time.perf_counter(), busy()
    deadline = start + budget_s
    rows = block_matrices(d_model)
    forms = ["row", "column", *(["packed"] if can_pack() else [])]
    weights = {form: _held(rows, form) for form in forms}
    total = sum(w.numel() * w.element_size() for w in rows)
    # half the budget for every candidate at one row, the rest for more rows
    times = _time_plans(weights, 1, CANDIDATES, rounds, start + budget_s / 2)
    rates = {plan: total / seconds for plan, seconds in times.items()}  # bytes/s at one row
    best = max(rates, key=rates.__getitem__)
    # Rows beyond one (a batch, a few prompt tokens, a speculative check): up to where does
    # the winner's split still beat one call?
    split_rows = 1
    one_call = DecodePlan(best.column_major, 0)
    for rows in SPLIT_ROWS if best.splits_per_thread else ():
        wide = dataclasses.replace(best, max_split_rows=rows)
        times = _time_plans(weights, rows, [wide, one_call], 3, deadline)
        if times[wide] > times[one_call]:
            break
        split_rows = rows
        if time.perf_counter() > deadline:
            break
    chosen = dataclasses.replace(best, max_split_rows=split_rows)
    # Then from how many rows a packed copy pays: the fewest from which it wins at every
    # count tried (one row is left to the winner above, which streams it faster).
    packed_from = 0
    for rows in reversed(PACKED_ROWS if "packed" in weights else ()):
        times = _time_plans(weights, rows, [chosen, PACKED], 3, deadline)
        if times[PACKED] >= times[chosen]:
            break
        packed_from = rows
    return Tuning(
        dataclasses.replace(chosen, packed_from=packed_from),
        rates[best],
        time.perf_counter() - start,
        {p.name: r for p, r in rates.items()},
        was_busy or busy(),  # other work that started meanwhile counts too
    )


def _form(plan: DecodePlan) -> str:
    """How `plan` wants a weight held: "packed", "column" (column-major) or "row"."""
    return "packed" if plan.packed_from == 1 else "column" if plan.column_major else "row"


def _time_plans(
    weights: dict[str, list[torch.Tensor]],
    rows: int,
    plans: list[DecodePlan],
    rounds: int,
    stop: float,
) -> dict[DecodePlan, float]:
    """Each plan's best seconds for one pass over every weight (in its form: weights by
    `_form`) with `rows` input rows. Each round times every plan in turn; past the `stop`
    time (perf_counter) no new round starts after the first timed one."""
    widths = {w.shape[1] for w in weights["row"]}
    inputs = {k: torch.randn(rows, k) for k in widths}
    best = dict.fromkeys(plans, math.inf)
    for round in range(rounds + 1):
        for plan in plans:
            t0 = time.perf_counter()
            for w in weights[_form(plan)]:
                packed = w if _form(plan) == "packed" else None
                plan_linear(inputs[w.shape[1]], w, None, plan, packed)
            if round:  # round 0 warms up caches and thread pools
                best[plan] = min(best[plan], time.perf_counter() - t0)
        if round and time.perf_counter() > stop:
            break
    return best
