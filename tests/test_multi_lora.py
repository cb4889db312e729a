"""Many LoRA adapters on one server (multi_lora.load_loras, MultiLoRALinear, the engine's per-row
adapters, `gptkit serve --adapter NAME=DIR`).

Every text is checked against `gptkit.load(base, adapter=DIR)` generating alone, so an adapter
applied to the wrong row, to no row, or with the wrong scale shows up as different text. The
adapters are drawn large (the tiny model's weights are N(0, 0.3)) and the tests check that
they do change the text, each its own way.
"""

import threading

import pytest
import torch
from conftest import tiny_chat_lm
from fastapi.testclient import TestClient

import gptkit
from gptkit.chat_template import chat_prompt, turn_stops
from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.config import ConfigError, preset
from gptkit.engine import Engine, Sequence
from gptkit.generation import SampleConfig
from gptkit.model import GPT
from gptkit.multi_lora import MultiLoRALinear, load_loras
from gptkit.peft import apply_peft, peft_config, save_adapter
from gptkit.serve import ServeConfig, create_app
from gptkit.surgery import resize_vocab
from gptkit.tokenizer_files import load_tokenizer
from gptkit.train_config import PeftConfig

BASE = "base"
CHAT = [{"role": "user", "content": "hello there, how are you?"}]
PROMPT = "hello there, how"
# Four LoRA adapters that differ in rank, scale and the layers they adapt.
LORAS = {
    "a": PeftConfig(method="lora", r=4, alpha=8.0),  # every linear layer
    "b": PeftConfig(method="lora", r=8, alpha=8.0, targets=["attn.qkv"]),
    "c": PeftConfig(method="lora", r=2, alpha=4.0, targets=["mlp.fc", "mlp.proj"]),
    "d": PeftConfig(method="lora", r=4, alpha=2.0, targets=["attn.proj", "mlp.fc"]),
}
# Adapter b brings its own chat template (an SFT run may), which its chat requests must use.
B_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.content }}\n{% endfor %}<|im_start|>"


def _randomize(model, seed: int) -> None:
    """Give the trainable (B zero-initialised) LoRA tensors large values, as training might."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _adapter(directory, base_dir, config: PeftConfig, seed: int, tokenizer=None):
    lm = tiny_chat_lm()
    apply_peft(lm.model, config)
    _randomize(lm.model, seed)
    return save_adapter(lm.model, directory, base=str(base_dir), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"base": the tiny chat model's checkpoint, name: a LoRA adapter directory on it}."""
    root = tmp_path_factory.mktemp("multi_lora")
    lm = tiny_chat_lm()
    base = save_checkpoint(root / "base", lm.model, lm.tokenizer)
    tok_b = load_tokenizer(base / "tokenizer")
    tok_b.chat_template = B_TEMPLATE
    found = {BASE: base}
    for seed, (name, config) in enumerate(LORAS.items(), start=1):
        tokenizer = {"a": lm.tokenizer, "b": tok_b}.get(name)  # c and d ship none
        found[name] = _adapter(root / name, base, config, seed, tokenizer)
    return found


def _served_lm(dirs, layout: str = "rows"):
    """The base as `gptkit serve` loads it: row-major weights for batching (the default),
    the decode layout (--max-batch 1), or int8."""
    options = {
        "rows": dict(decode_layout=False),
        "decode": dict(decode_layout=True),
        "int8": dict(quantize="int8"),
    }[layout]
    return gptkit.load(dirs[BASE], device="cpu", **options), options


def _reference(dirs, name: str, options: dict):
    """What `gptkit.load(base, adapter=DIR)` (or the plain base) generates alone."""
    adapter = None if name == BASE else dirs[name]
    return gptkit.load(dirs[BASE], device="cpu", adapter=adapter, **options)


def _chat_reference(lm, max_new_tokens: int) -> str:
    prompt = chat_prompt(lm.tokenizer, CHAT)
    stops = turn_stops(lm.tokenizer)
    return lm.generate(prompt, stop=stops, max_new_tokens=max_new_tokens, temperature=0)[0]


def local(app) -> TestClient:
    return TestClient(app, base_url="http://localhost")


# --- the layer --------------------------------------------------------------------------


def test_each_row_of_a_batch_gets_its_own_adapter_and_row_0_the_base(dirs):
    """One forward pass of a batch whose rows name different adapters equals each row run
    through its own single-adapter model; outside `select`, the model is the base exactly."""
    lm, _ = _served_lm(dirs)
    x = torch.randint(
        0, lm.tokenizer.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0)
    )
    plain = lm.model(x)
    loras = load_loras(lm.model, {n: dirs[n] for n in LORAS})
    assert loras.names == list(LORAS)
    wrapped = [m for m in lm.model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(wrapped) == 2 * 4  # every linear of the 2 blocks is adapted by some adapter
    assert torch.equal(lm.model(x), plain)  # no rows selected: the base model, unchanged
    rows = [0, 1, 2, 3, 4, 2]
    with loras.select(rows):
        batched = lm.model(x.expand(len(rows), -1))  # [6, T, V]
    assert loras.rows is None  # the selection ends with the block
    for i, adapter in enumerate(rows):
        name = BASE if adapter == 0 else loras.names[adapter - 1]
        alone = _reference(dirs, name, dict(decode_layout=False)).model(x)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4)
        if adapter:
            assert (batched[i] - plain[0]).abs().max() > 0.1, f"adapter {name} changes nothing"


def test_select_refuses_unknown_adapters_and_mismatched_batches(dirs):
    lm, _ = _served_lm(dirs)
    loras = load_loras(lm.model, {"a": dirs["a"]})
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="not all in 0..1"), loras.select([0, 2]):
        pass
    with pytest.raises(ValueError, match="named 1 rows for a batch of 2"), loras.select([1]):
        lm.model(x)
    assert loras.rows is None  # a failed pass leaves no selection behind
    with pytest.raises(ConfigError, match="already has adapters"):
        load_loras(lm.model, {"b": dirs["b"]})


# --- the server: each adapter equals its single-adapter model ---------------------------


@pytest.mark.parametrize("layout", ["rows", "decode", "int8"])
def test_every_adapter_served_equals_its_single_adapter_model(dirs, layout):
    """Completions and chat for each adapter name (and the base name) are token-identical to
    `gptkit.load(base, adapter=DIR)` generating greedily alone, whatever the base weights'
    layout (row-major, the CPU decode layout, int8) under the adapters."""
    lm, options = _served_lm(dirs, layout)
    adapters = {n: dirs[n] for n in LORAS}
    config = ServeConfig(max_batch=4 if layout != "decode" else 1)
    texts = {}
    with local(create_app(lm, BASE, config, adapters)) as client:
        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [BASE, *LORAS]
        assert [m.get("parent") for m in models] == [None, *[BASE] * len(LORAS)]
        for name in [BASE, *LORAS]:
            ref = _reference(dirs, name, options)
            body = {"model": name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
            reply = client.post("/v1/completions", json=body).json()
            assert reply.get("model") == name, reply
            texts[name] = reply["choices"][0]["text"]
            assert texts[name] == ref.generate(PROMPT, max_new_tokens=24, temperature=0)[0], name
            body = {"model": name, "messages": CHAT, "max_tokens": 16, "temperature": 0}
            chat = client.post("/v1/chat/completions", json=body).json()
            assert chat["choices"][0]["message"]["content"] == _chat_reference(ref, 16), name
    assert len(set(texts.values())) == len(texts), texts  # every adapter writes its own text


# --- batching: different adapters in the same engine steps -------------------------------


class Collector:
    def __init__(self, n: int):
        self.texts, self.reasons = [""] * n, [None] * n
        self.done = threading.Event()

    def emitter(self, i: int):
        def emit(event):
            kind, value = event
            if kind == "text":
                self.texts[i] += value
            elif kind in ("done", "error"):
                self.reasons[i] = value if kind == "done" else f"error: {value}"
                if all(r is not None for r in self.reasons):
                    self.done.set()

        return emit


def test_requests_for_different_adapters_decode_in_the_same_steps(dirs):
    """8 requests over 4 rows: every adapter and the base, finishing at different steps (rows
    are compacted and refilled mid-run), one long prompt prefilled a chunk at a time while
    the others decode. Each text equals its adapter's model generating alone."""
    lm, options = _served_lm(dirs)
    load_loras(lm.model, {n: dirs[n] for n in LORAS})
    long_prompt = "hello there, how are you? I am fine, thanks. " * 3
    jobs = [  # (adapter index, prompt, tokens)
        (1, PROMPT, 30),
        (2, PROMPT, 12),
        (3, PROMPT, 40),
        (4, PROMPT, 20),
        (0, PROMPT, 25),
        (2, long_prompt, 30),
        (4, "thanks", 16),
        (1, "I am", 22),
    ]
    engine = Engine(lm, max_batch=4, prefill_chunk=8)
    got = Collector(len(jobs))
    for i, (adapter, prompt, tokens) in enumerate(jobs):  # all queued before the engine runs
        sample = SampleConfig(max_new_tokens=tokens, temperature=0)
        engine.submit(
            Sequence(lm.tokenizer.encode(prompt), sample, got.emitter(i), adapter=adapter)
        )
    engine.start()
    try:
        assert got.done.wait(120)
    finally:
        engine.close()
    assert engine.stats.max_batch == 4  # the first four, one per adapter, in the same steps
    assert engine.stats.prefill_chunks > len(jobs)  # the long prompt came in chunks
    names = [BASE, *LORAS]
    refs = {name: _reference(dirs, name, options) for name in names}
    for i, (adapter, prompt, tokens) in enumerate(jobs):
        expected = refs[names[adapter]].generate(prompt, max_new_tokens=tokens, temperature=0)[0]
        assert got.texts[i] == expected, f"job {i} ({names[adapter]}): {got.reasons[i]}"
    assert len({got.texts[i][:12] for i in range(5)}) == 5  # same prompt, five different texts


def test_the_engine_refuses_an_adapter_the_model_lacks(dirs):
    lm, _ = _served_lm(dirs)
    engine = Engine(lm)
    seq = Sequence([1, 2], SampleConfig(max_new_tokens=2), lambda e: None, adapter=1)
    with pytest.raises(ValueError, match="adapter 1 is not loaded"):
        engine.submit(seq)


# --- errors -------------------------------------------------------------------------------


def test_unknown_model_name_is_404_naming_what_is_served(dirs):
    lm, _ = _served_lm(dirs)
    with local(create_app(lm, BASE, ServeConfig(), {"a": dirs["a"]})) as client:
        reply = client.post("/v1/completions", json={"model": "e", "prompt": "hi"})
        assert reply.status_code == 404
        error = reply.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "'base', 'a'" in error["message"]


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkit: error:") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "specs, message",
    [
        (["=x"], "give NAME=DIR"),
        (["x="], "give NAME=DIR"),
        (["x=no/such/dir"], "not an adapter directory"),
        (["a={a}", "a={b}"], "given twice"),
        (["{a}", "b={b}"], "puts one adapter on the model itself"),
        (["{a}", "{b}"], "puts one adapter on the model itself"),
    ],
)
def test_bad_adapter_flags_are_one_line_errors_before_loading(capsys, dirs, specs, message):
    argv = ["serve", "--model", "no/such/model", "--port", "0"]  # never loaded: flags first
    for spec in specs:
        argv += ["--adapter", spec.format(a=dirs["a"], b=dirs["b"])]
    assert message in _cli_error(capsys, argv)


def test_non_lora_adapters_and_other_bases_are_refused_naming_the_directory(capsys, dirs, tmp_path):
    for method in ("prefix", "adapter"):
        directory = _adapter(tmp_path / method, dirs[BASE], PeftConfig(method=method), 9)
        argv = ["serve", "--model", str(dirs[BASE]), "--adapter", f"x={directory}"]
        err = _cli_error(capsys, argv + ["--adapter", f"a={dirs['a']}", "--port", "0"])
        assert f"{directory} is a {method} adapter" in err
    # A LoRA of another base: a wider model (shapes) and a larger vocabulary.
    lm = tiny_chat_lm()
    for name, model in (
        ("wide", GPT(preset("tiny-llama", vocab_size=lm.model.config.vocab_size, n_embd=32))),
        ("vocab", resize_vocab(lm.model, lm.tokenizer.vocab_size + 8)),
    ):
        apply_peft(model, PeftConfig(method="lora"))
        directory = save_adapter(model, tmp_path / name, base="another")
        argv = ["serve", "--model", str(dirs[BASE]), "--adapter", f"x={directory}"]
        err = _cli_error(capsys, argv + ["--port", "0"])
        assert str(directory) in err and ("does not fit" in err or "token ids" in err)
    # A LoRA whose weights hold a NaN (it would poison every row that uses it).
    lm = tiny_chat_lm()
    apply_peft(lm.model, LORAS["a"])
    with torch.no_grad():
        next(p for p in lm.model.parameters() if p.requires_grad)[0, 0] = float("nan")
    directory = save_adapter(lm.model, tmp_path / "nan", base=str(dirs[BASE]))
    with pytest.raises(ConfigError, match="NaN or infinity"):
        load_loras(_served_lm(dirs)[0].model, {"x": directory})
    # A tokenizer other than the base's vocabulary, shipped with an adapter.
    other = load_tokenizer(dirs[BASE] / "tokenizer").add_special_tokens(["<|extra|>"])
    directory = _adapter(tmp_path / "tok", dirs[BASE], LORAS["a"], 9, tokenizer=other)
    with pytest.raises(ConfigError, match="not the base model's vocabulary"):
        create_app(_served_lm(dirs)[0], BASE, ServeConfig(), {"x": directory})
    with pytest.raises(ConfigError, match="is the base model's"):
        create_app(_served_lm(dirs)[0], BASE, ServeConfig(), {BASE: dirs["a"]})


def test_cli_forms_of_adapter(monkeypatch, dirs):
    """`--adapter DIR` puts one adapter on the model as before; `--adapter NAME=DIR` ones are
    served side by side, the model itself left plain."""
    import gptkit.serve

    calls = []
    monkeypatch.setattr(gptkit.serve, "serve", lambda *args: calls.append(args))
    assert main(["serve", "--model", str(dirs[BASE]), "--adapter", str(dirs["a"])]) == 0
    lm, name, _, adapters, *_retrieval = calls[-1]
    assert name == BASE and adapters == {}
    assert peft_config(lm.model).method == "lora"
    argv = ["serve", "--model", str(dirs[BASE]), "--name", "m"]
    assert main([*argv, "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}"]) == 0
    lm, name, _, adapters, *_retrieval = calls[-1]
    assert name == "m" and adapters == {"a": str(dirs["a"]), "b": str(dirs["b"])}
    assert peft_config(lm.model) is None
