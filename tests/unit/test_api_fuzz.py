"""Fuzz: schemathesis generates requests from the jobs API's own OpenAPI schema (valid and invalid bodies, query
and path values) and sends them to the real app with a real SQLite state. No request may get a 500, and no
response may break the schema the server publishes."""

from __future__ import annotations

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from cluster.api.app import build_app
from tests.conftest import sentiment_rows
from tests.unit.test_api_http import jsonl, make_settings, upload

EXAMPLES = 50  # per operation, derandomized: the same requests every run


def test_no_request_gets_a_500_or_an_answer_outside_the_schema(tmp_path):
    from schemathesis import openapi
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    app = build_app(make_settings(tmp_path))
    with TestClient(app) as client:  # the lifespan runs: the job runner follows what the fuzzer creates
        file_id = upload(client, jsonl(sentiment_rows(100))).json()["id"]  # something to find, too
        client.post("/v1/fine_tuning/jobs", json={"model": "minilm", "training_file": file_id})
        schema = openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 13
        sent: dict[str, int] = {}
        for operation in operations:
            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                case.call_and_validate(checks=(not_a_server_error, response_schema_conformance))
                sent[operation.label] = sent.get(operation.label, 0) + 1

            fuzz()
    assert len(sent) == len(operations) and sum(sent.values()) >= 5 * len(operations), sent
