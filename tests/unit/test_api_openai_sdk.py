"""The official ``openai`` package against a real uvicorn server (no cluster): the wire format parses into the
SDK's types, its pagination follows our cursors, and our errors become its typed exceptions."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time

import openai
import pytest
import uvicorn

from cluster.api.app import build_app
from tests.conftest import sentiment_rows
from tests.unit.test_api_http import make_settings


@contextlib.contextmanager
def running_server(app):
    """uvicorn on a free port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def sdk(tmp_path):
    app = build_app(make_settings(tmp_path, api_keys=frozenset({"sk-test"})))
    with running_server(app) as url:
        yield openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)


def jsonl_file(rows: list[dict], name: str = "train.jsonl") -> tuple[str, io.BytesIO]:
    return name, io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())


def test_files_through_the_sdk(sdk):
    created = sdk.files.create(file=jsonl_file(sentiment_rows(10)), purpose="fine-tune")
    assert created.id.startswith("file-") and created.purpose == "fine-tune" and created.status == "processed"
    assert sdk.files.retrieve(created.id).bytes == created.bytes
    assert [f.id for f in sdk.files.list()] == [created.id]
    assert json.loads(sdk.files.content(created.id).text.splitlines()[0]) == sentiment_rows(10)[0]
    assert sdk.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(created.id)


def test_sdk_errors_are_typed(sdk, tmp_path):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.files.create(file=("bad.jsonl", io.BytesIO(b'{"text": "a", "label": "x"}\nnot json\n')),
                         purpose="fine-tune")
    assert err.value.code == "invalid_file" and "line 2: malformed JSON" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-x")
    assert "available base models: minilm" in err.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(sdk.base_url), api_key="wrong", max_retries=0).files.list()


def test_jobs_events_and_pagination_through_the_sdk(sdk):
    train = sdk.files.create(file=jsonl_file(sentiment_rows(20)), purpose="fine-tune")
    val = sdk.files.create(file=jsonl_file([{"text": "so-so", "label": "neutral"}], "val.jsonl"), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model="minilm", training_file=train.id, validation_file=val.id, suffix="demo",
                                      hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
                                      metadata={"owner": "tests"})
    assert job.status == "validating_files" and job.metadata == {"owner": "tests"}
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.learning_rate_multiplier == 0.5
    deadline = time.time() + 20
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status == "validating_files" and time.time() < deadline:
        time.sleep(0.05)
    assert job.status == "failed" and job.error.code == "invalid_validation_file"
    assert "line 1: label 'neutral' never appears" in job.error.message
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=1))  # the SDK follows `after` page by page
    assert [e.message for e in events][-1] == f"Created fine-tuning job: {job.id}"
    assert len(events) == 3 and events[0].level == "error"
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=1)] == [job.id]
    assert list(sdk.fine_tuning.jobs.checkpoints.list(job.id)) == []
    with pytest.raises(openai.BadRequestError):
        sdk.fine_tuning.jobs.cancel(job.id)


def test_a_dpo_job_through_the_sdk_reports_its_method(tmp_path):
    import yaml

    from cluster.api.settings import load_base_models
    from tests.conftest import preference_rows

    lm = tmp_path / "lm.yaml"
    lm.write_text(yaml.safe_dump({"task": "causal_lm", "model": {"name_or_path": "some-lm"},
                                  "data": {"train": "unused.jsonl", "packing": True},
                                  "training": {"batch_size": 4, "beta": 0.2}, "scaling": {"num_workers": 1}}))
    settings = make_settings(tmp_path, api_keys=frozenset({"sk-test"}))
    settings.base_models |= load_base_models([str(lm)])
    with running_server(build_app(settings)) as url:
        sdk = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        pairs = sdk.files.create(file=jsonl_file(preference_rows(100), "pairs.jsonl"), purpose="fine-tune")
        job = sdk.fine_tuning.jobs.create(model="lm", training_file=pairs.id, method={
            "type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 1}}})
        assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.3
        assert job.method.dpo.hyperparameters.n_epochs == 1
        auto = sdk.fine_tuning.jobs.create(model="lm", training_file=pairs.id, method={"type": "dpo"})
        assert sdk.fine_tuning.jobs.retrieve(auto.id).method.dpo.hyperparameters.beta == 0.2  # the base's beta
        sft = sdk.fine_tuning.jobs.create(model="lm", training_file=pairs.id)
        assert sft.method.type == "supervised"
        deadline = time.time() + 20  # the same file, checked as chat data by the supervised job: it fails
        while (sft := sdk.fine_tuning.jobs.retrieve(sft.id)).status == "validating_files" and time.time() < deadline:
            time.sleep(0.05)
        assert sft.status == "failed" and sft.error.code == "invalid_training_file"
        assert "line 1: expected 'messages' (chat)" in sft.error.message
        with pytest.raises(openai.BadRequestError) as err:
            sdk.fine_tuning.jobs.create(model="minilm", training_file=pairs.id, method={"type": "dpo"})
        assert err.value.code == "invalid_method"
        with pytest.raises(openai.BadRequestError) as err:
            sdk.fine_tuning.jobs.create(model="lm", training_file=pairs.id, method={
                "type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}})
        assert "method.type is 'dpo' but method.supervised is given" in err.value.message


def test_a_job_with_a_wandb_integration_through_the_sdk(sdk, tmp_path):
    train = sdk.files.create(file=jsonl_file(sentiment_rows(12)), purpose="fine-tune")
    wandb = {"project": "reviews", "name": "try-1", "entity": "team", "tags": ["nightly"]}
    job = sdk.fine_tuning.jobs.create(model="minilm", training_file=train.id,
                                      integrations=[{"type": "wandb", "wandb": wandb}])
    for shown in (job, sdk.fine_tuning.jobs.retrieve(job.id)):
        [integration] = shown.integrations
        assert integration.type == "wandb" and integration.wandb.project == "reviews"
        assert integration.wandb.name == "try-1" and integration.wandb.tags == ["nightly"]
    # Applied to the run: the job's config tracks it in W&B under that project.
    from cluster.api.store import Store
    from core.config import RunConfig

    row = Store(tmp_path / "data" / "api.sqlite3").get_job(job.id)
    tracking = RunConfig.model_validate(row["config"]).tracking.wandb
    assert (tracking.project, tracking.name, tracking.entity, tracking.tags, tracking.mode) == (
        "reviews", "try-1", "team", ["nightly"], "online")
    for bad, param in (([{"type": "slack", "wandb": wandb}], "integrations.0.type"),
                       ([{"type": "wandb", "wandb": {"name": "x"}}], "integrations.0.wandb.project")):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.fine_tuning.jobs.create(model="minilm", training_file=train.id, integrations=bad)
        assert err.value.param == param, err.value.message
