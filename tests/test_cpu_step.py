"""The native decoding step (cpu_step.py, cpu_step.c): the same logits and cache as PyTorch's
pass for every model it serves, PyTorch for every pass it does not, and a library built for
this CPU or none at all."""

import copy
import shutil

import pytest
import torch
import torch.nn as nn
from test_model import VARIANTS, tiny

from gptkit import cpu_step
from gptkit.cpu import use_decode_layout
from gptkit.cpu_plan import DecodePlan
from gptkit.model import ContextLengthError

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None, reason="no C compiler (cc) to build cpu_step.c with"
)
ROW_MAJOR = DecodePlan(column_major=False, splits_per_thread=1, weight_first=True)
LLAMA = VARIANTS["llama-gqa"]


def native(**overrides):
    """A tiny Llama-style model laid out for decoding, with its native step."""
    model = use_decode_layout(tiny(**{**LLAMA, **overrides}), ROW_MAJOR)
    assert isinstance(model.native_step, cpu_step.NativeStep)
    return model


def block_calls(model) -> list[int]:
    """A counter of the first block's forward calls: PyTorch's pass makes them, the native
    step does not. (Not a hook: a model with hooks decodes in PyTorch, so that they run.)"""
    calls, forward = [0], model.blocks[0].forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.blocks[0].forward = counted
    return calls


@pytest.fixture(params=["native", "no-avx512"])
def build(request, monkeypatch):
    """The library as built for this CPU, and built without AVX-512 (the plain C kernels that
    an AVX2 CPU runs), each under its own name."""
    if request.param == "no-avx512":
        monkeypatch.setattr(cpu_step, "FLAGS", [*cpu_step.FLAGS, "-mno-avx512f"])
    cpu_step.library.cache_clear()
    yield request.param
    cpu_step.library.cache_clear()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"bias": True, "tie_embeddings": False}, {"n_kv_head": 1}, {"n_kv_head": 4}],
    ids=["gqa-tied", "bias-untied", "mqa", "mha"],
)
@torch.inference_mode()
def test_native_passes_equal_pytorch_passes(overrides, build):
    """Single tokens and speculative checks (several tokens, every row's logits or the last's)
    give PyTorch's logits and write PyTorch's keys and values, at every cache length."""
    model = native(**overrides)
    calls = block_calls(model)
    torch.manual_seed(2)
    prompt = torch.randint(0, 97, (1, 6))
    caches = [model.new_cache(1, 30), model.new_cache(1, 30)]
    step = model.native_step
    passes = [(6, False)] + [(1, True)] * 4 + [(3, False), (1, False), (5, True), (2, False)]
    for n, (T, last_only) in enumerate(passes):
        idx = prompt if n == 0 else torch.randint(0, 97, (1, T))
        before = calls[0]
        ours = model(idx, cache=caches[0], last_only=last_only)
        assert calls[0] == before  # the native step served it
        model.native_step = None
        theirs = model(idx, cache=caches[1], last_only=last_only)
        model.native_step = step
        assert ours.shape == theirs.shape == (1, 1 if last_only else T, 97)
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert caches[0].lengths == caches[1].lengths == [6 + 4 + 3 + 1 + 5 + 2]
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].v, caches[1].v, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_passes_it_does_not_serve_run_in_pytorch():
    model = native()
    calls = block_calls(model)
    cache = model.new_cache(2, 30)  # a batch
    model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert calls[0] == 1
    padded = model.new_cache(1, 30, pad=[2])  # left padding
    model(torch.zeros(1, 3, dtype=torch.long), cache=padded)
    model(torch.zeros(1, 1, dtype=torch.long), cache=padded)
    assert calls[0] == 3
    with pytest.raises(IndexError):  # a token past the vocabulary: PyTorch's embedding says so
        model(torch.tensor([[97]]), cache=model.new_cache(1, 4))
    full = model.new_cache(1, 32)  # the context's end: PyTorch's pass explains it
    model(torch.zeros(1, 31, dtype=torch.long), cache=full)
    with pytest.raises(ContextLengthError, match="33 tokens do not fit"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=full)


def test_a_gradient_wanted_runs_in_pytorch():
    model = native()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    logits = model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert logits.grad_fn is not None


@torch.inference_mode()
def test_a_wrapped_layer_is_seen_at_the_next_generation():
    """An adapter put on after loading (a wrapped linear layer) is honoured: the next cache's
    passes run in PyTorch, through the wrapper."""

    class Doubled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model = native()
    calls = block_calls(model)
    model.blocks[1].mlp.proj = Doubled(model.blocks[1].mlp.proj)
    assert "wrapped" in cpu_step.unsupported(model)
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    ours = model(torch.ones(1, 1, dtype=torch.long), cache=cache)
    assert calls[0] == 2
    model.native_step = None
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    torch.testing.assert_close(ours, model(torch.ones(1, 1, dtype=torch.long), cache=cache))


@torch.inference_mode()
def test_a_forward_hook_runs():
    model = native()
    seen = []
    model.blocks[1].mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert "hooks" in cpu_step.unsupported(model)
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    model(torch.ones(1, 1, dtype=torch.long), cache=cache)
    assert seen == [(1, 2, 32), (1, 1, 32)]


def test_models_it_does_not_serve_get_no_native_step(monkeypatch):
    for variant in ("gpt2", "gpt3-sparse", "mqa"):  # GPT-2's blocks, banded attention
        model = tiny(**VARIANTS[variant])
        assert "only Llama-style models" in cpu_step.unsupported(model)
        assert use_decode_layout(model, ROW_MAJOR).native_step is None
    column_major = use_decode_layout(tiny(**LLAMA), DecodePlan(column_major=True))
    assert "not row-major" in cpu_step.unsupported(column_major)
    assert column_major.native_step is None
    for no in ("0", "off", "False"):
        monkeypatch.setenv("GPTKIT_NATIVE_STEP", no)
        assert use_decode_layout(tiny(**LLAMA), ROW_MAJOR).native_step is None


def test_a_column_major_machine_lays_out_row_major_what_the_native_step_serves(monkeypatch):
    # A machine whose measured plan is column-major (as a 2-core AMD EPYC with AVX2's was):
    # the models the native step serves are laid out row-major, with the row-major candidate
    # that streamed fastest; the others keep the machine's plan.
    from gptkit import cpu_plan

    rates = {p.name: 1.0 for p in cpu_plan.CANDIDATES}
    rates["row-major, split N 2x threads"] = 1.5  # the fastest row-major one
    column = DecodePlan(column_major=True, splits_per_thread=2, max_split_rows=32, packed_from=2)
    tuning = cpu_plan.Tuning(column, 2e10, 1.0, rates, False)
    monkeypatch.setattr(cpu_plan, "decode_tuning", lambda refresh=False: tuning)
    llama = use_decode_layout(tiny(**LLAMA))
    assert isinstance(llama.native_step, cpu_step.NativeStep)
    plan = llama.blocks[0].mlp.fc.plan
    assert (plan.column_major, plan.splits_per_thread, plan.weight_first) == (False, 2, False)
    assert (plan.max_split_rows, plan.packed_from) == (1, 2)
    assert all(p.is_contiguous() for p in llama.parameters())
    gpt2 = use_decode_layout(tiny(**VARIANTS["gpt2"]))
    assert gpt2.native_step is None and gpt2.blocks[0].mlp.fc.plan == column
    assert gpt2.blocks[0].mlp.fc.weight.t().is_contiguous()
    monkeypatch.setenv("GPTKIT_NATIVE_STEP", "0")  # no native step: the machine's plan
    assert use_decode_layout(tiny(**LLAMA)).blocks[0].mlp.fc.plan == column


@torch.inference_mode()
def test_a_copied_model_decodes_in_pytorch_with_its_own_weights():
    model = native()
    twin = copy.deepcopy(model)
    assert twin.native_step is None
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)  # tied: the embeddings too
    caches = [model.new_cache(1, 8), twin.new_cache(1, 8)]
    idx = torch.tensor([[3]])
    assert not torch.allclose(model(idx, cache=caches[0]), twin(idx, cache=caches[1]))


def test_without_a_compiler_decoding_stays_in_pytorch(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu_step.library.cache_clear()
    try:
        assert cpu_step.library() is None
        model = use_decode_layout(tiny(**LLAMA), ROW_MAJOR)
        assert model.native_step is None
        assert model(torch.zeros(1, 1, dtype=torch.long), cache=model.new_cache(1, 4)).shape == (
            1,
            1,
            97,
        )
    finally:
        cpu_step.library.cache_clear()


def test_the_library_is_built_for_this_cpu_and_named_by_its_flags(monkeypatch):
    compiler = shutil.which("cc")
    path = cpu_step.library_path(compiler)
    assert cpu_step.library() is not None and path.exists()  # built on first use, cached
    flags = cpu_step._cpuinfo().get("flags", "")
    monkeypatch.setattr(cpu_step, "_cpuinfo", lambda: {"flags": flags + " amx_tile"})
    assert cpu_step.library_path(compiler) != path  # another CPU: another build
