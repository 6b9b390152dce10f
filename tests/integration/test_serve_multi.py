"""Several models from one Serve app (``rayfine serve A B ...`` and ``rayfine api``'s models): models picked by the
body's ``model``, loaded on demand with Serve's model multiplexing, LoRA adapters on one shared copy of their base.

One app with one replica holding at most 3 models: a tiny GPT-2 (whole model), two LoRA adapters of it with
random weights (so each answers differently), a tiny classifier, and a registry file that adds and removes
models while the app runs. Greedy answers are checked token for token against transformers and peft run in
this process.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from ray import serve

from tests.serve_fixtures import SERVE_PROXY, build_lora_adapter, free_port, metrics_not_exported

pytestmark = pytest.mark.integration

PROMPTS = ["the cat sat on", "a long time ago in a land far"]


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base = tiny_models["causal_lm"]
    return {"base": base, "cls": tiny_models["sequence_classification"],
            "lora-a": build_lora_adapter(base, root / "lora-a", seed=1, model_id="lora-a"),
            "lora-b": build_lora_adapter(base, root / "lora-b", seed=2, model_id="lora-b"),
            "lora-c": build_lora_adapter(base, root / "lora-c", seed=3, model_id="lora-c"),
            "registry": root / "models.json"}


@pytest.fixture(scope="module")
def app(folders, ray_local):
    from core.config import ServeConfig
    from serving.catalog import write_registry
    from serving.deploy import deploy

    write_registry(folders["registry"], {}, {})
    cfg = ServeConfig(port=free_port(), route_prefix="/multi", num_replicas=1, cpus_per_replica=0.5,
                      threads_per_replica=1, max_new_tokens=16, max_models_per_replica=3, proxy=SERVE_PROXY)
    models = {"tiny-lm": folders["base"], "lora-a": folders["lora-a"], "lora-b": folders["lora-b"],
              "tiny-cls": folders["cls"]}
    try:
        yield deploy(None, cfg, name="multi", models=models, registry=folders["registry"])
    finally:
        serve.shutdown()  # its proxy's port goes with it; Ray itself is the session's


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as c:
        yield c


def complete(client, app, model: str, prompt: str, **extra) -> httpx.Response:
    return client.post(f"{app}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, **extra})


def reference(folder, prompt: str, n: int = 8) -> str:
    """Greedy text of the folder's model (a peft adapter over its base, or the whole model) in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # an adapter folder loads its base through peft
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_every_model_is_listed_and_unknown_ones_are_404(app, client):
    listed = client.get(f"{app}/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["lora-a", "lora-b", "tiny-cls", "tiny-lm"]
    assert client.get(f"{app}/v1/models/lora-a").json()["id"] == "lora-a"
    missing = complete(client, app, "no-such-model", "hello")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get(f"{app}/v1/models/no-such-model").status_code == 404
    unnamed = client.post(f"{app}/v1/completions", json={"prompt": "hello"})
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"
    wrong_task = client.post(f"{app}/v1/classify", json={"model": "lora-a", "input": "fine"})
    assert wrong_task.status_code == 404 and wrong_task.json()["error"]["code"] == "unsupported_endpoint"


def test_adapters_share_one_base_and_answer_as_peft_does(app, client, folders):
    # Interleaved, so each request switches the shared base's active adapter.
    for prompt in PROMPTS:
        for model in ("lora-a", "lora-b", "tiny-lm", "lora-a"):
            answer = complete(client, app, model, prompt)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == model
            folder = folders["base"] if model == "tiny-lm" else folders[model]
            assert answer.json()["choices"][0]["text"] == reference(folder, prompt), (model, prompt)
    texts = {m: complete(client, app, m, PROMPTS[0]).json()["choices"][0]["text"] for m in ("lora-a", "lora-b")}
    assert texts["lora-a"] != texts["lora-b"]  # two adapters, two models
    status = client.get(f"{app}/v1/replica").json()
    assert sorted(status["models_loaded"]) == ["lora-a", "lora-b", "tiny-lm"]
    assert [b["models"] for b in status["base_models_loaded"]] == [["lora-a", "lora-b"]]
    assert status["loads"] == 3 and status["evictions"] == 0


def test_a_stream_from_an_adapter_ends_with_done(app, client, folders):
    with client.stream("POST", f"{app}/v1/chat/completions", json={
            "model": "lora-b", "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "max_tokens": 6, "temperature": 0}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["model"] == "lora-b" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_past_the_cap_the_least_recently_used_model_is_unloaded(app, client):
    for model in ("lora-a", "tiny-lm", "lora-b"):  # lora-a is now the least recently used of the three
        assert complete(client, app, model, "x").status_code == 200
    classified = client.post(f"{app}/v1/classify", json={"model": "tiny-cls", "input": ["good", "bad"]})
    assert classified.status_code == 200 and len(classified.json()["data"]) == 2
    status = client.get(f"{app}/v1/replica").json()
    assert sorted(status["models_loaded"]) == ["lora-b", "tiny-cls", "tiny-lm"]
    assert status["evictions"] == 1
    # The evicted adapter leaves the shared base once its engine's last requests are done (in the background).
    deadline = time.time() + 10
    while [b["models"] for b in status["base_models_loaded"]] != [["lora-b"]] and time.time() < deadline:
        time.sleep(0.1)
        status = client.get(f"{app}/v1/replica").json()
    assert [b["models"] for b in status["base_models_loaded"]] == [["lora-b"]]
    assert complete(client, app, "lora-a", PROMPTS[0]).status_code == 200  # loads again on demand


def test_models_come_and_go_with_the_registry(app, client, folders):
    from serving.catalog import write_registry

    assert complete(client, app, "lora-c", "hi").status_code == 404
    write_registry(folders["registry"], {"lora-c": {"path": str(folders["lora-c"]), "owned_by": "user"}}, {})
    deadline = time.time() + 10
    while (answer := complete(client, app, "lora-c", PROMPTS[1])).status_code == 404 and time.time() < deadline:
        time.sleep(0.2)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == reference(folders["lora-c"],
                                                                                          PROMPTS[1])
    assert "lora-c" in [m["id"] for m in client.get(f"{app}/v1/models").json()["data"]]
    write_registry(folders["registry"], {}, {})
    gone = complete(client, app, "lora-c", "hi")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_per_model_metrics_loads_and_evictions_are_exported(app, client):
    import re

    assert complete(client, app, "lora-b", "count me").status_code == 200
    wanted = {
        "per-model requests": re.compile(r'^ray_rayfine_serve_requests_total\{[^}]*endpoint="/v1/completions"'
                                         r'[^}]*model="lora-b"[^}]*status="200"', re.M),
        "per-model latency": re.compile(r'^ray_rayfine_serve_request_latency_ms_bucket\{[^}]*model="lora-a"', re.M),
        "models loaded": re.compile(r'^ray_rayfine_serve_models_loaded\{[^}]*\} 3(\.0)?$', re.M),
        "loads": re.compile(r'^ray_rayfine_serve_model_loads_total\{[^}]*model="tiny-cls"[^}]*\} 1(\.0)?$', re.M),
        "evictions": re.compile(r'^ray_rayfine_serve_model_evictions_total\{[^}]*\} [1-9]', re.M),
        "load time": re.compile(r'^ray_rayfine_serve_model_load_seconds_count\{[^}]*model="lora-a"', re.M),
    }
    missing = metrics_not_exported(wanted)
    assert not missing, f"metrics not exported: {missing}"


def test_a_model_that_does_not_load_is_503_and_the_others_answer(app, client, folders, tmp_path):
    import shutil

    from serving.catalog import write_registry

    broken = tmp_path / "broken"
    shutil.copytree(folders["lora-c"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    write_registry(folders["registry"], {"broken": {"path": str(broken)}}, {})
    try:
        deadline = time.time() + 10
        while (answer := complete(client, app, "broken", "hi")).status_code == 404 and time.time() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
        assert complete(client, app, "lora-b", "hi").status_code == 200
    finally:
        write_registry(folders["registry"], {}, {})
