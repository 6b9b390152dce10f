"""The HTTP API of every task on a real local Ray Serve: endpoints, streaming, the openai client, auth, errors.

One Ray + Serve for the module, one app per tiny model (route prefixes /cls, /ner, /qa, /lm, /lora, /auth),
deployed when a test first asks for it. The session's HTTP ingress is ``serve.proxy``'s default unless
RAYFINE_SERVE_PROXY says otherwise (``tests.serve_fixtures``); test_serve_ingress.py runs the tests whose
answers come from the ingress itself under the other one.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import httpx
import pytest
from ray import serve

from tests.serve_fixtures import CLS_LABELS, SERVE_PROXY, free_port, metrics_not_exported

pytestmark = pytest.mark.integration

LM_ID = "ft:tiny-gpt2:test:job-1"
KEYS_ENV = "RAYFINE_TEST_SERVE_KEYS"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


APP_TASKS = {"cls": "sequence_classification", "ner": "token_classification", "qa": "question_answering",
             "lm": "causal_lm", "lora": "causal_lm_lora", "auth": "sequence_classification"}


class Apps(dict):
    """App name -> base URL; each app is deployed on first use, so a run of a few tests deploys only theirs."""

    def __init__(self, deploy_app):
        super().__init__()
        self._deploy_app = deploy_app

    def __missing__(self, name: str) -> str:
        self[name] = self._deploy_app(name)
        return self[name]


@pytest.fixture(scope="module")
def urls(models, ray_local):  # the session's Ray: a child pytest of only serving tests starts it once
    from core.config import ServeConfig
    from serving.deploy import deploy

    port = free_port()
    common = dict(port=port, cpus_per_replica=0.5, threads_per_replica=1, max_input_tokens=64, max_new_tokens=32,
                  proxy=SERVE_PROXY)

    def deploy_app(name: str) -> str:
        if name != "auth":
            return deploy(models[APP_TASKS[name]], ServeConfig(route_prefix=f"/{name}", **common), name=name)
        os.environ[KEYS_ENV] = f"other-key, {KEY}"  # read by deploy, handed to the replicas' runtime_env
        try:
            return deploy(models[APP_TASKS[name]], ServeConfig(route_prefix="/auth", api_keys_env=KEYS_ENV, **common),
                          name=name)
        finally:
            del os.environ[KEYS_ENV]

    try:
        yield Apps(deploy_app)
    finally:
        serve.shutdown()  # Ray itself is the session's


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- task endpoints ---------------------------------------------------------------------------------------

def test_serve_runs_the_configured_ingress(urls):
    from cluster.ingress import active_ingress

    urls["cls"]  # Serve's proxies start with the first app
    assert active_ingress() == SERVE_PROXY


def test_haproxy_keeps_its_admin_socket_and_stats_to_this_user_and_host(urls):
    """HAProxy's files live where only this user may enter, its admin socket is this user's only, and its stats
    page and Prometheus exporter listen on serve.host (127.0.0.1 here), not on every interface."""
    import socket

    import ray

    if SERVE_PROXY != "haproxy":
        pytest.skip("this session runs Serve's Python proxy")
    assert urls["cls"]
    base = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent  # Serve adds a node-id folder inside
    admin = base / ray.get_runtime_context().get_node_id() / "admin.sock"
    info = base.stat()
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700
    assert admin.stat().st_mode & 0o777 == 0o600
    stats_port = int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"])
    metrics_port = int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 200
    with socket.create_connection(("127.0.0.1", stats_port), timeout=5):
        pass
    other = ray.util.get_node_ip_address()  # this machine's address on its network
    if other.startswith("127."):
        pytest.skip("no interface but loopback to try")
    for port in (stats_port, metrics_port):
        with pytest.raises((ConnectionRefusedError, TimeoutError)):  # nothing listens there (or a firewall drops)
            socket.create_connection((other, port), timeout=5).close()


def test_healthz_and_models(urls, client):
    for name, model_id in [("cls", "tiny-cls"), ("ner", "tiny-ner"), ("qa", "tiny-qa"), ("lm", LM_ID)]:
        health = client.get(f"{urls[name]}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        models = client.get(f"{urls[name]}/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [model_id]
    assert client.get(f"{urls['lm']}/v1/models/{LM_ID}").json()["id"] == LM_ID
    assert_error(client.get(f"{urls['lm']}/v1/models/gpt-4"), 404, "model_not_found")


def test_classify_one_and_many(urls, client):
    one = client.post(f"{urls['cls']}/v1/classify", json={"input": "a fine film"})
    assert one.status_code == 200
    [item] = one.json()["data"]
    assert item["label"] in CLS_LABELS and set(item["scores"]) == set(CLS_LABELS)
    assert abs(sum(item["scores"].values()) - 1) < 1e-5 and item["score"] == max(item["scores"].values())
    many = client.post(f"{urls['cls']}/v1/classify", json={"input": ["short", "a much longer text " * 5, "mid"]})
    assert len(many.json()["data"]) == 3
    assert int(many.headers["x-batch-size"]) >= 1


def test_ner_groups_tokens_into_entities(urls, client):
    # The tiny tagger says I-PER for every token: "simple" aggregation makes one entity of the whole text.
    text = "Ada Lovelace met Babbage"
    response = client.post(f"{urls['ner']}/v1/ner", json={"input": [text, "Paris"]})
    assert response.status_code == 200
    first, second = response.json()["data"]
    assert first == [{"entity": "PER", "word": text, "start": 0, "end": len(text), "score": pytest.approx(1.0)}]
    assert second[0]["word"] == "Paris"


def test_qa_single_and_list(urls, client):
    context = "The Eiffel Tower is in Paris and was finished in 1889."
    single = client.post(f"{urls['qa']}/v1/qa", json={"question": "Where is it?", "context": context})
    assert single.status_code == 200
    [answer] = single.json()["data"]
    assert answer["answer"] == context[answer["start"]:answer["end"]] and answer["answer"]
    assert 0 < answer["score"] <= 1
    listed = client.post(f"{urls['qa']}/v1/qa", json={"input": [{"question": "When?", "context": context},
                                                                {"question": "What?", "context": "A red cat."}]})
    assert len(listed.json()["data"]) == 2


def test_endpoint_of_another_task_is_404(urls, client):
    error = assert_error(client.post(f"{urls['lm']}/v1/classify", json={"input": "x"}), 404,
                         "unsupported_endpoint")
    assert "causal_lm" in error["message"]
    assert_error(client.post(f"{urls['cls']}/v1/chat/completions", json={"model": "x", "messages": []}), 404)
    assert_error(client.get(f"{urls['cls']}/no/such/path"), 404, "not_found")
    assert_error(client.get(f"{urls['cls']}/v1/classify"), 405)
    nowhere = client.get(urls["cls"].replace("/cls", "/nowhere/v1/models"))
    if SERVE_PROXY == "python":  # no app at this prefix: the proxy answers, and its plain-text 404 is reshaped
        assert_error(nowhere, 404, "not_found")
    else:  # HAProxy answers from its own config: the status is right, the body is its plain text
        assert nowhere.status_code == 404 and "not found" in nowhere.text, nowhere.text


# ---- causal LM: OpenAI wire format ---------------------------------------------------------------------------

def chat(urls, client, **body):
    body = {"model": LM_ID, "messages": [{"role": "user", "content": "Hello there"}], **body}
    return client.post(f"{urls['lm']}/v1/chat/completions", json=body)


def test_chat_completion_shape_usage_and_seed(urls, client):
    response = chat(urls, client, max_tokens=6, temperature=0.8, seed=7, n=2)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == LM_ID and body["id"].startswith("chatcmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in body["choices"])
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = chat(urls, client, max_tokens=6, temperature=0.8, seed=7, n=2).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in body["choices"]]


def test_model_may_be_left_out(urls, client):
    # `rayfine run` sends its sample request without "model": the served model answers.
    response = client.post(f"{urls['lm']}/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 200 and response.json()["model"] == LM_ID


def test_lora_adapter_folder_is_served(urls, client):
    assert client.get(f"{urls['lora']}/v1/models").json()["data"][0]["id"] == "tiny-lm-lora"
    response = client.post(f"{urls['lora']}/v1/chat/completions",
                           json={"model": "tiny-lm-lora", "messages": [{"role": "user", "content": "Hi"}],
                                 "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 3


def test_stop_sequence_cuts_the_text(urls, client):
    full = chat(urls, client, max_tokens=12, temperature=0).json()["choices"][0]
    text = full["message"]["content"]
    if len(text) < 6:
        pytest.skip(f"greedy output too short to cut: {text!r}")
    stop = text[3:6]
    cut = chat(urls, client, max_tokens=12, temperature=0, stop=[stop]).json()["choices"][0]
    assert cut["message"]["content"] == text[:text.index(stop)]
    assert cut["finish_reason"] == "stop"


def parse_sse(text: str) -> list:
    frames = [line.removeprefix("data: ") for line in text.split("\n\n") if line.strip()]
    assert frames[-1] == "[DONE]"
    return [json.loads(frame) for frame in frames[:-1]]


def test_chat_stream_is_sse_ending_with_done(urls, client):
    with client.stream("POST", f"{urls['lm']}/v1/chat/completions",
                       json={"model": LM_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                             "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = parse_sse(response.read().decode())
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


def test_completions_plain_and_stream(urls, client):
    plain = client.post(f"{urls['lm']}/v1/completions", json={"model": LM_ID, "prompt": "Once", "max_tokens": 4})
    assert plain.status_code == 200
    body = plain.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    streamed = client.post(f"{urls['lm']}/v1/completions",
                           json={"model": LM_ID, "prompt": "Once", "max_tokens": 4, "stream": True,
                                 "temperature": 0})
    chunks = parse_sse(streamed.text)
    assert all(c["object"] == "text_completion" for c in chunks)
    greedy = client.post(f"{urls['lm']}/v1/completions",
                         json={"model": LM_ID, "prompt": "Once", "max_tokens": 4, "temperature": 0}).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy["choices"][0]["text"]


def test_openai_client_chat_and_stream(urls):
    from openai import OpenAI

    client = OpenAI(base_url=f"{urls['lm']}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [LM_ID]
    completion = client.chat.completions.create(
        model=LM_ID, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=5, temperature=0.7, top_p=0.9, seed=1)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model=LM_ID, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert isinstance(text, str)
    from openai import NotFoundError

    with pytest.raises(NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_found"


# ---- bad input: status and error body, never a 500 -----------------------------------------------------------

@pytest.mark.parametrize("payload, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"", 400, None),
    ({"input": 3}, 422, "invalid_value"),
    ({"input": ["ok", 5]}, 422, "invalid_value"),
    ({"input": ""}, 422, "invalid_value"),
    ({"input": []}, 422, "invalid_value"),
    ({"text": "wrong field"}, 422, "invalid_value"),
    ({"input": "word " * 200}, 413, "input_too_long"),
    ({"input": "fine", "model": "someone-else"}, 404, "model_not_found"),
])
def test_classify_bad_input(urls, client, payload, status, code):
    if isinstance(payload, bytes):
        response = client.post(f"{urls['cls']}/v1/classify", content=payload,
                               headers={"content-type": "application/json"})
    else:
        response = client.post(f"{urls['cls']}/v1/classify", json=payload)
    error = assert_error(response, status, code)
    if status == 422:
        assert error["param"] and error["param"].split(".")[0] in ("input", "text", "body")


@pytest.mark.parametrize("body, status, code", [
    ({"max_tokens": 1000}, 400, "max_tokens_too_large"),
    ({"max_tokens": "many"}, 422, "invalid_value"),
    ({"temperature": 5}, 422, "invalid_value"),
    ({"seed": 2**64}, 422, "invalid_value"),
    ({"seed": -2**63 - 1}, 422, "invalid_value"),
    ({"messages": []}, 422, "invalid_value"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "invalid_value"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 413, "input_too_long"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_value"),
    ({"model": "gpt-4o"}, 404, "model_not_found"),
])
def test_chat_bad_input(urls, client, body, status, code):
    assert_error(chat(urls, client, **body), status, code)


def test_edge_values_the_protocol_accepts_answer_200(urls, client):
    """The largest seeds and a temperature so small that 1/temperature overflows: a correct answer, not a 500
    (a near-zero temperature samples what greedy picks)."""
    greedy = chat(urls, client, max_tokens=6, temperature=0).json()["choices"][0]["message"]["content"]
    for seed in (2**64 - 1, -2**63):
        assert chat(urls, client, max_tokens=3, seed=seed).status_code == 200
    for temperature in (1e-300, 5e-324):
        response = chat(urls, client, max_tokens=6, temperature=temperature, seed=3)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == greedy


def test_malformed_json_without_content_type(urls, client):
    assert_error(client.post(f"{urls['qa']}/v1/qa", content=b"question=x"), 400, "invalid_json")
    assert_error(client.post(f"{urls['qa']}/v1/qa", json={"question": "only a question"}), 422)


def test_no_request_can_hold_a_replica(urls, client):
    """A 16 MB body, 20,000 inputs and a text too long by its characters get a 4xx at once (before anything is
    tokenized), and /healthz keeps answering."""
    import time

    url = f"{urls['cls']}/v1/classify"
    started = time.monotonic()
    big = b'{"input": "' + b"a" * (16 * 2**20) + b'"}'
    assert_error(client.post(url, content=big, headers={"content-type": "application/json"}), 413,
                 "request_too_large")
    assert_error(client.post(url, json={"input": ["ok"] * 20_000}), 400, "too_many_inputs")
    error = assert_error(client.post(url, json={"input": "x" * (64 * 64 + 1)}), 413, "input_too_long")
    assert "characters" in error["message"]
    error = assert_error(client.post(f"{urls['qa']}/v1/qa", json={"input": [
        {"question": "q?", "context": "c"}] * 20_000}), 400, "too_many_inputs")
    assert_error(chat(urls, client, messages=[{"role": "user", "content": "y" * (64 * 64 + 1)}]), 413,
                 "input_too_long")
    assert time.monotonic() - started < 20
    assert client.get(f"{urls['cls']}/healthz").status_code == 200
    assert client.post(url, json={"input": ["fine"] * 256}).status_code == 200  # the limit itself is served


def test_replicas_survive_bad_requests(urls, client):
    assert client.get(f"{urls['cls']}/healthz").status_code == 200
    assert client.get(f"{urls['lm']}/healthz").status_code == 200


# ---- auth -----------------------------------------------------------------------------------------------------

def test_auth_required_when_keys_set(urls, client):
    url = f"{urls['auth']}/v1/classify"
    error = assert_error(client.post(url, json={"input": "hi"}), 401, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert_error(client.post(url, json={"input": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(client.post(url, json={"input": "hi"}, headers={"Authorization": KEY}), 401)
    assert_error(client.get(f"{urls['auth']}/v1/models"), 401)
    ok = client.post(url, json={"input": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert client.post(url, json={"input": "hi"}, headers={"Authorization": "Bearer other-key"}).status_code == 200
    assert client.get(f"{urls['auth']}/healthz").status_code == 200  # probes stay open


def test_api_keys_never_appear_in_what_ray_shows(urls):
    """The replicas get the keys' digests: the Serve details behind Ray's dashboard and ``serve status`` (the
    deployments' runtime_env included) hold the digest, never the key."""
    import ray
    from ray.serve.context import _get_global_client

    from core.openai_errors import key_digest

    assert urls["auth"]
    details = json.dumps(ray.get(_get_global_client()._controller.get_serve_instance_details.remote()), default=str)
    assert key_digest(KEY) in details and key_digest("other-key") in details
    assert KEY not in details and "other-key" not in details


def test_auth_off_by_default(urls, client):
    assert client.post(f"{urls['cls']}/v1/classify", json={"input": "hi"}).status_code == 200


# ---- access log -------------------------------------------------------------------------------------------------

def test_access_log_has_one_json_line_per_request(urls, client):
    import time

    import ray

    response = client.post(f"{urls['cls']}/v1/classify", json={"input": "log me"})
    request_id = response.headers["x-request-id"]
    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    for _ in range(40):  # the replica's stderr reaches its file asynchronously
        lines = [line for path in glob.glob(f"{logs_dir}/worker-*.err") for line in open(path, errors="replace")
                 if request_id in line]
        if lines:
            break
        time.sleep(0.25)
    assert len(lines) == 1, lines
    record = json.loads(lines[0][lines[0].index("{"):])
    assert record["request_id"] == request_id and record["status"] == 200 and record["path"] == "/v1/classify"
    assert record["method"] == "POST" and record["latency_ms"] > 0 and record["batch_size"] >= 1


# ---- metrics ----------------------------------------------------------------------------------------------------

def test_prometheus_metrics_are_exported(urls, client):
    import re

    for _ in range(3):
        client.post(f"{urls['cls']}/v1/classify", json={"input": "count me"})
    client.post(f"{urls['cls']}/v1/classify", json={"input": ""})
    assert chat(urls, client, max_tokens=4).status_code == 200
    lm = f'model="{LM_ID}"'
    wanted = {
        "first_token": re.compile(rf'^ray_rayfine_serve_time_to_first_token_ms_count\{{[^}}]*{lm}', re.M),
        "inter_token": re.compile(rf'^ray_rayfine_serve_inter_token_latency_ms_bucket\{{[^}}]*{lm}', re.M),
        "running": re.compile(rf'^ray_rayfine_serve_running_sequences\{{[^}}]*{lm}', re.M),
        "waiting": re.compile(rf'^ray_rayfine_serve_waiting_sequences\{{[^}}]*{lm}', re.M),
        "tokens": re.compile(rf'^ray_rayfine_serve_generated_tokens_total\{{[^}}]*{lm}', re.M),
        "requests": re.compile(r'^ray_rayfine_serve_requests_total\{[^}]*endpoint="/v1/classify"[^}]*model="tiny-cls"'
                               r'[^}]*status="200"', re.M),
        "errors": re.compile(r'^ray_rayfine_serve_errors_total\{[^}]*code="invalid_value"[^}]*status="422"', re.M),
        "latency": re.compile(r'^ray_rayfine_serve_request_latency_ms_bucket\{[^}]*endpoint="/v1/classify"', re.M),
        "batch": re.compile(r'^ray_rayfine_serve_batch_size_count\{[^}]*endpoint="/v1/classify"', re.M),
        "in_flight": re.compile(r'^ray_rayfine_serve_requests_in_flight\{', re.M),
    }
    missing = metrics_not_exported(wanted)
    assert not missing, f"metrics not exported: {missing}"


# ---- fuzz -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("app", ["cls", "lm"])
def test_fuzzed_requests_never_get_a_500(urls, app):
    """schemathesis generates requests from the deployment's own OpenAPI schema (valid and invalid bodies: huge
    and negative numbers, odd strings, wrong types, streaming on and off) and sends them over HTTP to the running
    replicas. None may get a 500."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import openapi
    from schemathesis.checks import not_a_server_error

    url = urls[app]
    operations = [r.ok() for r in openapi.from_url(f"{url}/openapi.json").get_all_operations()]
    posts = [op for op in operations if op.method.upper() == "POST"]
    assert posts, [op.label for op in operations]
    sent = {}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25 if operation in posts else 5, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(base_url=url, checks=(not_a_server_error,), timeout=60)
            sent[operation.label] = sent.get(operation.label, 0) + 1

        fuzz()
    assert all(sent.get(op.label, 0) >= 5 for op in posts), sent
