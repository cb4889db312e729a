"""schemathesis against a served classifier's OpenAPI schema, in-process (ASGI): the classify
route with generated valid and invalid bodies, and the generating routes a classifier refuses.
Checks as in test_fuzz_server.py: no 5xx, responses as the schema documents them, invalid
requests refused with a 4xx; afterwards the server still classifies."""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")

from conftest import tiny_chat_lm  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from gptkit.serve import ServeConfig, create_app  # noqa: E402
from gptkit.surgery import set_head  # noqa: E402

NAME = "tiny-classifier"
LM = tiny_chat_lm(block_size=64)
set_head(LM.model, "classify", ["topic-a", "topic-b", "neg", "pos"], ["topic", "mood"], [2, 2])
APP = create_app(LM, NAME, ServeConfig(max_queue=4, allowed_hosts=("testserver",)))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
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
def test_classify_fuzzing_never_gets_a_server_error(case):
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = NAME
    response = case.call()
    SEEN[(case.operation.label, response.status_code)] += 1
    assert response.status_code < 500, (response.status_code, response.text[:300])
    case.validate_response(response, checks=CHECKS)


def test_the_classifier_still_answers_after_fuzzing():
    assert SEEN[("POST /v1/classify", 200)] > 0, "the fuzzing never classified anything"
    with TestClient(APP) as client:
        reply = client.post("/v1/classify", json={"model": NAME, "input": ["hello", "fine"]})
        assert reply.status_code == 200
        assert [len(d["fields"]) for d in reply.json()["data"]] == [2, 2]
