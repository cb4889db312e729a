"""Hugging Face ⇄ gptkit conversion, checked against the real `transformers` models.

Every reference model is built here with random weights and saved to tmp_path (no hub
downloads). Weights are perturbed away from transformers' init (unit norms, zero biases) so
that a swapped or mis-transposed tensor cannot hide behind a symmetric value.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptkit.config import preset
from gptkit.convert import (
    ConversionError,
    export_hf,
    hf_config_to_gptkit,
    is_hf_dir,
    load_hf,
    load_hf_state_dict,
    resolve_hf,
)
from gptkit.generation import SampleConfig, generate
from gptkit.model import GPT
from gptkit.surgery import set_head

transformers = pytest.importorskip("transformers")

# transformers is the reference: each test runs in a child process (tests/reference.py).
pytestmark = pytest.mark.reference("transformers")

TOL = 1e-4
VOCAB = 96


def perturb(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Add noise to every parameter (tied ones once) so all tensors are distinct."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare(hf_model, ours: GPT, ids: torch.Tensor, label: str) -> float:
    with torch.no_grad():
        want = hf_model(ids).logits
        got = ours(ids)
    diff = max_diff(want, got)
    print(f"[parity] {label}: max |logit diff| = {diff:.3e} (logit scale {want.abs().max():.2f})")
    assert got.shape == want.shape
    assert diff <= TOL, f"{label}: max diff {diff}"
    return diff


def gpt2_config(**kw):
    args = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=None)
    args.update(eos_token_id=None)
    return transformers.GPT2Config(**{**args, **kw})


def llama_config(cls_name: str = "LlamaConfig", **kw):
    args = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=None,
        eos_token_id=None,
    )
    return getattr(transformers, cls_name)(**{**args, **kw})


def save_reference(hf_config, model_cls: str, directory, **save_kw):
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(hf_config, attn_implementation="eager")
    perturb(model)
    model.save_pretrained(directory, **save_kw)
    return model


HF_CASES = {
    "gpt2": (lambda: gpt2_config(), "GPT2LMHeadModel"),
    "gpt2-untied-gelu": (
        lambda: gpt2_config(tie_word_embeddings=False, activation_function="gelu", n_inner=80),
        "GPT2LMHeadModel",
    ),
    "llama-gqa-untied": (lambda: llama_config(), "LlamaForCausalLM"),
    "llama-gqa-tied": (lambda: llama_config(tie_word_embeddings=True), "LlamaForCausalLM"),
    "llama-bias-headdim": (
        lambda: llama_config(attention_bias=True, mlp_bias=True, head_dim=24),
        "LlamaForCausalLM",
    ),
    "mistral-window": (
        lambda: llama_config("MistralConfig", sliding_window=32),
        "MistralForCausalLM",
    ),
    "qwen2": (lambda: llama_config("Qwen2Config", tie_word_embeddings=True), "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_load_hf_matches_transformers(case, tmp_path):
    make_config, model_cls = HF_CASES[case]
    reference = save_reference(make_config(), model_cls, tmp_path)
    assert is_hf_dir(tmp_path)
    ours = load_hf(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 24))
    compare(reference, ours, ids, case)
    # The CPU decode layout, made while converting: every matrix column-major, same results.
    laid_out = load_hf(tmp_path, decode_layout=True)
    matrices = [p for p in laid_out.parameters() if p.dim() == 2]
    assert matrices and all(p.t().is_contiguous() and not p.is_contiguous() for p in matrices)
    compare(reference, laid_out, ids, case + " (decode layout)")


def test_mistral_context_stops_at_sliding_window(tmp_path):
    save_reference(llama_config("MistralConfig", sliding_window=32), "MistralForCausalLM", tmp_path)
    assert load_hf(tmp_path).config.block_size == 32


def test_load_hf_dtype(tmp_path):
    reference = save_reference(llama_config(), "LlamaForCausalLM", tmp_path)
    ours = load_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not ours.training
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert max_diff(reference(ids).logits, ours(ids)) < 0.25  # bf16 rounding only


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    reference = save_reference(gpt2_config(), "GPT2LMHeadModel", tmp_path / "sharded")
    ids = torch.randint(0, VOCAB, (2, 16))
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    compare(reference, load_hf(tmp_path / "sharded"), ids, "gpt2 sharded safetensors")
    # transformers 5 dropped safe_serialization=False; write the legacy file as 4.x did: the
    # whole state_dict, tied lm_head.weight included, pickled.
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(reference.state_dict(), legacy / "pytorch_model.bin")
    # Pickles are read only when asked (tests/test_hostile_files.py has the refusals).
    assert set(load_hf_state_dict(legacy, allow_pickle=True)) == set(reference.state_dict())
    compare(reference, load_hf(legacy, allow_pickle=True), ids, "gpt2 pytorch_model.bin")


def test_base_model_names_without_prefix(tmp_path):
    """The original gpt2 checkpoint stores `h.0...`, `wte.weight` and the mask buffers."""
    reference = save_reference(gpt2_config(), "GPT2LMHeadModel", tmp_path)
    sd = {
        k.removeprefix("transformer."): v
        for k, v in load_file(tmp_path / "model.safetensors").items()
    }
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(sd, tmp_path / "model.safetensors")
    compare(reference, load_hf(tmp_path), torch.randint(0, VOCAB, (1, 16)), "gpt2 base names")


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    """Full-size GPT-2 (124M) with random fp32 weights, saved and loaded both ways."""
    directory = tmp_path_factory.mktemp("gpt2-124m")
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel._from_config(
        transformers.GPT2Config(), attn_implementation="sdpa"
    ).eval()
    reference.save_pretrained(directory)
    return reference, load_hf(directory)


def test_gpt2_124m_logits(gpt2_124m):
    reference, ours = gpt2_124m
    assert ours.num_params() == reference.num_parameters()
    compare(reference, ours, torch.randint(0, 50257, (2, 32)), "gpt2 124M")


@pytest.mark.parametrize("num_beams", [1, 3])
def test_gpt2_124m_greedy_and_beam_generation(gpt2_124m, num_beams):
    reference, ours = gpt2_124m
    prompt = [464, 2068, 7586, 21831, 18045]  # "The quick brown fox jumps"
    with torch.no_grad():
        want = reference.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=16,
            min_new_tokens=16,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    sample = SampleConfig(temperature=0, max_new_tokens=16, num_beams=num_beams)
    assert generate(ours, [prompt], sample) == [want]


GREEDY_CASES = ["gpt2", "llama-gqa-untied", "qwen2"]


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_generation_matches_transformers(case, tmp_path):
    make_config, model_cls = HF_CASES[case]
    reference = save_reference(make_config(), model_cls, tmp_path)
    ours = load_hf(tmp_path)
    prompt = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        want = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=20,
            min_new_tokens=20,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 7:].tolist()
    got = generate(ours, [prompt[0].tolist()], SampleConfig(temperature=0, max_new_tokens=20))
    print(f"[greedy] {case}: {got[0]}")
    assert got == [want]


EXPORT_CASES = {
    "tiny": preset("tiny"),
    "tiny-untied-relu": preset("tiny", tie_embeddings=False, activation="relu"),
    "tiny-gelu": preset("tiny", activation="gelu", intermediate_size=80),
    "tiny-llama": preset("tiny-llama"),
    "tiny-llama-untied-bias": preset(
        "tiny-llama", tie_embeddings=False, bias=True, rope_theta=500.0
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_hf_loads_in_transformers(case, tmp_path):
    torch.manual_seed(0)
    ours = perturb(GPT(EXPORT_CASES[case]))
    out = export_hf(ours, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.num_parameters() == ours.num_params()
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    compare(hf, ours, ids, f"export {case}")
    # ...and back: exactly the same tensors and logits.
    again = load_hf(out)
    assert again.config == ours.config
    mine, theirs = ours.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


# --------------------------------------------------------------------------- configs and errors


def test_config_variants():
    """transformers 4 (`rope_theta`, `rope_scaling: null`) and 5 (`rope_parameters`) spellings."""
    old = dict(model_type="llama", hidden_size=64, num_attention_heads=4, rope_theta=5e5)
    new = dict(old, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del new["rope_theta"]
    assert hf_config_to_gptkit(dict(old, rope_scaling=None)).rope_theta == 5e5
    assert hf_config_to_gptkit(new).rope_theta == 5e5
    c = hf_config_to_gptkit(dict(architectures=["GPT2LMHeadModel"], activation_function="gelu_new"))
    assert (c.n_layer, c.n_embd, c.block_size, c.activation) == (12, 768, 1024, "gelu_tanh")
    assert c.tie_embeddings and c.intermediate_size == 3072


@pytest.mark.parametrize(
    "hf, named",
    [
        (dict(model_type="bert"), "'bert'"),
        (dict(architectures=["T5ForConditionalGeneration"]), "architecture"),
        (dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3"),
        (dict(model_type="llama", rope_parameters={"rope_type": "yarn"}), "yarn"),
        (dict(model_type="llama", hidden_act="gelu"), "hidden_act"),
        (dict(model_type="llama", attention_bias=True), "mlp_bias"),
        (dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse"),
        (dict(model_type="gpt2", add_cross_attention=True), "add_cross_attention"),
        (dict(model_type="gpt2", activation_function="quick_gelu"), "quick_gelu"),
        (dict(model_type="gpt2", n_embd=100, n_head=3), "n_head=3"),
    ],
)
def test_unsupported_configs(hf, named):
    with pytest.raises(ConversionError, match=named):
        hf_config_to_gptkit(hf)


@pytest.mark.parametrize(
    "base, overrides, named",
    [
        ("tiny", dict(positions="sinusoidal"), "positions='sinusoidal'"),
        ("tiny", dict(prenorm=False), "prenorm=False"),
        ("tiny", dict(attention="alternating"), "attention='alternating'"),
        ("tiny", dict(bias=False), "bias=False"),
        ("tiny", dict(n_kv_head=2), "n_kv_head=2"),
        ("tiny", dict(activation="swiglu"), "activation='swiglu'"),
        ("tiny", dict(positions="rope"), "norm='layernorm'"),
        ("tiny-llama", dict(activation="relu"), "activation='relu'"),
        ("tiny-llama", dict(norm="layernorm"), "norm='layernorm'"),
    ],
)
def test_export_rejects_what_hf_cannot_express(base, overrides, named, tmp_path):
    model = GPT(preset(base, **overrides))
    with pytest.raises(ConversionError, match=named):
        export_hf(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_export_rejects_extra_tensors(tmp_path):
    model = GPT(preset("tiny"))
    model.score = torch.nn.Linear(64, 3)  # a task head HF's LM class has no place for
    with pytest.raises(ConversionError, match=r"score\.weight"):
        export_hf(model, tmp_path)


def edit_checkpoint(directory, edit) -> None:
    sd = load_file(directory / "model.safetensors")
    edit(sd)
    save_file(sd, directory / "model.safetensors")


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
            r"missing model\.layers\.1\.mlp\.up_proj\.weight",
        ),
        (
            lambda sd: sd.__setitem__(
                "model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64)
            ),
            r"wrong shape model\.layers\.0\.self_attn\.k_proj\.weight \[64, 64\] "
            r"\(expected \[32, 64\]\)",
        ),
        (
            lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
            r"unexpected model\.layers\.0\.extra",
        ),
        (lambda sd: sd.pop("lm_head.weight"), r"missing lm_head\.weight"),
    ],
)
def test_checkpoint_mismatch_names_the_tensor(edit, named, tmp_path):
    save_reference(llama_config(), "LlamaForCausalLM", tmp_path)
    edit_checkpoint(tmp_path, edit)
    with pytest.raises(ConversionError, match=named):
        load_hf(tmp_path)


def test_config_shape_mismatch(tmp_path):
    save_reference(gpt2_config(), "GPT2LMHeadModel", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_positions=32)))
    with pytest.raises(
        ConversionError,
        match=r"wrong shape transformer\.wpe\.weight \[64, 64\] \(expected \[32, 64\]\)",
    ):
        load_hf(tmp_path)


def test_unsupported_model_type_dir_and_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert is_hf_dir(tmp_path)
    with pytest.raises(ConversionError, match="'t5' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ConversionError, match="no weights"):
        load_hf(tmp_path)


def test_is_hf_dir_and_resolve_local(tmp_path):
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"n_layer": 2}}))
    assert not is_hf_dir(tmp_path)
    assert resolve_hf(tmp_path) == tmp_path
    assert resolve_hf(str(tmp_path)) == tmp_path
    with pytest.raises(ConversionError, match="no such directory"):
        resolve_hf(tmp_path / "nope")


@pytest.mark.parametrize("base", ["tiny", "tiny-llama"])
def test_a_classifier_exports_to_transformers_sequence_classification(base, tmp_path):
    """Issue 18: a classify head exports as *ForSequenceClassification (score, id2label) and
    gives gptkit's probabilities on padded batches: transformers reads the last token that is
    not padding, the EOS gptkit appends; and it loads back as the same classifier."""
    torch.manual_seed(0)
    ours = perturb(GPT(preset(base, vocab_size=VOCAB, block_size=32)))
    set_head(ours, "classify", ["neg", "neutral", "pos"])
    perturb(ours.score)
    eos, pad = 1, 0
    out = export_hf(ours, tmp_path / "cls", eos_token_id=eos, pad_token_id=pad)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert config["architectures"][0].endswith("ForSequenceClassification")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager"
    ).eval()
    rows = [torch.randint(2, VOCAB, (n,)).tolist() + [eos] for n in (5, 11, 8)]
    ids = torch.full((3, 12), pad)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        want = hf(ids).logits  # [3, labels]
        got = torch.stack([ours(torch.tensor([row]))[0, -1] for row in rows])
    assert max_diff(want, got) <= TOL, max_diff(want, got)
    again = load_hf(out)
    assert (again.config.head, again.config.labels) == ("classify", ["neg", "neutral", "pos"])
    assert torch.equal(again.score.weight, ours.score.weight)
    two = GPT(preset(base, vocab_size=VOCAB))
    set_head(two, "classify", ["a", "b", "x", "y"], ["first", "second"], [2, 2])
    with pytest.raises(ConversionError, match="a Hugging Face classifier has one"):
        export_hf(two, tmp_path / "two", pad_token_id=pad)
