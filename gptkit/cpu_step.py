"""A native decoding step: one call into C (cpu_step.c) per pass of a few tokens, fp32 on the CPU.

Batch-1 decoding reads every weight once per token, so its floor is the time to stream the
weights. Eager PyTorch adds a few microseconds for each of ~56 operator calls per layer, which
for SmolLM2-135M's 30 layers was ~4 ms beside ~10 ms of streaming. cpu_step.c does the whole
pass in one call: on a 2-core AMD EPYC a SmolLM2 step took 9.5 ms against 15.6 ms for the
eager step in the same process (bench/decode_ops.py), the same logits within 1e-4.

The C file is compiled on first use with the machine's C compiler, for this CPU
(-march=native: the library is cached under a name that includes the CPU's flags, so one built
on another CPU is never loaded), and loaded with ctypes; it links to the OpenMP runtime torch
has already loaded, so its threads are torch's. Where there is no compiler, or
GPTKIT_NATIVE_STEP=0, or the model is not one it serves (see `unsupported`), decoding stays on
PyTorch, which computes the same numbers up to float rounding.

`NativeStep` is what cpu.use_decode_layout sets as `model.native_step`; GPT.forward asks it
first for a pass through a KV cache, and it answers None for one it does not serve (a batch, a
prompt of more than MAX_TOKENS, gradients wanted, a model changed since: an adapter wrapped a
layer, weights moved), which then runs in PyTorch as always."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .cpu_plan import block_matrices
from .kv_cache import KVCache
from .machine import _cpuinfo, cache_dir
from .model import GPT, RMSNorm

SOURCE = Path(__file__).with_name("cpu_step.c")
# -ffast-math lets the compiler vectorise the dot products' sums (reassociation) and call
# glibc's vector expf; nothing here relies on infinities or NaNs.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]

_P = ctypes.c_void_p


def _fields(ctype, names: str) -> list[tuple[str, type]]:
    return [(name, ctype) for name in names.split(" ")]


class _Layer(ctypes.Structure):  # cpu_step.c's Layer
    _fields_ = _fields(_P, "norm1 qkv_w qkv_b proj_w proj_b norm2 fc_w fc_b down_w down_b")


class _Model(ctypes.Structure):  # cpu_step.c's Model
    _fields_ = _fields(ctypes.c_int, "n_layer C H Hkv D I V") + _fields(ctypes.c_float, "eps")
    _fields_ += _fields(_P, "emb norm_f head cos sin layers x xn qkv att h scores")


class _Cache(ctypes.Structure):  # cpu_step.c's Cache
    _fields_ = _fields(_P, "k v") + _fields(ctypes.c_long, "layer_stride head_stride")


OFF = ("0", "false", "no", "off")  # GPTKIT_NATIVE_STEP values that turn the step off


def enabled() -> bool:
    return os.environ.get("GPTKIT_NATIVE_STEP", "1").strip().lower() not in OFF


def library_path(compiler: str) -> Path:
    """Where the library built from SOURCE by `compiler` for this CPU lives: named by a hash of
    the source, the flags, the compiler's version and every CPU flag -march=native reads."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpuinfo().get("flags", "")])
    return cache_dir() / f"cpu_step-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


@functools.cache
def library() -> ctypes.CDLL | None:
    """cpu_step.c compiled for this CPU and loaded (built on the first call, then cached on
    disk), or None where it cannot be: no C compiler, a failed build. Never raises."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError):
        return None
    i32 = ctypes.c_int
    lib.gk_step.argtypes = [_P, _P, _P, i32, i32, i32, i32, _P]
    lib.gk_step.restype = i32
    lib.gk_gemm.argtypes = [_P, _P, _P, i32, i32, i32, i32]
    lib.gk_gemm.restype = None
    return lib


def _build(compiler: str, path: Path) -> None:
    """Compile to a temporary name and rename: a process loading the library while another
    builds it sees a whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cpu_step-", suffix=".so")
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def gemv_sampler(
    d_model: int = 768, weights: list[torch.Tensor] | None = None
) -> Callable[[], float] | None:
    """cpu_plan.gemv_sampler's twin for the native step's product: a function that streams
    cpu_plan.block_matrices (or `weights`, row-major) once at one row and returns the bytes/s
    (best of 3), or None without the library. A GEMV bound for native decoding is the better
    of the two."""
    if library() is None:
        return None
    weights = weights if weights is not None else block_matrices(d_model)
    total = sum(w.numel() * w.element_size() for w in weights)
    xs = {k: torch.randn(1, k) for k in {w.shape[1] for w in weights}}
    ys = {n: torch.empty(1, n) for n in {w.shape[0] for w in weights}}

    def sample() -> float:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            for w in weights:
                linear(xs[w.shape[1]], w, ys[w.shape[0]])
            best = min(best, time.perf_counter() - start)
        return total / best

    sample()  # warm up the threads and the pages
    return sample


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T through the native step's product: x [T, K], weight [N, K], out
    [T, N], all contiguous fp32 (the GEMV bound of a native step is measured with it)."""
    lib = library()
    assert lib is not None and x.is_contiguous() and weight.is_contiguous()
    (T, K), N = x.shape, weight.shape[0]
    threads = torch.get_num_threads()
    lib.gk_gemm(weight.data_ptr(), x.data_ptr(), out.data_ptr(), T, N, K, threads)


_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
# Tokens a call serves at most: one decoding step, or a speculative check of k guesses and the
# token before them. More (a prompt) go to PyTorch, whose oneDNN kernels compute faster: on a
# 2-core AMD EPYC (AVX-512), SmolLM2's native pass over 8 tokens took 16.3 ms against
# PyTorch's 19.4, over 12 0.96x as long, over 16 1.05x.
MAX_TOKENS = 12


def unsupported(model: GPT, any_layout: bool = False) -> str | None:
    """Why the native step cannot serve `model` as it is now, or None if it can. any_layout:
    as if its weights were row-major (cpu.use_decode_layout asks before laying them out)."""
    c = model.config
    if (c.positions, c.norm, c.activation, c.attention, c.head) != (
        "rope",
        "rmsnorm",
        "swiglu",
        "dense",
        "lm",
    ) or not c.prenorm:
        return "only Llama-style models (rope, pre-norm RMSNorm, SwiGLU, dense attention, LM head)"
    if model.prompt is not None:
        return "a soft prompt is attached"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a module has forward hooks (PyTorch's pass runs them)"
    for block in model.blocks:
        if block.attn.prefix is not None or block.attn.probe is not None:
            return "a prefix or a probe is attached"
        linears = [block.get_submodule(name) for name in _LINEARS]
        if not all(map(_plain_linear, [*linears, model.lm_head])):
            return "a linear layer is wrapped or replaced (an adapter, int8)"
        if type(block.norm1) is not RMSNorm or type(block.norm2) is not RMSNorm:
            return "a norm is replaced"
    if model.lm_head.bias is not None:
        return "the LM head has a bias"
    for tensor in _tensors(model):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            return "weights are not fp32 on the CPU"
        if not (tensor.is_contiguous() or any_layout):
            return "weights are not row-major (a column-major decode plan was asked for)"
    return None


def _plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes F.linear with its weight and bias and nothing else: an
    nn.Linear, or a subclass that only computes it another way (cpu.DecodeLinear,
    onednn.OneDNNLinear), with no parameter or submodule of its own. Adapters (LoRA and its
    kin) and int8 layers are modules of their own, not linear layers."""
    own = {name for name, _ in module.named_parameters(recurse=False)}
    return isinstance(module, nn.Linear) and own <= {"weight", "bias"} and not [*module.children()]


def _tensors(model: GPT) -> list[torch.Tensor]:
    """Every tensor the step reads, in a fixed order (biases may be None: skipped)."""
    out = [model.tok_emb.weight, model.norm_f.weight, model.lm_head.weight]
    out += [model.rope_cos, model.rope_sin]
    for block in model.blocks:
        out += [block.norm1.weight, block.norm2.weight]
        for name in _LINEARS:
            linear = block.get_submodule(name)
            out += [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    return out


class NativeStep:
    """The native decoding step bound to one model: its weights' addresses, held in ctypes
    structures, and the scratch buffers. Call it with a pass of up to MAX_TOKENS tokens of one
    sequence; it returns their logits, or None for a pass it does not serve (see the module
    docstring)."""

    def __init__(self, model: GPT):
        self._model = weakref.ref(model)  # the model holds this object; no cycle
        self._lock = threading.Lock()  # one step at a time: the scratch buffers are shared
        self._scores = torch.empty(0)
        # The model is checked, and the structures pointed at its tensors, once per cache,
        # i.e. per generation: the check reads every module and tensor (~0.7 ms for SmolLM2
        # on a 2-core AMD EPYC).
        # A model changed in the middle of a generation is not seen.
        self._checked: weakref.ref | None = None  # the cache it was last checked for
        self._served = False

    def __deepcopy__(self, memo) -> None:
        return None  # a copied model has its own weights: it decodes in PyTorch

    def __call__(self, idx: torch.Tensor, cache: KVCache, last_only: bool) -> torch.Tensor | None:
        """Logits [1, T, V] ([1, 1, V] when last_only) for tokens idx [1, T] after the cache's
        filled columns, which the call fills; None for a pass this step does not serve."""
        model = self._model()
        lib = library()
        if model is None or lib is None or cache.batch != 1 or idx.device.type != "cpu":
            return None
        T = idx.shape[1]
        if idx.shape[0] != 1 or not 1 <= T <= MAX_TOKENS or torch.is_grad_enabled():
            return None  # a batch or a prompt (PyTorch's kernels), or a gradient wanted
        if model.training and model.config.dropout > 0:
            return None
        pos, position = cache.next_column()
        if pos != position or pos + T > min(cache.max_len, model.config.block_size):
            return None  # left padding; or PyTorch's pass raises the error that explains it
        k, v = cache.k, cache.v  # [L, 1, Hkv, M, D]
        if k.dtype != torch.float32 or k.stride(3) != k.shape[4] or k.stride(4) != 1:
            return None
        tokens = idx.to(torch.int64).contiguous()
        with self._lock:
            if self._checked is None or self._checked() is not cache:  # a new generation
                self._served = unsupported(model) is None
                if self._served:
                    self._bind(model)
                self._checked = weakref.ref(cache)
            if not self._served:
                return None
            scores = MAX_TOKENS * model.config.n_head * (pos + T)  # [T_max H, S] at most
            if self._scores.numel() < scores:
                self._scores = torch.empty(max(2 * scores, 1 << 16))
                self._struct.scores = self._scores.data_ptr()
            layout = _Cache(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(2))
            logits = torch.empty(1, 1 if last_only else T, model.config.vocab_size)
            refused = lib.gk_step(
                ctypes.byref(self._struct),
                ctypes.byref(layout),
                tokens.data_ptr(),
                T,
                pos,
                int(last_only),
                torch.get_num_threads(),
                logits.data_ptr(),
            )
        if refused:  # a token outside the vocabulary: PyTorch's embedding raises the error
            return None
        cache.advance(T)
        return logits

    def _bind(self, model: GPT) -> None:
        """Point the structures at the model's tensors (a model `unsupported` passed)."""
        c = model.config
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        layers = (_Layer * c.n_layer)()
        for i, b in enumerate(model.blocks):
            qkv, proj, fc, down = (b.get_submodule(name) for name in _LINEARS)
            layers[i] = _Layer(
                ptr(b.norm1.weight), ptr(qkv.weight), ptr(qkv.bias), ptr(proj.weight),
                ptr(proj.bias), ptr(b.norm2.weight), ptr(fc.weight), ptr(fc.bias),
                ptr(down.weight), ptr(down.bias),
            )  # fmt: skip
        qkv_rows = (c.n_head + 2 * c.n_kv_head) * c.head_dim
        width = {
            "x": c.n_embd,
            "xn": c.n_embd,
            "qkv": qkv_rows,
            "att": c.n_head * c.head_dim,
            "h": 2 * c.intermediate_size,
        }
        self._buffers = {name: torch.empty(MAX_TOKENS, n) for name, n in width.items()}
        self._layers = layers  # the structure points into it: keep it alive
        self._struct = _Model(
            c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size,
            c.vocab_size, model.blocks[0].norm1.eps or torch.finfo(torch.float32).eps,
            ptr(model.tok_emb.weight), ptr(model.norm_f.weight), ptr(model.lm_head.weight),
            ptr(model.rope_cos), ptr(model.rope_sin), ctypes.cast(layers, _P),
            *(ptr(t) for t in self._buffers.values()), ptr(self._scores),
        )  # fmt: skip
