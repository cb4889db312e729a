"""The serving engine (continuous batching) and the OpenAI-compatible HTTP API.

Every generated text is checked against `LM.generate` on the same model (greedy, or sampling
with the same seed), so a batching or KV-cache mistake shows up as different text.
"""

import json
import threading
import time

import httpx
import pytest
from conftest import tiny_chat_lm
from fastapi.testclient import TestClient
from live_server import LiveServer

from gptkit.chat import chat_prompt, turn_stops
from gptkit.config import ConfigError, SampleConfig
from gptkit.engine import Engine, EngineBusy, Sequence
from gptkit.serve import ServeConfig, create_app

NAME = "tiny"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm()


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(lm, NAME, ServeConfig(max_batch=4, max_body_bytes=4096))) as c:
        yield c


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


def test_engine_batches_requests_and_matches_single_generation(lm):
    """More requests than slots, of different lengths, sampled with seeds: each text equals
    what LM.generate makes alone. The context (512) is longer than the first cache (256), so
    the cache also grows mid-run."""
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
    assert engine._cache.max_len > 256


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
    body = {"model": NAME, "prompt": "hello", "max_tokens": 10**9, "logit_bias": {}}
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
    with TestClient(create_app(lm, NAME, ServeConfig(api_key="sesame"))) as c:
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
