"""Property tests for config parsing: any TOML document and any KEY=VALUE overrides, through
the real loader, give a valid config or a one-line ConfigError, never another exception.

Documents mix the real keys (TrainConfig, FinetuneConfig, the model and peft tables) with
unknown ones, and values of every TOML type: right type and range, wrong type, zero, negative,
huge, NaN and infinity, nested arrays and tables. A config that loads must also give its model
config (or a ConfigError) and survive to_dict/from_dict unchanged, as checkpoints rely on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from gptkit import resources
from gptkit.config import PRESETS, ConfigError, GPTConfig
from gptkit.train_config import FinetuneConfig, PeftConfig, TrainConfig, load_train_config

TRAIN_KEYS = sorted(f.name for f in dataclasses.fields(FinetuneConfig))  # a superset of Train's
MODEL_KEYS = sorted(f.name for f in dataclasses.fields(GPTConfig)) + ["preset"]
PEFT_KEYS = sorted(f.name for f in dataclasses.fields(PeftConfig))
WORDS = ["d", "m", "lm", "sft", "lora", "small", "tiny", "auto", "float32", "rope", "gelu", ""]


def toml_value(v) -> str:
    """A TOML value as text (inline arrays and tables, so one `key = value` line each)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return (
            "nan"
            if math.isnan(v)
            else "inf"
            if v == math.inf
            else "-inf"
            if v < -1e308
            else repr(v)
        )
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON strings are TOML basic strings (mostly)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(d: dict) -> str:
    return "".join(f"{toml_value(k)} = {toml_value(v)}\n" for k, v in d.items())


scalars = st.one_of(
    st.booleans(),
    st.integers(-3, 3),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


small = st.one_of(st.integers(-2, 8), st.sampled_from([0.0, 0.5, 1e-5, -1.0]))
odd_values = st.one_of(small, values)  # biased to the small numbers shapes and rates take


def perturbed(valid: dict, keys: list[str], most: int = 3) -> st.SearchStrategy[dict]:
    """`valid` with up to `most` keys (real ones mostly, some unknown) set to any value: each
    document is a few mistakes away from a valid config, so the checks past the first mistake
    (and the model table's, after loading) are reached too."""
    changes = st.dictionaries(
        st.sampled_from(keys) | st.text(max_size=6), odd_values, max_size=most
    )
    return changes.map(lambda c: {**valid, **c})


def documents(required: dict) -> st.SearchStrategy[dict]:
    presets = st.sampled_from(["tiny", "small", "tiny-llama"]) | values
    model = st.builds(
        lambda preset, rest: {"preset": preset, **rest},
        presets,
        perturbed({}, MODEL_KEYS),
    )
    return st.builds(
        lambda top, model, peft: {**top, **model, **peft},
        perturbed(required, TRAIN_KEYS, most=2),
        st.fixed_dictionaries({}, optional={"model": model}),
        st.fixed_dictionaries({}, optional={"peft": perturbed({"method": "lora"}, PEFT_KEYS)}),
    )


REQUIRED = {
    TrainConfig: {"data_dir": "d"},
    FinetuneConfig: {"init_from": "m", "data": "x", "objective": "sft"},
}
override_keys = st.one_of(
    st.sampled_from(TRAIN_KEYS),
    st.sampled_from(MODEL_KEYS).map("model.{}".format),
    st.sampled_from(PEFT_KEYS).map("peft.{}".format),
    st.text(max_size=8),
)
overrides = st.lists(
    st.builds(
        lambda key, sep, value: f"{key}{sep}{value}",
        override_keys,
        st.sampled_from(["=", "=", ""]),
        st.one_of(odd_values.map(toml_value), st.text(max_size=10)),
    ),
    max_size=2,
)


def check_loads_or_refuses(path, items: list[str], cls: type[TrainConfig]) -> None:
    try:
        config = load_train_config(path, items, cls)
    except ConfigError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)
        event("ConfigError")
        return
    event("loaded")
    assert type(config) is cls
    assert cls.from_dict(config.to_dict()) == config
    if cls is TrainConfig:
        try:
            model = config.model_config(vocab_size=256)
        except ConfigError as e:
            assert str(e).strip() and "\n" not in str(e), repr(str(e))
            event("model: ConfigError")
        else:
            event("model: valid")
            assert isinstance(model, GPTConfig) and model.n_head % model.n_kv_head == 0


@pytest.fixture(scope="module")
def toml_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-config") / "config.toml"


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
@FUZZ
@given(data=st.data(), items=overrides)
def test_any_toml_document_and_overrides_load_or_fail_in_one_line(toml_path, cls, data, items):
    doc = data.draw(documents(REQUIRED[cls]), label="document")
    toml_path.write_text(toml_document(doc), encoding="utf-8")
    check_loads_or_refuses(toml_path, items, cls)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_as_a_toml_file_loads_or_fails_in_one_line(toml_path, text):
    toml_path.write_text(text, encoding="utf-8")
    check_loads_or_refuses(toml_path, ["data_dir=d"], TrainConfig)


@settings(max_examples=100, deadline=None)
@given(items=overrides)
def test_overrides_alone_load_or_fail_in_one_line(items):
    check_loads_or_refuses(None, ["data_dir=d", *items], TrainConfig)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        # What the fuzzing found, each formerly another exception type or a silent NaN:
        (["model.preset=[1]"], "unknown preset [1]"),  # TypeError: unhashable list
        (["model.n_kv_head=0"], "n_kv_head must be positive"),  # ZeroDivisionError
        (["model.n_layer=2.5"], "n_layer must be an integer"),  # failed later, in range()
        (["model.labels=[1]"], "labels must be a list of strings"),
        (["weight_decay=nan"], "weight_decay must be a finite number"),  # trained with NaN
        (["bad\nkey=1"], "unknown training config key 'bad\\nkey'"),  # was two lines
        # What an outside probe found (issue 23), each formerly a traceback:
        (["model.block_size=4611686018427387904"], "block_size=4611686018427387904 is past"),
        (["model.vocab_size=4611686018427387904"], "vocab_size=4611686018427387904 is past"),
        (["model.n_embd=1099511627776", "model.n_head=1"], "n_embd=1099511627776 is past"),
        (["model.n_embd=16777216", "model.n_head=1"], "a weight of this"),
        (["model.labels=" + "[" * 100_000 + "]" * 100_000], "nests too deep"),  # RecursionError
        (['out_dir=""'], "out_dir is empty"),  # wrote the run into the current directory
    ],
)
def test_values_the_fuzzing_found_are_clear_errors(items, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config = load_train_config(None, ["data_dir=d", *items])
        config.model_config(vocab_size=256)
    assert "\n" not in str(info.value)


SIZES = [
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "n_kv_head",
    "head_dim",
    "intermediate_size",
]


@settings(max_examples=200, deadline=None)
@given(
    preset=st.sampled_from(["tiny", "tiny-llama"]),
    sizes=st.dictionaries(
        st.sampled_from(SIZES), st.integers(1, 64) | st.integers(1, 2**64), min_size=1
    ),
)
@example(preset="tiny", sizes={"block_size": 2**62})
@example(preset="tiny", sizes={"vocab_size": 2**62})
@example(preset="tiny-llama", sizes={"n_embd": 2**40, "n_head": 1, "n_kv_head": 1})
def test_any_model_sizes_give_a_memory_estimate_or_one_line(preset, sizes):
    """Sizes up to 2**64 give a ConfigError or a config whose memory estimate (resources.py,
    shapes on the meta device) is computed: 2**62 rows overflowed torch's storage size inside
    the memory check itself, a traceback instead of "too big for this machine"."""
    overrides = {"head_dim": None, "intermediate_size": None, **sizes}
    try:
        config = GPTConfig.from_dict({**PRESETS[preset], **overrides})
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))
        event("ConfigError")
        return
    event("valid")
    need = resources.training_need(config, batch_size=1)
    assert need.weights >= resources.inference_need(config).weights > 0
