"""explain: recorded attention weights against the model's own attention output (MHA, GQA,
banded masks, learned and rotary positions), log-probabilities against the logits and
evaluate.continuation_logprobs, input validation, and the PNG."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TEXT, char_model
from matplotlib.image import imread

from gptkit.api import LM
from gptkit.config import preset
from gptkit.evaluate import continuation_logprobs
from gptkit.explain import explain, figure, format_table, record, token_label, trace
from gptkit.model import GPT, ContextLengthError
from gptkit.peft import Prefix
from gptkit.tokenizer import char_tokenizer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def wide(model):
    """Weights drawn wide (std 0.3) so attention is far from uniform: a wrong scale or mask
    then changes the weights visibly."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # matrices only: norms keep their unit gain
                p.normal_(0.0, 0.3)
    return model


def lm(name: str = "tiny", **overrides) -> LM:
    return LM(*char_model(name, **overrides))


CONFIGS = {
    "gpt2-learned": ("tiny", {}),
    "llama-rope-gqa": ("tiny-llama", {}),  # n_kv_head=2 < n_head=4
    "mqa": ("tiny", {"n_kv_head": 1}),
    "gpt3-banded": ("tiny", {"attention": "alternating", "local_window": 3}),  # mask tensor
    "prefix-tuned": ("tiny-llama", {}),  # 3 learned keys before the tokens': S = T + 3
}


@pytest.mark.parametrize("name", CONFIGS)
def test_weights_reproduce_the_models_attention_output(name):
    preset_name, overrides = CONFIGS[name]
    model, tok = char_model(preset_name, **overrides)
    wide(model)
    c = model.config
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    P = 3 if name == "prefix-tuned" else 0
    for block in model.blocks if P else []:
        block.attn.prefix = Prefix(torch.randn(Hkv, P, D) * 3, torch.randn(Hkv, P, D))
    ids = tok.encode("the lazy dog jumps")
    T = len(ids)
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(c.n_layer)}
    hooks = []
    for i, block in enumerate(model.blocks):
        # v is not rotated by RoPE, so the qkv output holds it as attention reads it.
        hooks.append(
            block.attn.qkv.register_forward_hook(
                lambda m, a, out, i=i: seen[i].__setitem__(
                    "v", out.view(1, T, H + 2 * Hkv, D)[0, :, H + Hkv :]
                )
            )
        )
        hooks.append(
            block.attn.proj.register_forward_pre_hook(
                lambda m, a, i=i: seen[i].__setitem__("y", a[0][0])
            )
        )
    try:
        _, weights = record(model, ids, list(range(c.n_layer)))
    finally:
        for h in hooks:
            h.remove()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, w in enumerate(weights):  # [H, T, P + T]
        assert w.shape == (H, T, P + T)
        torch.testing.assert_close(w.sum(-1), torch.ones(H, T))
        assert (w[:, :, P:][:, ~causal] == 0).all()
        v = seen[i]["v"].transpose(0, 1)  # [Hkv, T, D]
        if P:
            v = torch.cat([model.blocks[i].attn.prefix.v.detach(), v], dim=1)  # [Hkv, P + T, D]
        v = v.repeat_interleave(H // Hkv, dim=0)  # [H, P + T, D]
        y = (w @ v).transpose(0, 1).reshape(T, H * D)  # what attention hands to proj
        torch.testing.assert_close(y, seen[i]["y"], atol=1e-5, rtol=1e-4)
        uniform = causal / causal.sum(-1, keepdim=True)
        assert (w[:, :, P:] - uniform).abs().max() > 0.1  # far from uniform: the check has teeth
    if P:  # every query sees the prefix, and the drawing keeps just the token keys
        assert (weights[0][:, :, :P] > 0).all()
        figure(trace(LM(model, tok), "dog"))
    if c.attention == "alternating":  # odd layers see only keys less than 3 positions back
        far = torch.ones(T, T, dtype=torch.bool).tril(-3)
        assert (weights[1][:, far] == 0).all() and (weights[0][:, far] > 0).all()
    assert all(b.attn.probe is None for b in model.blocks)


def test_probes_are_removed_when_the_forward_pass_fails():
    model, tok = char_model()

    def boom(*_):
        raise RuntimeError("boom")

    hook = model.blocks[-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            record(model, tok.encode("the dog"), [0, 1])
    finally:
        hook.remove()
    assert all(b.attn.probe is None for b in model.blocks)


def test_logprobs_match_logits_and_evaluate():
    model, tok = char_model()  # the char tokenizer's <|endoftext|> is EOS; it has no BOS
    wide(model)
    ex = trace(LM(model, tok), "the quick fox")
    ids = [tok.eos_id, *tok.encode("the quick fox")]
    assert ex.ids == ids and ex.tokens[0] == "<|endoftext|>" and ex.logprobs[0] is None
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # [T, V]
    expected = [logp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert ex.logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert ex.top_tokens[1:] == [tok.decode([int(j)]) for j in logp[:-1].argmax(-1)]
    assert ex.next_token == tok.decode([int(logp[-1].argmax())])
    assert max(ex.top_logprobs[1:]) <= 0 and all(
        top >= lp for top, lp in zip(ex.top_logprobs[1:], ex.logprobs[1:], strict=True)
    )
    (score,) = continuation_logprobs(model, [ids[:1]], [ids[1:]])
    assert sum(ex.logprobs[1:]) == pytest.approx(score, abs=1e-4)


def test_start_token_is_bos_first_else_none():
    torch.manual_seed(0)
    with_bos = char_tokenizer(TEXT, special_tokens=["<|endoftext|>", "<s>"])
    model = GPT(preset("tiny", vocab_size=with_bos.vocab_size)).eval()
    assert trace(LM(model, with_bos), "dog").ids[0] == with_bos.bos_id
    bare = char_tokenizer(TEXT)  # no special tokens at all: the first text token is unscored
    ex = trace(LM(model, bare), "dog")
    assert ex.ids == bare.encode("dog") and ex.logprobs[0] is None
    (score,) = continuation_logprobs(model, [ex.ids[:1]], [ex.ids[1:]])
    assert sum(ex.logprobs[1:]) == pytest.approx(score, abs=1e-5)


def test_runs_in_eval_mode_and_gives_the_mode_back():
    model, tok = char_model(dropout=0.5)
    model.train()
    a, b = trace(LM(model, tok), "the dog"), trace(LM(model, tok), "the dog")
    assert a.logprobs == b.logprobs  # no dropout
    assert torch.equal(a.attention[0], b.attention[0])
    assert model.training


def test_bad_requests_raise_clear_errors(tmp_path):
    small = lm(block_size=32)
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="empty"):
        explain(small, "", out)
    with pytest.raises(ContextLengthError, match="41 tokens.*context is 32"):
        explain(small, TEXT[:40], out)  # 40 characters and the start token
    for bad in ([2], [-1], []):
        with pytest.raises(ValueError, match=r"0\.\.1 \(2 layers\)"):
            explain(small, "dog", out, layers=bad)
    with pytest.raises(ValueError, match=r"head 4: pick from 0\.\.3"):
        explain(small, "dog", out, head=4)
    with pytest.raises(ValueError, match=r"\.png"):
        explain(small, "dog", tmp_path / "x.jpg")
    assert not out.exists()


def test_png_is_valid_and_grows_with_layers(tmp_path):
    deep = lm(n_layer=4)
    sizes = {}
    for layers in ([0], [0, 1, 2, 3]):
        ex = explain(deep, "the lazy dog.\n", tmp_path / f"{len(layers)}.png", layers=layers)
        assert ex.path.read_bytes()[:8] == PNG_SIGNATURE
        assert ex.layers == layers and len(ex.attention) == len(layers)
        sizes[len(layers)] = imread(ex.path).shape
    assert sizes[4][0] > sizes[1][0] * 1.3  # a second row of heatmaps
    assert sizes[4][1] > sizes[1][1] * 1.3  # three heatmaps across
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_figure_labels_short_texts_only():
    model = lm()
    fig = figure(trace(model, "a dog\n"), head=1)
    heat, bars = fig.axes[0], fig.axes[-1]
    assert heat.get_title() == "layer 0 (head 1)"
    names = [t.get_text() for t in heat.get_xticklabels()]
    assert names == ["<|endoftext|>", "a", "␣", "d", "o", "g", "\\n"]
    assert [t.get_text() for t in bars.get_xticklabels()] == names
    assert "sum" in bars.get_title()
    dollars = char_tokenizer("a$", special_tokens=["<|endoftext|>"])
    fig = figure(trace(LM(model.model, dollars), "$a$"))  # "$a$" unescaped would be mathtext
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][1:] == [r"\$", "a", r"\$"]
    fig = figure(trace(model, TEXT))  # 46 tokens: no labels, which would overlap
    assert fig.axes[0].get_title() == "layer 0 (mean over heads)"
    assert len(fig.axes[0].get_xticks()) < 10 and len(fig.axes[-1].get_xticks()) < 10


def test_token_label_and_table():
    assert token_label(' it\'s\n\t"x"') == '␣it\'s\\n\\t"x"'
    ex = trace(lm(), "go\n")
    table = format_table(ex).splitlines()
    assert len(table) == len(ex.tokens) + 2  # header, one line a token, the next-token guess
    assert table[1].split()[1:3] == ["<|endoftext|>", "-"]
    assert table[4].split()[1] == "\\n"
    assert float(table[4].split()[2]) == pytest.approx(ex.logprobs[3], abs=1e-3)
    assert token_label(ex.top_tokens[3]) in table[4]
    assert table[-1] == f"next token guess: {token_label(ex.next_token)}"


def test_cli_writes_the_png_and_prints_the_table(char_checkpoint, tmp_path, capsys):
    from gptkit.cli import main

    out = tmp_path / "attention.png"
    assert (
        main(["explain", "--model", str(char_checkpoint), "--text", "the fox", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert imread(out).ndim == 3
    assert "next token guess" in printed and str(out) in printed
    assert main(["explain", "--model", str(char_checkpoint), "--text", "the", "--layers", "9"]) == 2
    assert "pick from 0..1" in capsys.readouterr().err
