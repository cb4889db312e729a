"""The decode plan: how CPU decoding multiplies a few rows by a weight matrix, measured per
machine (cpu.DecodeLinear computes every linear layer as it says).

    decode_plan()  weight layout, how many parts the threads split a product into, which
                   operand goes first, up to how many rows the split pays, and from how many
                   rows oneDNN's packed copy takes over; chosen by timing every candidate on
                   matrices larger than the last-level cache (`measure_decode`), cached per
                   machine and thread count like machine.py's other facts
    gemv_bandwidth()  the weight streaming rate the best candidate reached: the GEMV bound
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import machine


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
    rounding of a split sum). x [..., K], weight [N, K], packed: `machine.pack(weight)` or None
    -> [..., N]."""
    N, K = weight.shape
    rows = x.numel() // K
    if packed is not None and plan.packed_from and rows >= plan.packed_from:
        return machine.onednn_linear(x, packed, bias)
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


def row_major_plan() -> DecodePlan:
    """This machine's plan if it is row-major; else the row-major candidate that streamed
    fastest at one row when the plan was measured, passes of more rows left to one call (or to
    the packed copy, from where the plan takes it). For a model the native step serves: its
    products read row-major weights (cpu.use_decode_layout)."""
    tuning = decode_tuning()
    if not tuning.plan.column_major:
        return tuning.plan
    rows = [p for p in CANDIDATES if not p.column_major]
    best = max(rows, key=lambda p: tuning.candidates[p.name])
    return dataclasses.replace(best, max_split_rows=1, packed_from=tuning.plan.packed_from)


def gemv_bandwidth() -> float:
    """Bytes/s the best matrix-vector product streams weights at here (cached)."""
    return decode_tuning().gemv_bytes_per_s


_tunings: dict[Path, Tuning] = {}


def decode_tuning(refresh: bool = False) -> Tuning:
    name = f"decode-t{torch.get_num_threads()}.json"
    key = machine.cache_dir() / name
    if not refresh and key in _tunings:
        return _tunings[key]
    cached = None if refresh else machine.read_fact(name)
    tuning = _tuning_from_json(cached) if cached else None
    if tuning is None or (tuning.busy and not machine.busy()):
        tuning = measure_decode()
        record = {**dataclasses.asdict(tuning), "split_rows": list(SPLIT_ROWS)}
        machine.write_fact(name, {**record, "cpu": machine.cpu().describe()})
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
    target = min(max(4 * machine.cpu().l3_bytes, 128 << 20), 256 << 20)
    shapes = [(3 * d_model, d_model), (4 * d_model, d_model), (d_model, 4 * d_model)]
    copies = max(1, math.ceil(target / sum(n * k * 4 for n, k in shapes)))
    return [torch.empty(n, k).uniform_(-0.05, 0.05) for _ in range(copies) for n, k in shapes]


def _held(matrices: list[torch.Tensor], form: str) -> list[torch.Tensor]:
    """`matrices` as a plan of `form` (see _form) multiplies them."""
    if form == "packed":
        return [machine.pack(w) for w in matrices]
    return [lay_out(w, DecodePlan(column_major=form == "column")) for w in matrices]


def gemv_sampler(
    plan: DecodePlan | None = None, d_model: int = 768, rows: list[torch.Tensor] | None = None
) -> Callable[[], float]:
    """A function that streams `block_matrices` once at one row as `plan` (default: this
    machine's) multiplies them, best of 3 passes, and returns the bytes/s: the GEMV bound
    sampled whenever a benchmark wants, e.g. between its rounds, so that the bound and what
    it bounds see the same load. Holds the matrices (~256 MB) while it lives; `rows`: those
    matrices already made (row-major), to share them with another sampler."""
    plan = plan or decode_plan()
    rows = rows if rows is not None else block_matrices(d_model)
    weights = {"row": rows, _form(plan): _held(rows, _form(plan))}
    total = sum(w.numel() * w.element_size() for w in rows)
    return lambda: total / _time_plans(weights, 1, [plan], 3, math.inf)[plan]


def measure_decode(d_model: int = 768, rounds: int = 5, budget_s: float = 3.0) -> Tuning:
    """Time every candidate plan on `block_matrices(d_model)`. Then find up to how many rows
    the winner's split still beats one call. About two seconds; never much more than
    `budget_s` (a busy machine gets fewer rounds). Holds the matrices in every form a
    candidate multiplies (row-major, column-major, packed: 384-768 MB), so every round times
    every candidate: a busy moment slows one timing, not one layout's."""
    start, was_busy = time.perf_counter(), machine.busy()
    deadline = start + budget_s
    rows = block_matrices(d_model)
    forms = ["row", "column", *(["packed"] if machine.can_pack() else [])]
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
        was_busy or machine.busy(),  # other work that started meanwhile counts too
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
