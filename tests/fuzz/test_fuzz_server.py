"""schemathesis against the server's own OpenAPI schema, in-process (ASGI), on a tiny model.

Every operation gets a bounded number of generated requests, valid and invalid (schemathesis'
examples, coverage and fuzzing phases). Checks: no 5xx; status codes, content types, headers
and bodies conform to what the schema documents; invalid requests are refused with a 4xx.
Afterwards the server still answers /health and a normal chat completion.
"""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")

from conftest import tiny_chat_lm  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from gptkit.serve import ServeConfig, create_app  # noqa: E402

NAME = "tiny"
EXAMPLES = 30  # per operation, in the fuzzing phase

# A short context and a small cap keep every generation short; a small queue lets the fuzzer
# reach the "too many completions in one request" limit.
APP = create_app(
    tiny_chat_lm(block_size=64),
    NAME,
    # schemathesis' in-process client names the server "testserver"; a loopback-bound server
    # answers only the Host names it is told to (tested in test_serve_hardening.py).
    ServeConfig(
        max_batch=4,
        max_queue=16,
        max_body_bytes=1 << 17,  # room for 2,049 messages: one past the schema's maxItems
        max_tokens=16,
        allowed_hosts=("testserver",),
    ),
)
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
SEEN: Counter = Counter()  # (operation, status) -> cases, for the report at the end


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
def test_schema_fuzzing_never_gets_a_server_error(case):
    # Generated model names are random strings (a 404, tested elsewhere); name the served
    # model in most bodies so that the fuzzing reaches the sampling options and generation.
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = NAME
    response = case.call()
    SEEN[(case.operation.label, response.status_code)] += 1
    assert response.status_code < 500, (response.status_code, response.text[:300])
    case.validate_response(response, checks=CHECKS)


def test_the_server_is_still_up_after_fuzzing():
    """Runs after the fuzzing (file order): the same app still serves; and the fuzzing did
    generate text (200s on both generating routes), not only refusals."""
    assert sum(SEEN.values()) > 0, "run this file whole: the fuzzing test comes first"
    with TestClient(APP) as client:  # Host: testserver, allowed above
        assert client.get("/health").json()["status"] == "ok"
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    engine = APP.state.server.engine
    assert not engine.running and engine.waiting.empty()  # nothing leaked
    assert all(status < 500 for _, status in SEEN)
    for route in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert SEEN[(route, 200)] > 0, SEEN
    total = sum(SEEN.values())
    print(f"\nschemathesis: {total} cases over {len({op for op, _ in SEEN})} operations")
    for (op, status), n in sorted(SEEN.items()):
        print(f"  {op:28} {status}: {n}")
