"""Serving under load and failure on a real local Ray Serve: batching, backpressure, timeouts, a killed replica,
plus the ``rayfine serve`` entry point and its Serve config file."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from ray import serve

from tests.serve_fixtures import SERVE_PROXY, free_port

pytestmark = pytest.mark.integration

LM_ID = "ft:tiny-gpt2:test:job-1"


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def serve_port(ray_local):
    serve.shutdown()  # a Serve that an earlier module left up keeps its own port: this module's apps need theirs
    try:
        yield free_port()
    finally:
        serve.shutdown()  # Ray itself is the session's


def deploy_app(models, port, task, name, **serve):
    from core.config import ServeConfig
    from serving.deploy import deploy

    cfg = ServeConfig(port=port, route_prefix=f"/{name}", cpus_per_replica=0.5, threads_per_replica=1,
                      proxy=SERVE_PROXY, **serve)
    return deploy(models[task], cfg, name=name)


def post_many(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    """Send all bodies at once from as many threads, so they overlap in the server."""
    barrier = threading.Barrier(len(bodies))

    def send(body):
        with httpx.Client(timeout=timeout) as client:
            barrier.wait()
            return client.post(url, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_share_a_batch(models, serve_port):
    url = deploy_app(models, serve_port, "sequence_classification", "batch", max_batch_size=8,
                     batch_wait_timeout_s=1.0)
    sizes = []
    for _ in range(3):
        responses = post_many(f"{url}/v1/classify", [{"input": f"text number {i}"} for i in range(8)])
        assert all(r.status_code == 200 for r in responses)
        sizes += [int(r.headers["x-batch-size"]) for r in responses]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8
    # A request alone in the replica does not wait batch_wait_timeout_s (1 s) for company.
    with httpx.Client(timeout=30) as client:
        start = time.perf_counter()
        for _ in range(5):
            assert client.post(f"{url}/v1/classify", json={"input": "alone"}).headers["x-batch-size"] == "1"
        assert (time.perf_counter() - start) / 5 < 0.5


def test_backpressure_answers_503_with_the_error_shape(models, serve_port):
    url = deploy_app(models, serve_port, "causal_lm", "busy", max_ongoing_requests=1, max_queued_requests=1,
                     max_new_tokens=128)
    body = {"model": LM_ID, "prompt": "Tell me", "max_tokens": 100, "temperature": 0}
    responses = post_many(f"{url}/v1/completions", [body] * 6)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    assert set(statuses) <= {200, 503}
    for r in responses:
        if r.status_code == 503:
            error = r.json()["error"]
            assert error["code"] == "server_overloaded" and error["type"] == "server_error"


def test_request_timeout_answers_408(models, serve_port):
    url = deploy_app(models, serve_port, "causal_lm", "slow", request_timeout_s=0.05, max_new_tokens=120)
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{url}/v1/chat/completions",
                               json={"model": LM_ID, "messages": [{"role": "user", "content": "Go"}],
                                     "max_tokens": 100, "temperature": 0})
        if response.status_code == 200:  # finished under 50 ms: nothing timed out, nothing to check
            pytest.skip(f"generation finished early: {response.json()['usage']}")
        assert response.status_code == 408, response.text
        assert response.json()["error"]["code"] == "request_timeout"
        assert client.get(f"{url}/healthz").status_code == 200


def test_a_client_that_goes_away_frees_its_generation(models, serve_port):
    """A client that closes its connection during a (non-streaming) completion: its sequences leave the engine's
    batch at once instead of generating to the end for nobody."""
    url = deploy_app(models, serve_port, "causal_lm", "gone", max_new_tokens=120)
    # 8 choices of 120 sampled tokens (temperature 1 over a random model's ~30k tokens: an early EOS is rare).
    body = json.dumps({"model": LM_ID, "prompt": "Tell me", "max_tokens": 120, "n": 8, "seed": 0}).encode()
    with httpx.Client(timeout=30) as client:
        def counts() -> dict[str, int]:
            return client.get(f"{url}/v1/replica").json()["generation"][LM_ID]

        start = time.monotonic()
        whole = client.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        took = time.monotonic() - start
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 8 * 60, whole.text
        assert counts() == {"running": 0, "waiting": 0, "abandoned": 0}

        where = urlsplit(url)
        sock = socket.create_connection((where.hostname, where.port))
        sock.sendall(f"POST {where.path}/v1/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while sum(counts().values()) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.close()  # while its 8 sequences are generating
        closed = time.monotonic()
        while (now := counts())["running"] + now["waiting"] and time.monotonic() < closed + 30:
            time.sleep(0.01)
        freed = time.monotonic() - closed
    print(f"client gone: the whole request took {took:.2f}s; its sequences were freed {freed:.2f}s after the close")
    assert now == {"running": 0, "waiting": 0, "abandoned": 8}
    assert freed < took


def _replica_names(app: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def test_killed_replica_is_replaced(models, serve_port):
    """Replica loss under load: one of two replicas is killed during a steady stream of requests. The service
    keeps answering (the other replica takes the traffic while Serve starts a replacement). The few requests that
    fail get a clean 5xx (the JSON error shape, or the plain-text 500/502/503 that HAProxy itself gives for a
    request it cannot place, README, Serving), except the one request in flight on the killed replica: HAProxy
    closes its connection without an answer (a client retries it, as the openai package does)."""
    import ray

    url = deploy_app(models, serve_port, "sequence_classification", "kill", num_replicas=2)
    victim = _replica_names("kill")[0]
    stop, outcomes = threading.Event(), []

    def traffic():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/v1/classify", json={"input": "still there?"})
                    outcomes.append((r.status_code, r.text))
                except httpx.HTTPError as exc:
                    outcomes.append(("error", repr(exc)))
                time.sleep(0.02)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = len(outcomes)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            replicas = _replica_names("kill")
            if len(replicas) == 2 and victim not in replicas and len(outcomes) > killed_at + 20:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    assert victim not in _replica_names("kill") and len(_replica_names("kill")) == 2
    after = outcomes[killed_at:]
    failed = [(status, body) for status, body in after if status != 200]
    print(f"replica loss under load: {len(after)} requests after the kill, {len(failed)} failed: "
          f"{sorted({str(status) for status, _ in failed})}")
    assert len(failed) <= max(3, len(after) // 10), failed
    assert sum(status == "error" for status, _ in failed) <= 1, failed  # the request in flight on the victim
    for status, body in failed:
        if status == "error":
            continue
        assert status in (500, 502, 503), (status, body)
        if body.lstrip().startswith("{"):
            assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}, body
    assert [status for status, _ in after[-3:]] == [200, 200, 200]


def test_serve_command_detached_reuses_the_running_serve(models, serve_port, capsys):
    from cluster.ingress import LABELS
    from cluster.serve_command import serve_command

    folder = models["question_answering"]
    code = serve_command(str(folder), ["serve.route_prefix=/cli", f"serve.port={free_port()}",
                                       "serve.cpus_per_replica=0.5"], None, True, None)
    assert code == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{serve_port}/cli/v1/qa" in out  # the running proxy's port, not the requested one
    assert f"(HTTP ingress: {LABELS[SERVE_PROXY]})" in out
    assert httpx.get(f"http://127.0.0.1:{serve_port}/cli/healthz").json()["task"] == "question_answering"


# ---- the Serve config file (no Ray needed) ---------------------------------------------------------------------

def test_config_out_for_a_model_folder(models, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve_command import serve_command

    out = tmp_path / "serve.yaml"
    code = serve_command(str(models["sequence_classification"]),
                         ["serve.autoscaling.max_replicas=3", "serve.max_queued_requests=10", "serve.port=9000"],
                         None, False, str(out))
    assert code == 0
    text = out.read_text()
    assert text.startswith("# Ray Serve config")
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in text  # serve.proxy's default, which the Ray containers' env sets
    document = yaml.safe_load(text)
    ServeDeploySchema.model_validate(document)
    assert document["http_options"]["port"] == 9000
    [app] = document["applications"]
    assert app["import_path"] == "serving.app:build_app"
    assert app["args"]["model_dir"] == str(models["sequence_classification"].resolve())
    [deployment] = app["deployments"]
    assert deployment["name"] == "RayfineServer"
    assert deployment["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in deployment
    assert deployment["max_queued_requests"] == 10 and deployment["max_ongoing_requests"] == 32


def test_config_out_for_a_run_config(models, tmp_path):
    import shutil

    from cluster.serve_command import serve_command

    run_dir = tmp_path / "runs" / "demo"
    shutil.copytree(models["sequence_classification"], run_dir / "model")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({
        "task": "sequence_classification", "model": {"name_or_path": "unused"}, "data": {"train": "x.jsonl"},
        "serve": {"num_replicas": 2, "max_batch_size": 4}, "output": {"dir": str(tmp_path / "runs")}}))
    out = tmp_path / "serve.yaml"
    assert serve_command(str(config), ["serve.port=8123"], None, False, str(out)) == 0
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["args"]["model_dir"] == str((run_dir / "model").resolve())
    assert app["args"]["serve"]["max_batch_size"] == 4 and app["args"]["serve"]["port"] == 8123
    assert app["deployments"][0]["num_replicas"] == 2


def test_serve_command_user_errors(models, tmp_path):
    from cluster.serve_command import serve_command
    from core.errors import ConfigError, UserError

    with pytest.raises(UserError, match="not found"):
        serve_command(str(tmp_path / "missing"), [], None, False, None)
    with pytest.raises(ConfigError, match="only serve"):
        serve_command(str(models["causal_lm"]), ["training.epochs=3"], None, False, str(tmp_path / "x.yaml"))
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        serve_command(str(models["causal_lm"]), ["serve.max_batch_size=0"], None, False, str(tmp_path / "x.yaml"))
    with pytest.raises(ConfigError, match="max_queued_requests"):
        serve_command(str(models["causal_lm"]), ["serve.max_queued_requests=0"], None, False,
                      str(tmp_path / "x.yaml"))
    with pytest.raises(UserError, match="no config.json"):
        serve_command(str(tmp_path), [], None, False, str(tmp_path / "x.yaml"))


def test_a_model_that_cannot_load_is_a_user_error(models, serve_port, tmp_path):
    import shutil

    from core.errors import UserError
    from serving.deploy import deploy

    broken = tmp_path / "broken"
    shutil.copytree(models["sequence_classification"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    from core.config import ServeConfig

    with pytest.raises(UserError, match="failed to start: .*Safetensor"):
        deploy(broken, ServeConfig(port=serve_port, route_prefix="/broken", cpus_per_replica=0.5), name="broken")
