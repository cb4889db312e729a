"""schemathesis against a retrieving server's OpenAPI schema, in-process (ASGI): POST
/v1/embeddings, and POST /v1/chat/completions grounded in an index (`--retrieval`), with
generated valid and invalid bodies. Checks as in test_fuzz_server.py: no 5xx, responses as the
schema documents them, invalid requests refused with a 4xx; afterwards the server still embeds
and still answers from its sources.

The index is embedded by the served tiny model itself (embed.ModelEmbedder, mean-pooled), as
`gptkit index --embedder MODEL` makes one, so nothing is downloaded and both routes take the
same model name."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("faiss", reason="the retrieval extra is not installed: pip install '.[rag]'")

from conftest import tiny_chat_lm  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from gptkit.embed import ModelEmbedder  # noqa: E402
from gptkit.rag import RetrievalConfig, Retriever  # noqa: E402
from gptkit.rag_index import build_index  # noqa: E402
from gptkit.serve import ServeConfig, create_app  # noqa: E402

NAME = "tiny"
LM = tiny_chat_lm(block_size=256)
FOLDER = tempfile.TemporaryDirectory(prefix="gptkit-fuzz-embeddings-")  # removed at exit
DOCS = Path(FOLDER.name) / "docs.jsonl"
DOCS.write_text(
    "".join(
        json.dumps({"id": f"d{i}", "text": text}) + "\n"
        for i, text in enumerate(["hello there, how are you?", "I am fine, thanks.", "hello"])
    )
)
INDEX = build_index([DOCS], Path(FOLDER.name) / "idx", ModelEmbedder(LM, name=NAME), 24, 4)
APP = create_app(
    LM,
    NAME,
    # max_tokens keeps replies short; the body limit leaves room for 2,049 messages, one
    # past the schema's maxItems (a 413 there would be an accepted violation).
    ServeConfig(
        max_batch=2,
        max_queue=4,
        max_body_bytes=1 << 17,
        max_tokens=8,
        allowed_hosts=("testserver",),
    ),
    retriever=Retriever(INDEX, RetrievalConfig(k=2, min_score=0.5)),
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP).include(
    path_regex="^/v1/(embeddings|chat/completions)$"
)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
SEEN: Counter = Counter()


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_embeddings_and_retrieval_fuzzing_never_get_a_server_error(case):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = NAME
    response = case.call()
    SEEN[(case.operation.label, response.status_code)] += 1
    assert response.status_code < 500, (response.status_code, response.text[:300])
    case.validate_response(response, checks=CHECKS)


def test_the_server_still_embeds_and_retrieves_after_fuzzing():
    assert SEEN[("POST /v1/embeddings", 200)] > 0, "the fuzzing never embedded anything"
    assert SEEN[("POST /v1/chat/completions", 200)] > 0, "the fuzzing never chatted"
    with TestClient(APP) as client:
        reply = client.post("/v1/embeddings", json={"model": NAME, "input": ["hello", "fine"]})
        assert reply.status_code == 200 and len(reply.json()["data"]) == 2
        chat = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        reply = client.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200 and reply.json()["sources"][0]["doc_id"].startswith("d")
