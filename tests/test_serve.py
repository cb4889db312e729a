"""The serving engine (continuous batching) and the OpenAI-compatible HTTP API.

Every generated text is checked against `LM.generate` on the same model (greedy, or sampling
with the same seed), so a batching or KV-cache mistake shows up as different text.
"""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_chat_lm
from fastapi.testclient import TestClient
from live_server import LiveServer

from gptkit.chat_template import chat_prompt, turn_stops
from gptkit.config import ConfigError
from gptkit.engine import Engine, EngineBusy, Sequence
from gptkit.generation import SampleConfig
from gptkit.peft import apply_peft
from gptkit.serve import ServeConfig, create_app
from gptkit.surgery import resize_vocab
from gptkit.train_config import PeftConfig

NAME = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm()


@pytest.fixture(scope="module")
def client(lm):
    with local(create_app(lm, NAME, ServeConfig(max_batch=4, max_body_bytes=4096))) as c:
        yield c


def local(app) -> TestClient:
    """A test client that names the server as a local browser would (Host: localhost): a
    server bound to a loopback address answers no other Host."""
    return TestClient(app, base_url="http://localhost")


def _chat_reference(lm, messages=CHAT, **sampling) -> str:
    prompt = chat_prompt(lm.tokenizer, messages)
    return lm.generate(prompt, stop=turn_stops(lm.tokenizer), **sampling)[0]


class Collector:
    """Engine events of several sequences, gathered until each is done."""

    def __init__(self, n: int):
        self.texts, self.reasons = [""] * n, [None] * n
        self.all_done = threading.Event()

    def emitter(self, i: int):
        def emit(event):
            kind, value = event
            if kind == "text":
                self.texts[i] += value
            else:
                self.reasons[i] = value
                if all(r is not None for r in self.reasons):
                    self.all_done.set()

        return emit


# --- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_tuned(lm):
    """The same model with a soft prompt of 4 trained-looking embeddings (peft.py)."""
    tuned = copy.copy(lm)
    tuned.model = apply_peft(copy.deepcopy(lm.model), PeftConfig(method="prompt", prefix_length=4))
    with torch.no_grad():
        tuned.model.prompt.embeddings.add_(torch.randn(4, lm.config.n_embd) * 0.5)
    return tuned


@pytest.mark.parametrize("which", ["plain", "prompt-tuned"])
def test_engine_batches_requests_and_matches_single_generation(lm, prompt_tuned, which):
    """More requests than slots, of different lengths, sampled with seeds: each text equals
    what LM.generate makes alone. The context (512) is longer than the first cache (256), so
    the cache also grows mid-run. A soft prompt's keys and values join every row's."""
    lm = prompt_tuned if which == "prompt-tuned" else lm
    prompts = ["hello", "how are you? I am fine", "thanks", "hello there, how", "I", "fine."]
    engine = Engine(lm, max_batch=3).start()
    got = Collector(len(prompts))
    try:
        for i, p in enumerate(prompts):
            sample = SampleConfig(max_new_tokens=40 + 60 * i, temperature=1.0, seed=i)
            engine.submit(Sequence(lm.tokenizer.encode(p), sample, got.emitter(i)))
        assert got.all_done.wait(120)
    finally:
        engine.close()
    for i, p in enumerate(prompts):
        expected = lm.generate(p, max_new_tokens=40 + 60 * i, temperature=1.0, seed=i)[0]
        assert got.texts[i] == expected, f"prompt {i}"
    assert engine.stats.max_batch == 3  # decoded together, not one request at a time
    assert engine.stats.steps < engine.stats.tokens
    if which == "plain":  # (the prompt-tuned model's samples end sooner: EOS)
        assert engine.stats.cache_columns > 256


def test_engine_never_samples_ids_the_tokenizer_lacks():
    """A model whose vocabulary is padded past its tokenizer's (as many HF models' are): the
    padding ids have no text, so the engine must never pick them, even when they score best."""
    padded = tiny_chat_lm()
    n = padded.tokenizer.vocab_size
    resize_vocab(padded.model, n + 16)
    # The padding ids get the best logits: without the engine's mask, greedy picks one.
    padded.model.register_forward_hook(
        lambda m, args, out: out.index_fill(-1, torch.arange(n, n + 16), 1e4)
    )
    got = Collector(2)
    engine = Engine(padded).start()
    try:
        for i, temperature in enumerate((0.0, 1.0)):
            sample = SampleConfig(max_new_tokens=20, temperature=temperature, seed=i)
            engine.submit(Sequence(padded.tokenizer.encode("hello"), sample, got.emitter(i)))
        assert got.all_done.wait(30)
    finally:
        engine.close()
    assert got.reasons == ["length", "length"], got.reasons  # not "error"
    assert all(got.texts), got.texts


def test_engine_stops_on_stop_strings_and_eos(lm):
    prompt = lm.tokenizer.encode("hello")
    free = lm.generate("hello", max_new_tokens=30, temperature=0)[0]
    stop = free[5:8]
    got = Collector(1)
    engine = Engine(lm).start()
    try:
        sample = SampleConfig(max_new_tokens=30, temperature=0, stop=[stop])
        engine.submit(Sequence(prompt, sample, got.emitter(0)))
        assert got.all_done.wait(30)
    finally:
        engine.close()
    assert got.texts[0] == free[: free.index(stop)]
    assert got.reasons[0] == "stop"


def test_engine_queue_limit_and_cancelled_sequences_free_their_slot(lm):
    engine = Engine(lm, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    never = Sequence([1], SampleConfig(), lambda e: None)
    engine.submit(never)
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(Sequence([1], SampleConfig(), lambda e: None))
    never.cancel()
    engine.start()
    got = Collector(1)
    try:
        long = Sequence([1], SampleConfig(max_new_tokens=400, temperature=0), got.emitter(0))
        engine.submit(long)
        deadline = time.monotonic() + 10
        while long.generated < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        long.cancel()
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.running  # the slot is free
        assert long.generated < 400
        assert got.reasons == [None]  # a cancelled sequence is dropped without an event
    finally:
        engine.close()


def test_engine_time_limit_cuts_generation(lm):
    got = Collector(1)
    engine = Engine(lm).start()
    try:
        seq = Sequence([1], SampleConfig(max_new_tokens=500), got.emitter(0), deadline=0.0)
        engine.submit(seq)
        assert got.all_done.wait(30)
    finally:
        engine.close()
    assert got.reasons == ["length"] and seq.generated == 1


# --- the HTTP API ------------------------------------------------------------------------


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [NAME]
    assert models["data"][0]["context_length"] == 512
    assert client.get("/health").json()["status"] == "ok"


def test_chat_completion_equals_greedy_generation(client, lm):
    body = {"model": NAME, "messages": CHAT, "max_tokens": 24, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body).json()
    expected = _chat_reference(lm, max_new_tokens=24, temperature=0)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": expected}
    prompt_tokens = len(lm.tokenizer.encode(chat_prompt(lm.tokenizer, CHAT)))
    assert reply["usage"]["prompt_tokens"] == prompt_tokens
    assert reply["usage"]["total_tokens"] == prompt_tokens + reply["usage"]["completion_tokens"]


def _events(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streamed_chat_is_openai_chunks_that_add_up(client, lm):
    body = {"model": NAME, "messages": CHAT, "max_tokens": 24, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == _chat_reference(lm, max_new_tokens=24, temperature=0)
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0


def test_completions_batch_of_prompts_n_and_echo(client, lm):
    prompts = ["hello", "how are you"]
    body = {"model": NAME, "prompt": prompts, "max_tokens": 10, "temperature": 0, "n": 2}
    reply = client.post("/v1/completions", json={**body, "echo": True}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    for c in reply["choices"]:
        p = prompts[c["index"] // 2]
        assert c["text"] == p + lm.generate(p, max_new_tokens=10, temperature=0)[0]
    ids = lm.tokenizer.encode("hello")
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids, "n": 1}).json()
    assert by_ids["choices"][0]["text"] == lm.generate("hello", max_new_tokens=10, temperature=0)[0]


def test_streamed_completion_with_seed_matches_sampling(client, lm):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 12, "seed": 7, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = _events(r)
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == lm.generate("hello", max_new_tokens=12, temperature=1.0, seed=7)[0]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_max_tokens_is_capped_by_the_context(client, lm):
    # 4096 is the server's own cap (ServeConfig.max_tokens); the context (512) cuts first.
    body = {"model": NAME, "prompt": "hello", "max_tokens": 4096, "logit_bias": {}}
    eos = lm.tokenizer.eos_id
    body["logit_bias"] = {str(eos): -100, **{str(i): -100 for i in range(3)}}  # never ends
    reply = client.post("/v1/completions", json=body).json()
    context, prompt = 512, len(lm.tokenizer.encode("hello"))
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == context - prompt + 1


def _error(response, status: int, param=None, code=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code) or (param is None and code is None)
    return error["message"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client):
    post = client.post
    url = "/v1/chat/completions"
    ok = {"model": NAME, "messages": CHAT, "max_tokens": 2}
    headers = {"content-type": "application/json"}
    assert "not valid JSON" in _error(post(url, content=b"{bad", headers=headers), 400)
    assert "temperature" in _error(post(url, json={**ok, "temperature": "hot"}), 400)
    assert "temperature" in _error(post(url, json={**ok, "temperature": 3}), 400)
    assert "messages" in _error(post(url, json={**ok, "messages": []}), 400)
    assert "messages" in _error(post(url, json={**ok, "messages": "hi"}), 400)
    assert "role" in _error(
        post(url, json={**ok, "messages": [{"role": "bot", "content": ""}]}), 400
    )
    assert "tools" in _error(post(url, json={**ok, "tools": []}), 400)  # unknown: refused
    assert "max_tokens" in _error(post(url, json={**ok, "max_tokens": 0}), 400)
    assert "n" in _error(post(url, json={**ok, "n": 100}), 400)
    _error(post(url, json={**ok, "model": "gpt-4"}), 404, "model", "model_not_found")
    long = {**ok, "messages": [{"role": "user", "content": "hello " * 600}]}
    _error(post(url, json=long), 400, "messages", "context_length_exceeded")
    _error(post(url, json={**ok, "stop": [""]}), 400)
    _error(post("/v1/completions", json={"model": NAME, "prompt": [10**6]}), 400, "prompt")
    _error(post("/v1/completions", json={"model": NAME, "prompt": []}), 400)
    big = {**ok, "messages": [{"role": "user", "content": "x" * 5000}]}
    _error(post(url, json=big), 413, code="too_large")
    _error(client.get("/v1/nothing"), 404)
    _error(client.get(url), 405)
    assert post(url, json=ok).status_code == 200  # still serving


def test_serve_config_is_validated():
    with pytest.raises(ConfigError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ConfigError, match="port"):
        ServeConfig(port=70000)
    with pytest.raises(ConfigError, match="API key"):
        ServeConfig(api_key=" ")


def test_api_key_is_required_on_v1_routes(lm):
    with local(create_app(lm, NAME, ServeConfig(api_key="sesame"))) as c:
        _error(c.get("/v1/models"), 401, code="invalid_api_key")
        _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert c.get("/health").status_code == 200  # liveness needs no key
        assert c.get("/").status_code == 200  # the page asks for the key itself


# --- real HTTP: the official openai client, dropped connections -----------------------------


@pytest.fixture(scope="module")
def live(lm):
    app = create_app(lm, NAME, ServeConfig(max_batch=4))
    with LiveServer(app) as url:
        yield url, app


def test_openai_client_chat_and_completions(live, lm):
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [NAME]
    expected = _chat_reference(lm, max_new_tokens=16, temperature=0)
    chat = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == expected
    stream = client.chat.completions.create(
        model=NAME, messages=CHAT, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

    expected = lm.generate("hello", max_new_tokens=16, temperature=0)[0]
    done = client.completions.create(model=NAME, prompt="hello", max_tokens=16, temperature=0)
    assert done.choices[0].text == expected
    stream = client.completions.create(
        model=NAME, prompt="hello", max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="hello " * 600)


def test_openai_client_logprobs_match_lm_complete(live, lm):
    """logprobs / top_logprobs in OpenAI's shapes, streamed and not, are lm.complete's."""
    openai = pytest.importorskip("openai")
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = chat_prompt(lm.tokenizer, CHAT)
    ref = lm.complete(
        prompt, max_new_tokens=12, temperature=0, logprobs=2, stop=turn_stops(lm.tokenizer)
    )[0]
    kw = dict(model=NAME, messages=CHAT, max_tokens=12, temperature=0, logprobs=True)
    chat = client.chat.completions.create(**kw, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [lm.tokenizer.decode([t]) for t in ref.ids]
    assert [c.logprob for c in content] == pytest.approx(ref.logprobs, abs=1e-5)
    tops = [t.logprob for c in content for t in c.top_logprobs]
    assert tops == pytest.approx([lp for top in ref.top_logprobs for lp in top.values()], abs=1e-5)
    assert all(bytes(c.bytes).decode() == c.token for c in content)
    stream = client.chat.completions.create(**kw, top_logprobs=2, stream=True)
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]

    done = client.completions.create(
        model=NAME, prompt="hello", max_tokens=8, temperature=0, logprobs=3
    )
    ref = lm.complete("hello", max_new_tokens=8, temperature=0, logprobs=3)[0]
    got = done.choices[0].logprobs
    assert got.token_logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    # Keyed by token text (OpenAI's legacy shape), so ids with the same text share a key.
    assert all(1 <= len(top) <= 3 for top in got.top_logprobs)
    assert [max(top.values()) for top in got.top_logprobs] == got.token_logprobs  # greedy
    assert got.text_offset[0] == 0 and "".join(got.tokens) == done.choices[0].text
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=NAME, messages=CHAT, top_logprobs=2)


def test_every_sampling_option_means_the_same_in_the_server_and_lm_generate(client, lm):
    options = {
        "temperature": 0.9,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.3,
        "repetition_penalty": 1.1,
        "seed": 3,
    }
    bias = {lm.tokenizer.eos_id: -100.0, 7: 3.0}
    body = {"model": NAME, "prompt": "hello", "max_tokens": 16, **options}
    body["logit_bias"] = {str(t): b for t, b in bias.items()}
    reply = client.post("/v1/completions", json=body).json()
    expected = lm.generate("hello", max_new_tokens=16, logit_bias=bias, **options)[0]
    assert reply["choices"][0]["text"] == expected
    assert reply["choices"][0]["finish_reason"] == "length"  # EOS was banned
    # A stop token id ends the reply where lm.generate's stop_ids does, before that token.
    ids = lm.complete("hello", max_new_tokens=16, logit_bias=bias, **options)[0].ids
    body["stop_token_ids"] = [ids[5]]
    reply = client.post("/v1/completions", json=body).json()
    expected = lm.generate(
        "hello", max_new_tokens=16, logit_bias=bias, stop_ids=[ids[5]], **options
    )[0]
    assert reply["choices"][0]["text"] == expected
    assert reply["choices"][0]["finish_reason"] == "stop"
    body["stop_token_ids"] = [10**9]
    assert client.post("/v1/completions", json=body).status_code == 400


def test_dropped_stream_frees_its_slot_and_concurrent_streams_batch(live, lm):
    url, app = live
    engine = app.state.server.engine
    body = {"model": NAME, "prompt": "hello", "max_tokens": 400, "stream": True}
    body["logit_bias"] = {str(lm.tokenizer.eos_id): -100}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{url}/v1/completions", json=body) as r,
    ):
        next(r.iter_lines())  # one chunk, then the client hangs up
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.running
    assert engine.stats.finished.get("cancelled", 0) >= 1

    def stream_one(i: int, out: list):
        one = {"model": NAME, "prompt": "hello", "max_tokens": 30, "seed": i, "stream": True}
        one["skip_special_tokens"] = False  # LM.generate's text keeps them
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{url}/v1/completions", json=one) as r,
        ):
            out[i] = "".join(e["choices"][0]["text"] for e in _events(r))

    texts = [None] * 4
    threads = [threading.Thread(target=stream_one, args=(i, texts)) for i in range(4)]
    engine.stats.max_batch = 0
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(4):
        assert texts[i] == lm.generate("hello", max_new_tokens=30, temperature=1.0, seed=i)[0]
    assert engine.stats.max_batch > 1


def test_cli_refuses_bad_flags_in_one_line(capsys, tmp_path):
    from gptkit.cli import main

    assert main(["serve", "--model", str(tmp_path), "--max-batch", "0"]) == 2
    assert "max_batch must be >= 1" in capsys.readouterr().err  # before loading any model
    assert main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkit: error:") and len(err.strip().splitlines()) == 1


def test_serve_on_a_busy_port_is_one_clear_error(lm):
    from gptkit.serve import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"could not start on 127.0.0.1:{port}.*in use"):
            serve(lm, NAME, ServeConfig(port=port))


# --- limits, files, shutdown ---------------------------------------------------------------


def test_server_limits_are_configurable_and_answer_clearly(lm):
    """max_tokens (400 over the cap; the cap also bounds requests that set none), the queue
    (503 + Retry-After when full; 400 when one request alone could never fit), body size (413,
    by Content-Length and for chunked uploads) and per-request time (cut with "length")."""
    config = ServeConfig(max_batch=1, max_queue=3, max_tokens=8, max_body_bytes=2048)
    ok = {"model": NAME, "prompt": "hello", "temperature": 0}
    with local(create_app(lm, NAME, config)) as c:
        post = c.post
        message = _error(
            post("/v1/completions", json={**ok, "max_tokens": 9}),
            400,
            "max_tokens",
            "max_tokens_too_large",
        )
        assert "at most 8" in message
        chat = {"model": NAME, "messages": CHAT, "max_completion_tokens": 9}
        chat_error = _error(
            post("/v1/chat/completions", json=chat),
            400,
            "max_completion_tokens",
            "max_tokens_too_large",
        )
        assert chat_error.startswith("max_completion_tokens is 9")
        no_eos = {"logit_bias": {str(lm.tokenizer.eos_id): -100}}
        unset = post("/v1/chat/completions", json={"model": NAME, "messages": CHAT, **no_eos})
        assert unset.status_code == 200 and unset.json()["usage"]["completion_tokens"] <= 8
        default = post("/v1/completions", json={**ok, **no_eos}).json()  # OpenAI's 16, capped
        assert default["usage"]["completion_tokens"] == 8

        _error(post("/v1/completions", json={**ok, "n": 4}), 400, "n")  # 4 > max_queue
        big = {**ok, "prompt": "x" * 3000}
        _error(post("/v1/completions", json=big), 413, code="too_large")
        chunked = post(
            "/v1/completions",
            content=iter([json.dumps(big).encode()]),  # no Content-Length: counted as it comes
            headers={"content-type": "application/json"},
        )
        _error(chunked, 413, code="too_large")
        assert post("/v1/completions", json={**ok, "max_tokens": 2}).status_code == 200

    # A full queue (the engine not started: lifespan off, so nothing leaves the queue): 503.
    stopped = local(create_app(lm, NAME, config))
    engine = stopped.app.state.server.engine
    for _ in range(3):
        engine.submit(Sequence([1], SampleConfig(), lambda e: None))
    busy = stopped.post("/v1/completions", json=ok)
    _error(busy, 503, code="overloaded")
    assert busy.headers["retry-after"] == "1"

    with local(create_app(lm, NAME, ServeConfig(max_seconds=1e-6))) as c:
        reply = c.post("/v1/completions", json={**ok, "max_tokens": 50, **no_eos}).json()
        assert reply["choices"][0]["finish_reason"] == "length"
        assert reply["usage"]["completion_tokens"] == 1  # the first token, then the limit
    for field in ("max_tokens", "max_queue", "max_body_bytes"):
        with pytest.raises(ConfigError, match=field):
            ServeConfig(**{field: 0})
    with pytest.raises(ConfigError, match="shutdown_seconds"):
        ServeConfig(shutdown_seconds=-1)


def test_values_that_are_no_text_or_no_number_are_400_not_500(client):
    """What the fuzzing found: a lone surrogate in the JSON ("\\udc80") reached the tokenizer
    and came back as a 500; NaN (which Python's json reads) and a seed past int64 too."""
    headers = {"content-type": "application/json"}
    post = client.post
    raw = b'{"model": "tiny", "prompt": "a\\udc80b"}'
    assert "lone surrogate" in _error(post("/v1/completions", content=raw, headers=headers), 400)
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc80"}]}'
    _error(post("/v1/chat/completions", content=raw, headers=headers), 400, "messages")
    raw = b'{"model": "tiny", "prompt": "hi", "temperature": NaN}'
    assert "temperature" in _error(post("/v1/completions", content=raw, headers=headers), 400)
    raw = b'{"model": "tiny", "prompt": "hi", "logit_bias": {"1": Infinity}}'
    _error(post("/v1/completions", content=raw, headers=headers), 400)
    seed = {"model": NAME, "prompt": "hi", "seed": 2**64}
    assert "seed" in _error(post("/v1/completions", json=seed), 400)
    seed["seed"] = 2**63 - 1  # the largest allowed, plus n - 1 for the other choices
    assert post("/v1/completions", json={**seed, "n": 3, "max_tokens": 2}).status_code == 200


def test_no_request_can_name_a_file(client, char_checkpoint, monkeypatch):
    """The model field is only compared with the served name: paths (relative, absolute, a
    real checkpoint directory) are unknown models, and nothing is ever loaded. No URL path
    reaches the file system either."""
    import gptkit.api
    import gptkit.checkpoint
    import gptkit.loading
    import gptkit.serve_models
    import gptkit.tokenizer_files

    def never(*args, **kwargs):
        raise AssertionError(f"a request made the server load {args}")

    for module, name in [
        (gptkit.api, "load"),
        (gptkit.loading, "load_pretrained"),
        (gptkit.checkpoint, "load_checkpoint"),
        (gptkit.tokenizer_files, "load_tokenizer"),
        (gptkit.serve_models, "load_tokenizer"),
        (gptkit.serve_models, "load_loras"),
    ]:
        monkeypatch.setattr(module, name, never)
    paths = ["../../etc/passwd", "/etc/passwd", str(char_checkpoint), "file:///etc/passwd"]
    for path in paths:
        for url, body in [
            ("/v1/completions", {"model": path, "prompt": "hi", "max_tokens": 1}),
            ("/v1/chat/completions", {"model": path, "messages": CHAT, "max_tokens": 1}),
        ]:
            reply = client.post(url, json=body)
            _error(reply, 404, "model", "model_not_found")
            assert "root:" not in reply.text
    for url in ["/../../etc/passwd", "/static/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd"]:
        reply = client.get(url)
        assert reply.status_code == 404 and "root:" not in reply.text
    assert Path(char_checkpoint).is_dir()  # a real path, refused as a model name all the same


def test_api_key_is_compared_in_constant_time(lm, monkeypatch):
    import gptkit.serve_guard

    calls = []
    real = gptkit.serve_guard.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(gptkit.serve_guard.hmac, "compare_digest", spy)
    with local(create_app(lm, NAME, ServeConfig(api_key="sesame"))) as c:
        _error(c.get("/v1/models", headers={"Authorization": "Bearer sesam"}), 401)
        latin1 = {"Authorization": "Bearer s\xe9same".encode("latin-1")}  # not UTF-8: 401
        _error(c.get("/v1/models", headers=latin1), 401, code="invalid_api_key")
        assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
    # Every request's key went through the constant-time comparison, the right one too.
    assert len(calls) == 3 and all(expected == b"sesame" for _, expected in calls)
    assert calls[0][0] == b"sesam" and calls[2][0] == b"sesame"


def test_engine_drain_ends_generations_with_length_and_refuses_new_ones(lm):
    got = Collector(1)
    engine = Engine(lm).start()
    try:
        sample = SampleConfig(
            max_new_tokens=400, temperature=0, logit_bias={lm.tokenizer.eos_id: -100.0}
        )
        seq = Sequence([1], sample, got.emitter(0))
        engine.submit(seq)
        deadline = time.monotonic() + 30
        while seq.generated < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.drain(0.0)
        assert got.all_done.wait(30)
        with pytest.raises(EngineBusy, match="shutting down"):
            engine.submit(Sequence([1], SampleConfig(), lambda e: None))
    finally:
        engine.close()
    assert got.reasons == ["length"] and seq.generated < 400


SERVE_SCRIPT = """
import sys
sys.path.insert(0, "tests")
from conftest import tiny_chat_lm
from gptkit.serve import ServeConfig, serve
config = ServeConfig(port=int(sys.argv[1]), shutdown_seconds=1.0, max_tokens=8000)
serve(tiny_chat_lm(block_size=8192), "tiny", config)
print("serve returned", flush=True)
"""


def test_sigterm_ends_streams_cleanly_and_exits_0(lm, tmp_path):
    """`gptkit serve`'s shutdown: SIGTERM while a long stream runs (8000 tokens: many seconds
    on a CPU). The stream is cut at shutdown_seconds and still ends properly (a finishing chunk
    with "length", the usage, [DONE]), and the process exits 0 (uvicorn alone would re-raise
    the signal: exit status -15)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    root = Path(__file__).parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(port)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            with httpx.Client(timeout=5) as http:
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"model": NAME, "prompt": "hello", "max_tokens": 8000, "stream": True}
        body["logit_bias"] = {str(lm.tokenizer.eos_id): -100}
        body["stream_options"] = {"include_usage": True}
        lines = []
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", f"{url}/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 1:
                    proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-3][6:])["choices"][0]["finish_reason"] == "length"
    assert 0 < json.loads(lines[-2][6:])["usage"]["completion_tokens"] < 8000  # cut short
    assert "serve returned" in (tmp_path / "serve.log").read_text()
