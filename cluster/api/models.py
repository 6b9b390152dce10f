"""Inference at the jobs API's base URL: each succeeded job's ``ft:`` model, and each causal-LM base model, answers
``/v1/chat/completions``, ``/v1/completions`` and the task endpoints, served by one multi-model Ray Serve app on
the cluster.

- The registry (``STORAGE/models.json``, see ``serving.catalog``) lists the models the app answers; this server
  rewrites it when a job succeeds or a model is deleted, and the app's replicas re-read it (no redeploy): a model
  answers as soon as its job has succeeded and stops answering as soon as it is deleted.
- The app (``rayfine-models`` at the route prefix ``/rayfine-models`` of the cluster's Serve ingress) is deployed
  by a Ray job running ``rayfine serve STORAGE/models.json --name rayfine-models --detach`` on the cluster, when
  this server starts and the app does not answer yet (a restarted server finds it running). Replicas load each
  model on its first request (Serve's model multiplexing); LoRA models share one copy of their base.
- A request is checked here (API key, a model this server knows) and relayed to Serve with the
  ``serve_multiplexed_model_id`` header, which routes it to a replica that already holds the model. Answers,
  streams included, are relayed as they come; a client that goes away closes the upstream request, which stops
  its generation. The replicas check the same API keys (as digests) and apply ``serve:``'s limits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.api.errors import APIError, model_not_found
from cluster.api.settings import ApiSettings
from cluster.api.store import Store
from core.openai_errors import DIGESTS_SUFFIX, error_body, key_digest

logger = logging.getLogger("cluster.api")

APP_NAME = "rayfine-models"
ROUTE_PREFIX = "/rayfine-models"
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/ner", "/v1/qa")
DEPLOY_TIMEOUT_S = 600.0
RETRY_DEPLOY_S = 30.0
# Headers of Serve's answer that are not passed on (hop-by-hop, or set again by this server).
_DROPPED = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}


class ModelServing:
    """The registry, the deployment of the models app, and the relay of inference requests to it."""

    def __init__(self, settings: ApiSettings, store: Store, client_factory):
        self.settings, self.store = settings, store
        self.registry = settings.storage / "models.json"
        self.serve_cfg = settings.serve.model_copy(update={"route_prefix": ROUTE_PREFIX,
                                                           "api_keys_env": settings.api_keys_env})
        self.url = settings.serve_url.rstrip("/") + ROUTE_PREFIX
        self.state, self.problem = "starting", None  # starting | ready | failed (problem says why)
        self._client_factory = client_factory
        self._known: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._http = None

    # ---- the registry ------------------------------------------------------------------------------------------
    def served_models(self) -> dict[str, dict[str, Any]]:
        """Model id -> registry entry: the causal-LM base models, then every succeeded, undeleted job's model."""
        models: dict[str, dict[str, Any]] = {}
        for base in self.settings.base_models.values():
            if base.config.task == "causal_lm":
                models[base.name] = {"path": base.model_reference or base.config.model.name_or_path,
                                     "owned_by": "system", "created": base.created_at}
        for job in self.store.served_jobs():
            models[job["fine_tuned_model"]] = {"path": f"{job['run_dir']}/model", "owned_by": "user",
                                               "created": job["finished_at"] or job["created_at"]}
        return models

    def sync(self) -> None:
        """Rewrite the registry from the store (after a job succeeded or a model was deleted)."""
        from serving.catalog import write_registry

        with self._lock:
            models = self.served_models()
            write_registry(self.registry, models, self.serve_cfg.model_dump(mode="json"))
            self._known = models

    def known(self, model_id: str) -> bool:
        return model_id in self._known

    # ---- the app on the cluster --------------------------------------------------------------------------------
    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._keep_deployed, name="rayfine-api-models", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _keep_deployed(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._healthy():
                    self._set_state("ready")
                else:
                    self._deploy()
            except Exception as exc:  # noqa: BLE001 - reported on every inference request until it works
                self._set_state("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self._stopping.wait(RETRY_DEPLOY_S if self.state != "ready" else 10.0)

    def _set_state(self, state: str, problem: Optional[str] = None) -> None:
        if (state, problem) != (self.state, self.problem):
            logger.info("models app at %s: %s%s", self.url, state, f" ({problem})" if problem else "")
        self.state, self.problem = state, problem

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _deploy(self) -> None:
        """Deploy the models app with a Ray job on the cluster and wait until it answers."""
        from cluster.jobs import failure_reason

        client = self._client_factory()
        job_id = f"rayfine-models-{int(time.time())}"
        env = {}
        if self.settings.api_keys:
            digests = ",".join(sorted(key_digest(k) for k in self.settings.api_keys))
            env[self.settings.api_keys_env + DIGESTS_SUFFIX] = digests
        client.submit_rayfine(["serve", str(self.registry), "--name", APP_NAME, "--detach"], submission_id=job_id,
                              metadata={"rayfine_command": "serve"}, env_vars=env)
        logger.info("models app: deploying with Ray job %s", job_id)
        deadline = time.time() + DEPLOY_TIMEOUT_S
        while not self._stopping.is_set() and time.time() < deadline:
            state = client.status(job_id)
            if state.finished:
                if state.status != "SUCCEEDED":
                    raise RuntimeError(f"deploying the models app failed (Ray job {job_id}){failure_reason(state)}")
                break
            time.sleep(1.0)
        if self._healthy():
            self._set_state("ready")
        else:
            raise RuntimeError(f"the models app does not answer at {self.url}/healthz (Ray job {job_id} deployed "
                               "it; is --serve-url the cluster's Serve ingress?)")

    # ---- relaying requests -------------------------------------------------------------------------------------
    async def relay(self, request: Request, path: str):
        """Check the request's model here, then pass the request to the models app and its answer back."""
        import httpx

        body = await _read_capped(request, self.serve_cfg.max_request_bytes)
        model = _model_of(body)
        if not self.known(model):
            raise model_not_found(model)
        if self.state != "ready":
            detail = f": {self.problem}" if self.problem else "; try again in a few seconds"
            return _unavailable(f"The model server is {self.state}{detail}")
        headers = {"content-type": "application/json", "serve_multiplexed_model_id": model}
        for name in ("authorization", "x-request-id"):
            if name in request.headers:
                headers[name] = request.headers[name]
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.serve_cfg.request_timeout_s + 30, connect=5))
        try:
            upstream = await self._http.send(self._http.build_request("POST", f"{self.url}{path}", content=body,
                                                                      headers=headers), stream=True)
        except httpx.HTTPError as exc:
            return _unavailable(f"The model server did not answer ({type(exc).__name__}); try again shortly.")
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED}

        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()  # also when the client went away: Serve cancels the request

        return StreamingResponse(chunks(), status_code=upstream.status_code, headers=passed)

    async def replica_status(self, request: Request) -> Optional[dict[str, Any]]:
        """``/v1/replica`` of the models app (the replica Serve routes this call to); None when it does not answer."""
        import httpx

        headers = {k: request.headers[k] for k in ("authorization",) if k in request.headers}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.get(f"{self.url}/v1/replica", headers=headers)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "server_error", None, "model_server_unavailable"), status_code=503,
                        headers={"Retry-After": "5"})


async def _read_capped(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _model_of(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str) or not model:
        raise APIError(400, "Name the model in the body's 'model' (GET /v1/models lists them).", param="model",
                       code="missing_model")
    return model
