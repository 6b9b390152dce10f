"""``build_app``: the FastAPI app of ``rayfine api`` (OpenAI's files and fine-tuning jobs endpoints).

Request handlers only check requests, read and write the store and wake the runner; the runner thread does
everything slow (file validation, submitting and following Ray jobs). A cancel asks Ray to stop the job itself,
with a timeout and without holding the runner's lock. Two ASGI middlewares wrap the routes: API keys (401 in
OpenAI's shape; ``/healthz`` stays open for probes) and the upload cap (413 before a too-large body is read).
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from cluster.api import protocol
from cluster.api.errors import (
    APIError,
    file_too_large,
    install_error_handlers,
    model_not_found,
    not_found,
    too_large,
)
from cluster.api.hyperparams import build_job_config, resolve
from cluster.api.models import INFERENCE_PATHS, ModelServing
from cluster.api.runner import JobRunner, default_client_factory
from cluster.api.settings import ApiSettings
from cluster.api.store import BadCursor, StateLock, Store, new_id
from cluster.api.validation import check_upload
from core.openai_errors import bearer_key_ok, bearer_token, key_digest, send_unauthorized

logger = logging.getLogger("cluster.api")
OPEN_PATHS = frozenset({"/healthz"})
MULTIPART_SLACK = 64 * 1024  # request bytes beyond the file itself: boundaries, headers, the purpose field
COPY_CHUNK = 1 << 20


def build_app(settings: ApiSettings, jobs_client: Any = None) -> FastAPI:
    """The app; ``jobs_client`` is a ready ``cluster.jobs.JobsClient`` (else one is made on first use)."""
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    lock = StateLock(settings.db_path)
    lock.acquire()  # UserError while another server runs on this state
    store = Store(settings.db_path)
    factory = (lambda: jobs_client) if jobs_client is not None else default_client_factory(settings.address)
    serving = ModelServing(settings, store, factory) if settings.serve_models else None
    runner = JobRunner(store, settings.storage, settings.poll_interval_s, factory,
                       {name: m.model_reference for name, m in settings.base_models.items()},
                       driver_cpus=settings.driver_cpus, on_succeeded=serving.sync if serving else None)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if serving is not None:
            serving.start()
        runner.start()
        try:
            yield
        finally:
            runner.stop()
            if serving is not None:
                serving.stop()
                await serving.aclose()
            store.close()
            lock.release()

    app = FastAPI(title="rayfine fine-tuning API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.settings, app.state.store, app.state.runner = settings, store, runner
    app.state.serving = serving
    install_error_handlers(app)
    _add_model_routes(app, settings, store, serving)
    if serving is not None:
        _add_inference_routes(app, serving)
    _add_file_routes(app, settings, store)
    _add_job_routes(app, settings, store, runner)
    app.add_middleware(UploadLimit, limit_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys)
    return app


# ---- middleware ----------------------------------------------------------------------------------------------
class ApiKeyAuth:
    """``Authorization: Bearer KEY`` on every route but /healthz, when keys are configured."""

    def __init__(self, app, keys: frozenset[str]):
        self.app, self.keys = app, frozenset(key_digest(key) for key in keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"] not in OPEN_PATHS:
            if not bearer_key_ok(dict(scope.get("headers") or []), self.keys):
                return await send_unauthorized(send)
        await self.app(scope, receive, send)


class UploadLimit:
    """Refuse uploads over the cap with 413: at once from Content-Length, or as soon as a streamed body
    passes it (the handler also counts the file's own bytes exactly)."""

    def __init__(self, app, limit_bytes: int):
        self.app, self.limit = app, limit_bytes + MULTIPART_SLACK
        self.file_limit = limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/files":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(self.file_limit)(scope, receive, send)
        state = {"bytes": 0, "over": False, "started": False}

        async def counting_receive():
            message = await receive()
            state["bytes"] += len(message.get("body", b""))
            if state["bytes"] > self.limit:
                state["over"] = True
                raise _TooLarge()
            return message

        async def replacing_send(message):
            # Whatever the app answers once the body ran over (its form parser turns the error into a 400),
            # the client gets the 413.
            if state["over"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await too_large(self.file_limit)(scope, receive, send)
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, replacing_send)
        except _TooLarge:
            if not state["started"]:
                await too_large(self.file_limit)(scope, receive, send)


class _TooLarge(Exception):
    pass


# ---- models --------------------------------------------------------------------------------------------------
def _add_model_routes(app: FastAPI, settings: ApiSettings, store: Store, serving: Optional[ModelServing]) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        out = {"status": "ok", "models": sorted(settings.base_models), "jobs": store.job_counts()}
        if serving is not None:
            out["model_server"] = serving.state
        return out

    def fine_tuned(job: dict[str, Any]) -> dict[str, Any]:
        return protocol.model_object(job["fine_tuned_model"], job["finished_at"] or job["created_at"], job["model"],
                                     owned_by="user")

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        """Base models, then the fine-tuned models of succeeded jobs (not deleted): each answers the inference
        endpoints at this base URL (base models of a causal LM task too)."""
        data = [protocol.model_object(m.name, m.created_at) for m in settings.base_models.values()]
        return {"object": "list", "data": data + [fine_tuned(j) for j in store.served_jobs()]}

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> dict[str, Any]:
        base = settings.base_models.get(model_id)
        if base is not None:
            return protocol.model_object(base.name, base.created_at)
        return fine_tuned(_served_job(store, model_id))

    @app.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str, purge: bool = False) -> dict[str, Any]:
        """OpenAI's "delete a fine-tuned model": it stops answering at once. Its run folder stays (checkpoints,
        metrics, the exported model) unless ``?purge=true``."""
        if model_id in settings.base_models:
            raise APIError(403, f"'{model_id}' is a base model of this server; only fine-tuned models can be "
                                "deleted.", param="model", code="model_not_deletable")
        job = _served_job(store, model_id)
        store.update_job(job["id"], model_deleted=1)
        if serving is not None:
            serving.sync()
        if purge and job["run_dir"]:
            run_dir = Path(job["run_dir"]).resolve()
            if run_dir.is_relative_to(settings.storage.resolve()) and run_dir != settings.storage.resolve():
                shutil.rmtree(run_dir, ignore_errors=True)
        logger.info("%s: model %s deleted%s", job["id"], model_id, " with its run folder" if purge else "")
        return {"id": model_id, "object": "model", "deleted": True}


def _served_job(store: Store, model_id: str) -> dict[str, Any]:
    """The job of a fine-tuned model that answers (its job succeeded, the model is not deleted); else 404."""
    job = store.job_of_model(model_id)
    if job is None or job["status"] != "succeeded" or job["model_deleted"]:
        raise model_not_found(model_id)
    return job


def _add_inference_routes(app: FastAPI, serving: ModelServing) -> None:
    def relay_to(path: str):
        async def infer(request: Request):
            return await serving.relay(request, path)
        return infer

    for path in INFERENCE_PATHS:
        app.add_api_route(path, relay_to(path), methods=["POST"], include_in_schema=False)

    @app.get("/v1/serving")
    async def serving_status(request: Request) -> dict[str, Any]:
        """The models app: its state, and what the replica that answers holds (models, shared LoRA bases)."""
        return {"state": serving.state, "problem": serving.problem, "url": serving.url,
                "replica": await serving.replica_status(request)}


# ---- files ---------------------------------------------------------------------------------------------------
def _add_file_routes(app: FastAPI, settings: ApiSettings, store: Store) -> None:
    configs = {name: m.config for name, m in settings.base_models.items()}

    @app.post("/v1/files")
    def upload_file(file: UploadFile = File(...), purpose: str = Form(...)) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise APIError(400, f"purpose '{purpose}' is not supported here; use purpose=fine-tune.",
                           param="purpose", code="invalid_purpose")
        file_id = new_id("file")
        # The name on disk is the generated id: nothing a client sends ever becomes part of a path.
        path = settings.files_dir / f"{file_id}.jsonl"
        size = _save_capped(file, path, settings.max_upload_bytes)
        filename = Path((file.filename or "upload.jsonl").replace("\\", "/")).name[:255] or "upload.jsonl"
        records, problem = check_upload(path, configs)
        if problem:
            path.unlink(missing_ok=True)
            raise APIError(400, f"Invalid file '{filename}': {problem}", param="file", code="invalid_file")
        row = {"id": file_id, "filename": filename, "purpose": purpose, "bytes": size, "records": records,
               "created_at": int(time.time()), "path": str(path)}
        store.add_file(row)
        logger.info("%s: uploaded %s (%d bytes, %d records)", file_id, filename, size, records)
        return protocol.file_object(row)

    @app.get("/v1/files")
    def list_files(purpose: Optional[str] = None, after: Optional[str] = None,
                   limit: int = Query(10000, ge=1, le=10000),
                   order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
        rows, more = _paged(lambda: store.list_files(purpose, after, limit, order == "desc"))
        return protocol.page([protocol.file_object(r) for r in rows], more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return protocol.file_object(_file(store, file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        row = _file(store, file_id)
        return FileResponse(_inside(Path(row["path"]), settings.files_dir), media_type="application/jsonl",
                            filename=row["filename"])

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        row = _file(store, file_id)
        job = store.file_in_use(file_id)
        if job:
            raise APIError(400, f"The file {file_id} is used by the active job {job}; cancel it or wait for it to "
                                "finish before deleting the file.", param="file_id", code="file_in_use")
        store.delete_file(file_id)
        _inside(Path(row["path"]), settings.files_dir).unlink(missing_ok=True)
        logger.info("%s: deleted", file_id)
        return {"id": file_id, "object": "file", "deleted": True}


def _save_capped(upload: UploadFile, path: Path, limit: int) -> int:
    """Copy the upload to ``path``; 413 (and nothing kept) once it passes ``limit`` bytes."""
    size = 0
    try:
        with open(path, "wb") as out:
            while chunk := upload.file.read(COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise file_too_large(limit)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


def _file(store: Store, file_id: str) -> dict[str, Any]:
    row = store.get_file(file_id)
    if row is None:
        raise not_found("file", file_id, "file_id")
    return row


def _inside(path: Path, folder: Path) -> Path:
    """Defense in depth: stored paths are always under the files folder; refuse anything else."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise APIError(500, "A stored file path is outside the data directory.", code="internal_error")
    return resolved


def _paged(fetch):
    try:
        return fetch()
    except BadCursor as exc:
        raise APIError(400, f"'after' is not an id from this list: '{exc}'.", param="after",
                       code="invalid_cursor") from None


# ---- fine-tuning jobs ----------------------------------------------------------------------------------------
def _add_job_routes(app: FastAPI, settings: ApiSettings, store: Store, runner: JobRunner) -> None:
    @app.post("/v1/fine_tuning/jobs")
    def create_job(request: protocol.JobCreateRequest, http: Request) -> dict[str, Any]:
        owner = key_owner(dict(http.scope["headers"]))
        cap = settings.max_active_jobs_per_key
        if cap and store.active_jobs_of(owner) >= cap:
            raise APIError(429, f"This API key already has {cap} active fine-tuning jobs, the most this server "
                                "runs at once for one key; wait for one to finish or cancel one.",
                           code="too_many_active_jobs")
        row = _new_job(settings, store, request) | {"owner": owner}
        store.add_job(row)
        store.add_event(row["id"], f"Created fine-tuning job: {row['id']}")
        files = f"training file {row['training_file']}" + (
            f" and validation file {row['validation_file']}" if row["validation_file"] else "")
        store.add_event(row["id"], f"Validating {files}")
        logger.info("%s: created (model %s, %s) -> validating_files", row["id"], row["model"], files)
        runner.wake()
        return protocol.job_object(row)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
        rows, more = _paged(lambda: store.list_jobs(after, limit))
        return protocol.page([protocol.job_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        return protocol.job_object(_job(store, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict[str, Any]:
        return protocol.job_object(runner.cancel(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: Optional[str] = None,
                    limit: int = Query(20, ge=1, le=1000)) -> dict[str, Any]:
        _job(store, job_id)
        rows, more = _paged(lambda: store.list_events(job_id, after, limit))
        return protocol.page([protocol.event_object(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: Optional[str] = None,
                         limit: int = Query(10, ge=1, le=100)) -> dict[str, Any]:
        job = _job(store, job_id)
        rows, more = _paged(lambda: store.list_checkpoints(job_id, after, limit))
        return protocol.page([protocol.checkpoint_object(r, job["fine_tuned_model"]) for r in rows], more)


def key_owner(headers: dict[bytes, bytes]) -> str:
    """Who a job belongs to for the per-key cap: the digest of the request's API key, read as authentication
    reads it (so no spelling of the same key counts apart), never the key itself; "" without a key."""
    token = bearer_token(headers)
    return key_digest(token)[:16] if token else ""


def _job(store: Store, job_id: str) -> dict[str, Any]:
    row = store.get_job(job_id)
    if row is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return row


def _job_file(store: Store, file_id: Optional[str], param: str) -> Optional[dict[str, Any]]:
    if file_id is None:
        return None
    row = store.get_file(file_id)
    if row is None:
        raise not_found("file", file_id, param)
    if row["purpose"] != "fine-tune":
        raise APIError(400, f"{param} {file_id} has purpose '{row['purpose']}'; upload it with purpose=fine-tune.",
                       param=param, code="invalid_file_purpose")
    return row


def _new_job(settings: ApiSettings, store: Store, request: protocol.JobCreateRequest) -> dict[str, Any]:
    """Check a create request and build the job's row, its run config included (nothing else is ever run)."""
    hp_in = request.chosen_hyperparameters()
    base = settings.base_models.get(request.model)
    if base is None:
        hint = " (fine-tuned models cannot be fine-tuned again here)" if request.model.startswith("ft:") else ""
        raise APIError(404, f"The model '{request.model}' does not exist{hint}; available base models: "
                            f"{', '.join(sorted(settings.base_models))}.", param="model", code="model_not_found")
    train = _job_file(store, request.training_file, "training_file")
    validation = _job_file(store, request.validation_file, "validation_file")
    hp = resolve(base.config, hp_in.n_epochs, hp_in.batch_size, hp_in.learning_rate_multiplier,
                 method=request.method_type, beta=hp_in.beta)
    seed = request.seed if request.seed is not None else base.config.training.seed
    integrations = [i.model_dump(mode="json", exclude_none=True) for i in request.integrations or []]
    wandb = next((i["wandb"] for i in integrations if i["type"] == "wandb"), None)
    job_id = new_id("ftjob")
    fine_tuned_model = f"ft:{base.name}:{request.suffix or ''}:{job_id}"
    cfg = build_job_config(base.config, hp, seed=seed, train_path=train["path"],
                           validation_path=validation["path"] if validation else None,
                           storage=str(settings.storage), job_id=job_id, model_id=fine_tuned_model,
                           mlflow_uri=settings.mlflow_uri, wandb=wandb, wandb_mode=settings.wandb_mode)
    return {"id": job_id, "model": base.name, "training_file": train["id"],
            "validation_file": validation["id"] if validation else None, "hyperparameters": hp.public(),
            "suffix": request.suffix, "seed": seed, "metadata": request.metadata, "status": "validating_files",
            "integrations": integrations or None,
            "method": request.method_type,
            "error": None, "fine_tuned_model": fine_tuned_model, "created_at": int(time.time()),
            "finished_at": None, "ray_job_id": f"rayfine-{job_id}", "submitted": 0, "run_dir": None,
            "metrics_offset": 0, "total_steps": None, "trained_tokens": None,
            "config": cfg.model_dump(mode="json")}
