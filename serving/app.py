"""The Ray Serve application: one ``ModelServer`` deployment (named ``RayfineServer``) per model folder,
with a FastAPI ingress built per replica by ``serving.router``.

``build_app`` is the application builder that Serve config files name (``import_path:
serving.app:build_app``); its ``args`` are ``{"model_dir": ..., "serve": {<serve: section>},
"trust_remote_code": false}``. ``serving.deploy`` binds the same app with ``bind_app``.

Batching (encoder tasks). ``@serve.batch`` groups requests; ``EncoderRunner`` splits each batch into
length buckets. The model runs on the replica's user event loop on purpose: while a batch computes, new
requests wait in Serve's queue instead of forming many one-item batches (``@serve.batch`` forms the next
batch while the previous one runs), so the next batch takes everything that arrived meanwhile. Serve
keeps health checks on its own loop. A request alone in the replica skips the batch queue (and its
``batch_wait_timeout_s``): there is no company to wait for.

API keys are read once, when the replica starts, from the env var named by ``serve.api_keys_env`` (set on the
Ray nodes, e.g. from a Kubernetes Secret) and as SHA-256 digests from ``{serve.api_keys_env}_SHA256``, which
``serving.deploy`` passes through the ``runtime_env`` (Ray workers see the driver's environment only that way,
and Ray's dashboard shows runtime envs: so only digests travel). The replica keeps digests only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from ray import serve

from core.config import ServeConfig
from core.errors import ConfigError, UserError
from core.openai_errors import read_api_key_digests
from serving.model_folder import ENDPOINT_TASKS, ModelSpec, load_model_spec

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "RayfineServer"  # the name k8s/rayservice.yaml configures
# Placeholders: __init__ applies serve.max_batch_size and serve.batch_wait_timeout_s.
_BATCH_DEFAULTS = dict(max_batch_size=16, batch_wait_timeout_s=0.005)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class ModelServer:
    """Answers the endpoints of one model folder (``model_dir``), or of many: a multi-model app (``models``: id ->
    folder, and/or ``registry``: a registry file, see ``serving.catalog``) loads each model on its first request
    with Serve's model multiplexing and routes by the body's ``model``."""

    def __init__(self, model_dir: Optional[str], serve: dict[str, Any], trust_remote_code: bool = False,
                 models: Optional[dict[str, Any]] = None, registry: Optional[str] = None):
        from core import collector  # not at module level: Serve pickles this class by value

        collector.pause()  # the imports and the model load, without collections of what is not garbage yet
        try:
            self._start(model_dir, serve, trust_remote_code, models, registry)
        finally:
            collector.resume()

    def _start(self, model_dir, serve, trust_remote_code, models, registry) -> None:
        import torch

        from serving.telemetry import Telemetry, access_logger

        self.cfg = ServeConfig.model_validate(serve)
        threads = replica_threads(self.cfg)
        torch.set_num_threads(threads)
        device = "cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        trust_remote_code = trust_remote_code or self.cfg.trust_remote_code
        self.multi = model_dir is None
        if self.multi:
            from serving.catalog import ModelCatalog
            from serving.pool import ModelPool

            self.spec = None
            self.catalog = ModelCatalog(models, registry)
            self.pool = ModelPool(device, self.cfg, trust_remote_code)
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
            # Serve's model multiplexing: a per-replica LRU cache of loaded models, and routing of requests with
            # the serve_multiplexed_model_id header to a replica that holds (or is loading) that model.
            from ray.serve import multiplexed  # (``serve`` is the serve: section here)

            async def load(model_id: str):  # a function, not a bound method: Serve keeps its cache on it
                return await self._load_model(model_id)

            self._get_model = multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
            label = "multi-model"
        else:
            from serving.pool import Served, build_task_model

            self.spec: ModelSpec = load_model_spec(model_dir)
            self.single = Served(self.spec, build_task_model(self.spec, device, self.cfg,
                                                             trust_remote_code))
            label = self.spec.model_id
        self.api_keys = read_api_key_digests(self.cfg.api_keys_env)  # digests only
        self.telemetry = Telemetry(label)
        self.access_log = access_logger()
        self.in_flight = 0
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # requests' inputs, off the loop
        self._predict_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        logger.info("serving %s on %s with %d torch threads; auth %s", label if self.multi else
                    f"{label} ({self.spec.task})", device, threads, "on" if self.api_keys else "off")

    def __serve_build_asgi_app__(self):
        from serving.router import build_router

        return build_router(self)

    # ---- which model answers a request ----------------------------------------------------------------
    async def served(self, requested: Optional[str], path: str):
        """The loaded model a request names (``model``), loading it first on a multi-model replica. 404
        ``model_not_found`` for a model this app does not serve, ``unsupported_endpoint`` for one of another task."""
        from serving.errors import check_model
        from serving.telemetry import REQUEST_MODEL  # not at module level: Serve pickles this class by value

        if not self.multi:
            check_model(requested, self.spec.model_id)
            return self.single
        served = await self._served(requested, path)
        note = REQUEST_MODEL.get()
        if note is not None:
            note["model"] = served.spec.model_id
        return served

    async def _served(self, requested: Optional[str], path: str):
        from serving.errors import ServingError, unknown_model

        if not requested:
            raise ServingError(400, "This server serves several models; name one in the body's 'model' "
                                    "(GET /v1/models lists them).", param="model", code="missing_model")
        entry = self.catalog.get(requested)
        if entry is None:
            raise unknown_model(requested)
        try:
            spec = self.catalog.spec(entry)
        except UserError as exc:
            logger.error("%s: %s", requested, exc)
            raise ServingError(503, f"The model '{requested}' cannot be loaded now; see the replica log.",
                               param="model", code="model_unavailable") from None
        needs = ENDPOINT_TASKS.get(path)
        if needs and spec.task != needs:
            raise ServingError(404, f"{path} needs a {needs} model; '{requested}' is a {spec.task} model.",
                               param="model", code="unsupported_endpoint")
        return await self._get_model(requested)

    async def _load_model(self, model_id: str):
        """Serve's multiplexing calls this on a cache miss (one load at a time per replica)."""
        from serving.errors import ServingError, unknown_model

        entry = self.catalog.get(model_id)
        if entry is None:
            raise unknown_model(model_id)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            served = await loop.run_in_executor(self._loader, lambda: self.pool.load(self.catalog.spec(entry)))
        except Exception:  # a folder that does not load (corrupt weights, an adapter whose base is gone)
            logger.exception("loading %s from %s failed", model_id, entry.path)
            raise ServingError(503, f"The model '{model_id}' could not be loaded; see the replica log.",
                               param="model", code="model_unavailable") from None
        seconds = time.perf_counter() - start
        self.telemetry.record_load(model_id, seconds, len(self.pool.loaded), self.pool.evictions)
        logger.info("loaded %s (%s%s) in %.2fs; %d model(s) on this replica", model_id, served.spec.task,
                    ", LoRA adapter on a shared base" if served.base else "", seconds, len(self.pool.loaded))
        return served

    def replica_status(self) -> dict[str, Any]:
        status = self.pool.status() if self.multi else {"models_loaded": [self.spec.model_id]}
        status["generation"] = {served.spec.model_id: served.model.counts() for served in self._loaded()
                                if served.spec.task == "causal_lm"}
        try:
            status["replica"] = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a replica (tests of the router alone)
            status["replica"] = None
        return status

    # ---- encoder tasks: dynamic batching --------------------------------------------------------------
    async def predict(self, served, encoded: list) -> tuple[list, BatchInfo]:
        """Results for one request's inputs (for the model ``served``), and the largest model batch they ran in."""
        # Let the requests that are ready to run enter the app (and in_flight) before this one decides it is
        # alone. Behind HAProxy a request's body is often in hand already, so nothing else yields between a
        # request's arrival and this line: without this, requests that arrived together would run here one
        # after another, each finding itself alone, and never batch.
        await asyncio.sleep(0)
        if self.in_flight == 1 and len(encoded) <= self.cfg.max_batch_size:
            # Alone in the replica: nobody to batch with, so skip the batch queue and its wait.
            outputs = self._run_batch([(served, e) for e in encoded])
        elif len(encoded) == 1:
            outputs = [await self._predict_batch((served, encoded[0]))]
        else:
            outputs = await asyncio.gather(*(self._predict_batch((served, e)) for e in encoded))
        return [result for result, _ in outputs], max((info for _, info in outputs), key=lambda i: i.size)

    @serve.batch(**_BATCH_DEFAULTS)
    async def _predict_batch(self, batch: list) -> list[tuple[Any, BatchInfo]]:
        return self._run_batch(batch)

    def _run_batch(self, batch: list) -> list[tuple[Any, BatchInfo]]:
        """``batch``: (served model, encoded input) pairs; each model runs its own inputs as one batch."""
        # Blocking on purpose (see the module docstring): torch releases the GIL, Serve's loop runs on.
        by_model: dict[int, list[int]] = {}
        for i, (served, _) in enumerate(batch):
            by_model.setdefault(id(served), []).append(i)
        outputs: list = [None] * len(batch)
        for rows in by_model.values():
            served = batch[rows[0]][0]
            start = time.perf_counter()
            results = served.model.predict([batch[i][1] for i in rows])
            info = BatchInfo(len(rows), (time.perf_counter() - start) * 1000)
            self.telemetry.record_batch(served.spec.model_id, ENDPOINT_OF_TASK[served.spec.task], len(rows))
            for i, result in zip(rows, results):
                outputs[i] = (result, info)
        return outputs

    # ---- causal LM: the model's generation engine batches the requests' decoding steps -----------------
    async def generate(self, served, prompt_ids: list[int], params, deadline: float) -> AsyncIterator[Any]:
        """Text deltas then a ``Finished`` (``serving.generation.Generator.stream``), with their metrics."""
        from serving.generation import Timing

        model, timing = served.model, Timing(time.monotonic())
        self.telemetry.set_sequences(served.spec.model_id, model.running, model.waiting + 1)
        try:
            async for event in model.stream(prompt_ids, params, deadline, timing):
                yield event
        finally:
            self.telemetry.record_generation(served.spec.model_id, timing)
            self.telemetry.set_sequences(served.spec.model_id, model.running, model.waiting)

    def check_health(self) -> None:
        """Serve's health check: a causal LM whose engine thread died fails it, and Serve replaces the replica."""
        for served in self._loaded():
            if served.spec.task == "causal_lm" and not served.model.engine.alive():
                raise RuntimeError(f"{served.spec.model_id}: the generation engine has stopped")

    def _loaded(self) -> list:
        return list(self.pool.loaded.values()) if self.multi else [self.single]


@dataclass(frozen=True)
class BatchInfo:
    size: int  # inputs in the model batch (all length buckets together)
    model_ms: float  # time in the model for the whole batch


ENDPOINT_OF_TASK = {
    "sequence_classification": "/v1/classify",
    "token_classification": "/v1/ner",
    "question_answering": "/v1/qa",
    "causal_lm": "/v1/chat/completions",
}


def replica_threads(cfg: ServeConfig) -> int:
    """Torch threads per replica: ``serve.threads_per_replica``, else the cores each replica may use.

    Ray does not set OMP_NUM_THREADS for replicas the way torchrun does; replicas sharing a node would
    each start one thread per core and oversubscribe it.
    """
    if cfg.threads_per_replica:
        return cfg.threads_per_replica
    replicas = cfg.num_replicas or (cfg.autoscaling.max_replicas if cfg.autoscaling else 1)
    return max(1, (os.cpu_count() or 1) // replicas)


def deployment_options(cfg: ServeConfig, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """``@serve.deployment`` options from the ``serve:`` section (the same keys a Serve config file uses)."""
    if cfg.max_queued_requests == 0:
        raise ConfigError("serve.max_queued_requests: Ray Serve takes -1 (unbounded) or at least 1; "
                          "use 1 to reject nearly every request that finds all replicas busy")
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
    }
    if env_vars:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
    if cfg.autoscaling is not None:
        auto = cfg.autoscaling
        options["autoscaling_config"] = {"min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
                                         "target_ongoing_requests": auto.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas or 1
    return options


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder: ``args`` = ``{"model_dir", "serve": {...}, "trust_remote_code"}`` for one model folder,
    or ``{"models": {id: folder}, "registry": FILE, "serve": ..., "trust_remote_code"}`` for a multi-model app.

    Deployment options derive from ``serve``; a Serve config file's ``deployments:`` entries override them.
    """
    cfg = ServeConfig.model_validate(args.get("serve") or {})
    trust_remote_code = bool(args.get("trust_remote_code", False))
    if args.get("model_dir"):
        return bind_app(args["model_dir"], cfg, trust_remote_code)
    return bind_models_app(args.get("models") or {}, args.get("registry"), cfg, trust_remote_code)


def bind_app(model_dir: str | os.PathLike, cfg: ServeConfig, trust_remote_code: bool = False,
             env_vars: dict[str, str] | None = None) -> serve.Application:
    """The bound application; ``env_vars`` reach the replicas through their ``runtime_env``."""
    load_model_spec(model_dir)  # fail here, with the folder named, rather than in every replica
    return ModelServer.options(**deployment_options(cfg, env_vars)).bind(
        str(model_dir), cfg.model_dump(mode="json"), trust_remote_code)


def bind_models_app(models: dict[str, str], registry: Optional[str], cfg: ServeConfig, trust_remote_code: bool = False,
                    env_vars: dict[str, str] | None = None) -> serve.Application:
    """The multi-model application: ``models`` (id -> folder) and the models of the ``registry`` file."""
    if not models and not registry:
        raise ConfigError("a multi-model app needs model folders or a model registry")
    return ModelServer.options(**deployment_options(cfg, env_vars)).bind(
        None, cfg.model_dump(mode="json"), trust_remote_code, models={k: str(v) for k, v in models.items()},
        registry=str(registry) if registry else None)
