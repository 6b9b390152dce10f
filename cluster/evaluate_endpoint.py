"""``rayfine evaluate CONFIG --endpoint URL``: the task's metrics computed from a running deployment's answers.

The records are the ones ``rayfine evaluate --model`` reads (``--data``, else the config's test, else validation
data, read and checked by the same functions: in this process when small and local, else through Ray Data), sent
to the task's endpoint in batches; the metrics are computed by the task adapter's own functions from the answers.
So a served model can be checked on a user's own labelled data, and a deployment against its ``eval.json``:

- sequence_classification: ``/v1/classify``, accuracy and per-class precision/recall/F1;
- token_classification: ``/v1/ner`` on the words joined by spaces; each word is tagged B-/I- by the entity whose
  character span covers it, then entity F1 with seqeval semantics (as evaluation);
- question_answering: ``/v1/qa``, exact match and F1 (SQuAD).

causal_lm is refused: its metrics (loss, perplexity) need the model's logits, which the endpoint does not return.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from core.config import RunConfig
from core.errors import UserError

logger = logging.getLogger(__name__)

BATCH = 16  # inputs per request (the server batches them further)
ENDPOINTS = {"sequence_classification": "/v1/classify", "token_classification": "/v1/ner",
             "question_answering": "/v1/qa"}


def evaluation_records(cfg: RunConfig, data: Optional[str]) -> list[dict[str, Any]]:
    """The records ``rayfine evaluate`` reads, checked the same way (file and line of every problem)."""
    from training.data import EvaluationData

    return EvaluationData(cfg, data).rows()


class Endpoint:
    """A deployment's HTTP API, with its errors turned into user errors."""

    def __init__(self, url: str, api_key: Optional[str]):
        import httpx

        self.url = url.rstrip("/")
        self.model: Optional[str] = None  # the served model's id, once checked
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=120.0)

    def call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        import httpx

        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise UserError(f"--endpoint {self.url}: {type(exc).__name__}: {exc}; is the model served there "
                            "(rayfine serve prints the URL)?") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - not our error shape
                message = response.text[:300]
            hint = "; pass --api-key (or set RAYFINE_API_KEY)" if response.status_code == 401 else ""
            raise UserError(f"--endpoint {self.url}{path}: HTTP {response.status_code}: {message}{hint}")
        return response.json()


def open_endpoint(cfg: RunConfig, url: str, api_key: Optional[str] = None) -> Endpoint:
    """The deployment at ``url``, checked to serve a model of ``cfg``'s task (before any data is read)."""
    if cfg.task not in ENDPOINTS:
        raise UserError(f"--endpoint: task {cfg.task}'s metrics (loss, perplexity) need the model's logits, which "
                        "the endpoint does not return; evaluate the model folder with --model RUN/model instead")
    if cfg.task == "sequence_classification" and cfg.data.text_pair_column:
        raise UserError("--endpoint: /v1/classify takes single texts; a model of text pairs "
                        "(data.text_pair_column) is evaluated with --model RUN/model")
    endpoint = Endpoint(url, api_key or os.environ.get("RAYFINE_API_KEY"))
    health = endpoint.call("GET", "/healthz")
    if health.get("task") != cfg.task:
        raise UserError(f"--endpoint {endpoint.url} serves {health.get('model')} ({health.get('task')}); the "
                        f"config's task is {cfg.task}")
    endpoint.model = health.get("model")
    return endpoint


def evaluate_endpoint(cfg: RunConfig, endpoint: Endpoint, data: Optional[str] = None) -> dict[str, Any]:
    """The task's metrics of the deployment's answers on ``data`` (default: the config's evaluation data); needs
    Ray (the records are read as ``rayfine evaluate --model`` reads them)."""
    rows = evaluation_records(cfg, data)
    logger.info("Evaluating %s (%s) on %d records", endpoint.model, endpoint.url, len(rows))
    return {"sequence_classification": _classification, "token_classification": _ner,
            "question_answering": _qa}[cfg.task](endpoint, rows)


def _batches(rows: list, size: int = BATCH):
    for start in range(0, len(rows), size):
        yield rows[start: start + size]


def _classification(endpoint: Endpoint, rows: list[dict]) -> dict[str, Any]:
    import numpy as np

    from training.metrics import classification_metrics

    answers = []
    for chunk in _batches(rows):
        answers += endpoint.call("POST", "/v1/classify", {"input": [r["text"] for r in chunk]})["data"]
    names = list(answers[0]["scores"])  # the model's labels, in its order
    unknown = sorted({r["label"] for r in rows} - set(names))
    if unknown:
        raise UserError(f"label(s) {', '.join(unknown)} of the evaluation data are not ones the served model knows "
                        f"({', '.join(names)})")
    index = {name: i for i, name in enumerate(names)}
    preds = np.array([index[a["label"]] for a in answers], dtype=np.int64)
    golds = np.array([index[r["label"]] for r in rows], dtype=np.int64)
    return classification_metrics(preds, golds, names)


def word_tags(words: list[str], entities: list[dict]) -> list[str]:
    """B-/I- tags of ``words`` (joined by single spaces) from entities with character offsets: a word inside an
    entity's span is tagged with its type, B- for the entity's first word."""
    tags, position = [], 0
    for word in words:
        start, end = position, position + len(word)
        position = end + 1
        tag = "O"
        for entity in entities:
            if entity["start"] < end and start < entity["end"]:
                tag = ("B-" if start <= entity["start"] else "I-") + entity["entity"]
                break
        tags.append(tag)
    return tags


def _ner(endpoint: Endpoint, rows: list[dict]) -> dict[str, Any]:
    from training.span_metrics import entity_metrics

    gold, pred = [], []
    for chunk in _batches(rows):
        words = [[str(w) for w in r["tokens"]] for r in chunk]
        answers = endpoint.call("POST", "/v1/ner", {"input": [" ".join(w) for w in words]})["data"]
        for ws, entities, record in zip(words, answers, chunk):
            pred.append(word_tags(ws, entities))
            gold.append([str(t) for t in record["tags"]])
    return entity_metrics(gold, pred)


def _qa(endpoint: Endpoint, rows: list[dict]) -> dict[str, Any]:
    from training.span_metrics import squad_metrics

    predictions, golds = [], []
    for chunk in _batches(rows):
        items = [{"question": r["question"], "context": r["context"]} for r in chunk]
        answers = endpoint.call("POST", "/v1/qa", {"input": items})["data"]
        predictions += [a["answer"] for a in answers]
        golds += [[str(t) for t in r["answer_texts"]] for r in chunk]
    return squad_metrics(predictions, golds)


def endpoint_command(cfg: RunConfig, endpoint: Endpoint, data: Optional[str],
                     output: Optional[str]) -> dict[str, Any]:
    """``rayfine evaluate CONFIG --endpoint URL``: print the metrics table (and write ``output``)."""
    import json
    from pathlib import Path

    from training.evaluate import format_metrics_table

    url = endpoint.url
    metrics = evaluate_endpoint(cfg, endpoint, data)
    logger.info(f"Evaluation of the deployment at {url} on {data or 'the config data'}:\n"
                f"{format_metrics_table(metrics)}")
    if output:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics
