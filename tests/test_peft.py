"""LoRA and its kin, adapters, prefix and prompt tuning: identity at start, only adapter weights
learn, LoRA merges exactly, adapters save alone and load back onto the base model, checkpoints
keep them; AdaLoRA's ranks follow its budget; an int8 base trains LoRA."""

import pytest
import torch

from gptkit import adalora
from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.config import ConfigError, preset
from gptkit.generation import SampleConfig, generate
from gptkit.model import GPT, ContextLengthError
from gptkit.peft import (
    MERGEABLE,
    LoRALinear,
    apply_peft,
    load_adapter,
    merge_peft,
    save_adapter,
)
from gptkit.quantize import Int8Linear
from gptkit.surgery import set_head
from gptkit.train_config import PeftConfig

METHODS = ["lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt"]


def tiny(name="tiny-llama", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset(name, **overrides)).eval()


def randomize(model: GPT) -> None:
    """Give the trainable (zero-initialised) parts values, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


X = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "ia3", "adapter"])
def test_a_fresh_method_leaves_outputs_unchanged(method):
    model = tiny()
    before = model(X)
    apply_peft(model, PeftConfig(method=method))
    # DoRA rescales each row by ||W|| / ||W||, which rounds: equal to float32 rounding
    torch.testing.assert_close(model(X), before, rtol=1e-6, atol=1e-6)


def test_a_fresh_prefix_is_real_keys_and_values_of_the_model():
    """Li & Liang initialise prefixes from real activations: ours are the model's own keys
    and values for a few tokens, so the prefix is on the scale attention expects."""
    model = tiny()
    apply_peft(model, PeftConfig(method="prefix", prefix_length=4))
    prefix = model.blocks[0].attn.prefix
    assert prefix.k.shape == (2, 4, 16)  # [Hkv, P, D] of tiny-llama
    assert 0.1 < prefix.k.std() < 10 and prefix.v.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", ["lm", "classify"])
def test_only_adapter_parameters_receive_gradients(method, head):
    model = tiny()
    if head == "classify":
        set_head(model, "classify", ["neg", "pos"])
    apply_peft(model, PeftConfig(method=method))
    randomize(model)  # at init B (up) is zero, which zeroes A's (down's) gradient
    model.train()
    y = torch.randint(0, 2 if head == "classify" else 256, X.shape)
    _, loss = model(X, y)
    loss.backward()
    marks = {
        "lora": ("lora_A", "lora_B"),
        "dora": ("lora_A", "lora_B", "magnitude"),
        "adalora": ("lora_A", "lora_B", "lora_E"),
        "ia3": ("ia3_l",),
        "adapter": (".down.", ".up."),
        "prefix": ("prefix",),
        "prompt": ("prompt.",),
    }
    for name, p in model.named_parameters():
        adapter = any(m in name for m in marks[method]) or name.startswith("score.")
        assert p.requires_grad == adapter, name
        if adapter:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.5 * model.num_params()


def test_lora_merge_and_unmerge_give_the_same_outputs():
    model = tiny()
    apply_peft(model, PeftConfig(method="lora", r=4, alpha=8))
    randomize(model)
    unmerged = model(X)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 2 * 4  # qkv, proj, fc, proj in each of 2 blocks
    for m in loras:
        m.merge()
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    for m in loras:
        m.unmerge()
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)
    merged = merge_peft(model)  # a plain GPT again: nothing of LoRA left
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny().state_dict())
    torch.testing.assert_close(merged(X), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_ia3_scales_keys_values_and_hidden_units_and_merges(name):
    """(IA)^3's vectors: each block's keys and values (not its queries) and MLP hidden units;
    merged into those rows and columns, the plain model computes the same."""
    model = tiny(name)
    c = model.config
    apply_peft(model, PeftConfig(method="ia3"))
    per_block = 2 * c.n_kv_head * c.head_dim + c.intermediate_size
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == c.n_layer * per_block
    randomize(model)
    with torch.no_grad():
        scaled, block = model(X), model.blocks[0]
        queries = block.attn.qkv.base(torch.ones(1, c.n_embd))[..., : c.n_head * c.head_dim]
        assert torch.equal(
            block.attn.qkv(torch.ones(1, c.n_embd))[..., : queries.shape[-1]], queries
        )
        merged = merge_peft(model)
        assert set(merged.state_dict()) == set(tiny(name).state_dict())
        torch.testing.assert_close(merged(X), scaled, rtol=1e-5, atol=1e-5)
        assert (merged(X) - tiny(name)(X)).abs().max() > 1e-3  # the vectors did something


@pytest.mark.parametrize("method", ["dora", "adalora"])
def test_dora_and_adalora_merge_into_a_plain_model(method):
    model = apply_peft(tiny(), PeftConfig(method=method, r=4, alpha=8))
    randomize(model)
    with torch.no_grad():
        unmerged = model(X)
        merged = merge_peft(model)
        assert set(merged.state_dict()) == set(tiny().state_dict())
        torch.testing.assert_close(merged(X), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(quantize="int8"), "set peft.method"),
        (dict(method="dora", quantize="int8"), "DoRA renormalises"),
        (dict(method="adalora", r=4, target_r=8), "target_r=8 must be <= peft.r=4"),
        (dict(quantize="int4"), "is not one of"),
    ],
)
def test_bad_peft_settings_are_one_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        PeftConfig(**settings)


def test_lora_targets_pick_layers_and_a_typo_is_an_error():
    model = apply_peft(tiny(), PeftConfig(method="lora", targets=["attn.qkv"]))
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert not isinstance(model.blocks[0].mlp.fc, LoRALinear)
    with pytest.raises(ConfigError, match="match no linear layer"):
        apply_peft(tiny(), PeftConfig(method="lora", targets=["q_proj"]))


@pytest.mark.parametrize("method", METHODS)
def test_adapter_only_save_loads_back_onto_the_base(tmp_path, method):
    base_state = {k: v.clone() for k, v in tiny().state_dict().items()}
    model = tiny()
    set_head(model, "tag", ["O", "B-X", "I-X"])
    apply_peft(model, PeftConfig(method=method))
    randomize(model)
    expected = model(X)
    out = save_adapter(model, tmp_path / "adapter", base="tiny-llama")
    stored = sum(f.stat().st_size for f in out.iterdir())
    assert stored < 0.5 * sum(v.numel() * 4 for v in base_state.values())

    fresh = tiny()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base_state.items())
    load_adapter(fresh, out)
    assert fresh.config.labels == ["O", "B-X", "I-X"]
    torch.testing.assert_close(fresh(X), expected)


def test_an_adapter_refuses_a_base_of_another_size(tmp_path):
    model = apply_peft(tiny(), PeftConfig(method="lora"))
    out = save_adapter(model, tmp_path / "a", base="tiny-llama")
    with pytest.raises(ConfigError, match="does not fit"):
        load_adapter(tiny(n_embd=32, intermediate_size=64), out)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_keep_the_method_and_reload_identically(tmp_path, method):
    model = apply_peft(tiny(), PeftConfig(method=method))
    randomize(model)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["peft"]["method"] == method
    torch.testing.assert_close(loaded(X), model(X))
    # the frozen/trainable split survives: a resumed run trains the same parameters
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_prefix_generation_with_the_kv_cache_equals_full_forwards(name, method):
    """The prefix joins every attention call, with or without a cache: greedy decoding with
    the cache must pick the tokens a full forward pass picks at each step."""
    model = apply_peft(tiny(name), PeftConfig(method=method, prefix_length=5))
    randomize(model)
    prompt = X[0, :8].tolist()
    out = generate(model, [prompt], SampleConfig(max_new_tokens=10, temperature=0.0))[0]
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_dora_keeps_its_norms_while_generating_and_drops_them_when_a_weight_changes():
    model = apply_peft(tiny(), PeftConfig(method="dora", r=4, alpha=8))
    randomize(model)
    with torch.no_grad():
        first = model(X)
        torch.testing.assert_close(model(X), first, rtol=0, atol=0)  # from the kept norms
        model.blocks[0].attn.qkv.lora_B.mul_(2)  # a change the version counter sees
        changed = model(X)
    assert not torch.equal(changed, first)
    torch.testing.assert_close(changed, model(X), rtol=1e-6, atol=1e-6)  # with gradients: fresh


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_a_soft_prompt_is_embeddings_before_the_input(name):
    """Prompt tuning computes what the frozen model computes on the prompt's embeddings
    followed by the input's (positions 0..P-1, then P on), read at the input's positions."""
    model = apply_peft(tiny(name), PeftConfig(method="prompt", prefix_length=3))
    randomize(model)
    prompt = model.prompt.embeddings  # [P, C]
    model.prompt = None  # the same frozen model without it
    for block in model.blocks:
        block.attn.prefix = None
    with torch.no_grad():
        x = torch.cat([prompt.expand(len(X), -1, -1), model.tok_emb(X)], dim=1)
        positions = torch.arange(x.shape[1]).expand(len(X), -1)
        h, rope = model.embed(x, positions)
        masks = model._masks(*h.shape[:2], 0, None, h.device)
        for block in model.blocks:
            h = block(h, rope, masks, None)
        expected = model.head(model.norm_f(h))[:, 3:]
    soft = apply_peft(tiny(name), PeftConfig(method="prompt", prefix_length=3))
    with torch.no_grad():
        soft.prompt.embeddings.copy_(prompt)
        torch.testing.assert_close(soft(X), expected, rtol=1e-5, atol=1e-5)
    # the prompt takes 3 of the 128 positions
    with pytest.raises(ContextLengthError, match="context of 125 positions"):
        soft(torch.zeros(1, 126, dtype=torch.long))


def test_adalora_budget_falls_as_a_cube():
    """r for tinit steps, target_r from total - tfinal on, a cube in between."""
    steps = [adalora.budget(s, 100, 12, 4, 10, 20) for s in (0, 10, 45, 80, 100)]
    assert steps == [12, 12, 4 + 8 * 0.5**3, 4, 4]


def test_adalora_training_ends_on_its_target_rank_with_ranks_that_differ():
    """A few steps of the full procedure on a toy task: the orthogonality penalty is part of
    the loss, the allocator zeroes singular values down to target_r per layer on average,
    unevenly, and the final ranks stay fixed while training goes on."""
    config = PeftConfig(method="adalora", r=6, target_r=2, alpha=12, tinit=2, tfinal=3)
    model = apply_peft(tiny(), config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    y = torch.roll(X, 1, dims=1)
    for step in range(1, 15):
        _, loss = model(X, y)
        reg = adalora.penalty(model, config.orth_reg)
        assert reg is not None and reg.item() > 0
        (loss + reg).backward()
        optimizer.step()
        adalora.allocate(model, step, 12, config)  # a 12-step schedule, run on to 14
        optimizer.zero_grad()
        if step == 12:
            final = adalora.ranks(model)
    ranks = adalora.ranks(model)
    assert ranks == final  # kept after the schedule's end
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget: target_r on average
    assert len(set(ranks.values())) > 1  # moved between layers, not cut evenly
    assert "total rank 16 over 8 layers" in adalora.describe_ranks(model)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "adapter", "prefix", "prompt"])
def test_an_int8_base_trains_the_adapter_and_merges_into_a_float_model(tmp_path, method):
    """QLoRA's idea: the frozen linear layers in int8 (a quarter of the bytes); the loss's
    gradient reaches the adapter through them, and the result merges, saves and reloads."""
    fp32 = apply_peft(tiny(), PeftConfig(method=method))
    model = apply_peft(tiny(), PeftConfig(method=method, quantize="int8"))
    int8 = [m for m in model.blocks.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 4 * 2  # every frozen linear of both blocks
    stored = sum(t.numel() * t.element_size() for m in int8 for t in m.state_dict().values())
    assert stored < 0.3 * sum(m.in_features * m.out_features * 4 for m in int8)  # float32's
    # int8 weights move the logits a little (7-bit weights, 8-bit inputs), not a lot
    torch.testing.assert_close(model(X), fp32(X), rtol=0, atol=0.05)
    randomize(model)
    model.train()
    _, loss = model(X, torch.roll(X, 1, dims=1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.eval()
    with torch.no_grad():
        expected = model(X)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["peft"]["quantize"] == "int8" and "quantize" not in meta
    torch.testing.assert_close(loaded(X), expected)
    if method in MERGEABLE:
        with torch.no_grad():
            merged = merge_peft(loaded)
            assert set(merged.state_dict()) == set(tiny().state_dict())
            torch.testing.assert_close(merged(X), expected, rtol=0, atol=0.02)
