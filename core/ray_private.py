"""The private Ray APIs (and env settings) rayfine relies on, in one place.

Each was checked against Ray 2.60.0 (requirements.txt pins it). Ray may change any of them in a minor release:
after an upgrade, run the integration tests (they exercise every function here) and fix what moved. Callers
treat a failure as "unknown" where they can (a nicer message or a clean-up is lost, never a run).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

RAY_VERSION_CHECKED = "2.60.0"

# Env vars that Ray Serve reads when its processes start (Ray's workers inherit the environment of the process
# that starts Ray), so they must be set before ``ray.init`` starts a local instance.
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # "1": HAProxy ingress in front of replicas that answer HTTP
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")  # fixed ports on every node unless set
DRAINING_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
# Where Serve's HAProxy keeps its files, each env var with the file name Ray's default gives it (default folder
# /tmp/haproxy-serve, a node-id folder inside it is added by Serve). The admin socket is created with mode 666,
# level admin (Ray's template): under a folder only its owner may enter, no other local user reaches it.
HAPROXY_PATH_ENVS = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                     "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                     "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}
# "module:function" returning ASGI middlewares for Serve's HTTP servers (http_options.middlewares was removed).
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# How often a Ray Train controller polls its workers (default 2 s). A worker's ray.train.report waits until the
# controller has taken its previous report (a queue of one), and a finished run is noticed at a poll: with the
# default, runs that report often or end quickly wait for polls. Ray fails a worker only after its poll has hung
# for RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so frequent polls are safe.
TRAIN_POLL_INTERVAL_ENV, LOCAL_TRAIN_POLL_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# Ray Train starts a preemption-watcher actor per run, which watches for nodes being drained (spot instances, a
# shrinking KubeRay cluster). A local instance is one node that is never drained: no watcher, one process less.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Set by the raylet in the environment of every worker it starts (inherited by their children, such as Serve's
# HAProxy): how the processes a local instance left behind are found (cluster.ray_start.stop_local_ray).
RAYLET_PID_ENV = "RAY_RAYLET_PID"
# The logger that prints "Uploading package ..." at INFO when a job ships py_modules.
RUNTIME_ENV_PACKAGING_LOGGER = "ray._private.runtime_env.packaging"


def serve_http_port() -> int:
    """The port of the running Serve instance's HTTP proxy (no public API tells it for an instance started
    elsewhere). Raises when Serve is not running or the internals moved."""
    from ray import serve

    return int(serve.context._get_global_client().http_config.port)


def serve_proxy_classes(timeout_s: float = 30.0) -> set[str]:
    """Class names of the running Serve instance's proxy actors (``HAProxyManager``, ``ProxyActor``): no public
    API says which ingress a Serve instance runs. Raises when Serve is not running or the internals moved."""
    import ray
    from ray import serve

    controller = serve.context._get_global_client()._controller
    proxies = ray.get(controller.get_proxies.remote(), timeout=timeout_s)
    return {handle._ray_actor_creation_function_descriptor.class_name for handle in proxies.values()}


def serve_request_id() -> str | None:
    """The id Serve gave the request being handled (also its ``X-Request-ID`` response header)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or None


def actor_table() -> dict[str, dict[str, Any]]:
    """Every actor the GCS knows, alive or dead: ``{actor_id_hex: {"ActorClassName", "State", "JobID", "Pid",
    "Address": {"NodeID", "IPAddress", "Port"}, "OwnerAddress": {...}}}``. The public state API needs the
    dashboard, which rayfine's local instances run without."""
    from ray._private.state import state

    return state.actor_table(None)


def placement_groups_of_dead_actors(actor_ids: set[str]) -> Iterator[Any]:
    """Placement groups (``ray.util.placement_group.PlacementGroup``) still held although the actor that created
    them, one of ``actor_ids``, is dead (ray #54305: they live until the job ends)."""
    from ray._private.state import state
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached
                and pg.creator_actor_dead and pg.creator_actor_id.hex() in actor_ids):
            yield PlacementGroup(PlacementGroupID(pg.placement_group_id))


def timed_job_submission_client(address: str, timeout_s: float):
    """Ray's ``JobSubmissionClient`` whose every HTTP request (the version check in its constructor included)
    gives up after ``timeout_s``: the public client waits forever on a head that accepts connections and never
    answers. Overrides the private ``_do_request``, through which all its REST calls go."""
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any):
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobSubmissionClient(address)


def run_storage_dir() -> str | None:
    """Inside a Ray Train worker: the run's storage folder (``RunConfig(storage_path, name)``) when it is on a
    filesystem this node mounts, else None (object storage). Uses ``TrainContext.get_storage()``, a DeveloperAPI
    whose ``StorageContext`` may change between minor versions."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return storage.experiment_fs_path
    return None


def move_into_storage(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """Ray Train's ``checkpoint_upload_fn`` for a checkpoint staged inside the run's storage folder (on a
    filesystem this node mounts, ``run_storage_dir``): its files are renamed into the checkpoint's folder there
    instead of copied (Ray's default copies every file, a second write of the whole checkpoint). Each rank moves
    its own files into the one folder, as Ray's copy merges them; a file only appears there complete. Uses
    ``StorageContext.build_checkpoint_path_from_name`` and ``storage_filesystem`` (DeveloperAPI), and the private
    ``_check_validation_file``: the error Ray's copy raises when the folder is a local path of another node."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    storage._check_validation_file()
    target = Path(storage.build_checkpoint_path_from_name(checkpoint_dir_name))
    staged = Path(checkpoint.path)
    for src in sorted(staged.rglob("*")):
        if src.is_file():
            dest = target / src.relative_to(staged)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    return ray.train.Checkpoint(path=str(target), filesystem=storage.storage_filesystem)


def disconnect_driver() -> None:
    """``ray.shutdown`` for a process that started its local instance, without stopping the instance's processes
    (the caller stops them, all at once): Ray's shutdown stops them one type after another, giving each up to
    1 s to exit, and at interpreter exit first pauses 0.5 s for log lines. Takes the node this process started
    (``ray._private.worker._global_node``) out of ``ray.shutdown``'s hands; the node's own exit hook later finds
    its processes gone. Spilled objects are deleted as Ray's shutdown deletes them."""
    import ray
    import ray._private.worker as ray_worker

    node, ray_worker._global_node = ray_worker._global_node, None
    ray.shutdown()
    if node is not None and node.is_head():
        node.destroy_external_storage()


def start_train_coordinator() -> None:
    """Start Ray's autoscaling coordinator now, without waiting for it. Ray Train's controller registers each run's
    resources with it (a detached actor, created on first use) and waits for the answer: on a fresh instance
    the first run then waits for the actor's process to start (about 1.2 s on 2 cores). Started while the
    driver checks the data, it is up by then. Uses the private
    ``ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator.get_or_create_autoscaling_coordinator``
    (the function Ray Train calls); does nothing when it moved."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception:  # noqa: BLE001 - internals moved: the first run creates it, as without this
        pass


def started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (``ray.init`` of a local instance, whose
    processes and placement groups end with this one). Reads the private ``ray._private.worker._global_node``:
    False when it moved."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return bool(node is not None and node.is_head())
    except Exception:  # noqa: BLE001 - internals moved: take the cautious answer
        return False


def trimmed_trainer(trainer_cls: type, local: bool) -> type:
    """``trainer_cls`` (Ray Train's TorchTrainer) without the default callbacks a run has no use for:

    - Ray Train's placement-group cleaner, on a local instance (``local``). For each run Ray Train starts a
      detached actor that removes the run's placement group should its controller die ungracefully, and the
      controller waits for that actor (a new process: about 2 s of a run's start-up on 2 cores). On a local
      instance it does nothing useful: it watches the controller through the state API, which needs the dashboard
      that rayfine's local instances run without, and the placement group of a run goes with the instance, which
      ends with the process that started it (a Tune search's sweeper, ``training.tune.sweep_stopped_train_runs``,
      removes those of stopped trials).
    - Its datasets callback, for a trainer given no Ray Dataset (small data, held in the object store:
      ``training.data.held_split``): it starts a DatasetManager actor, a process, for each worker group anyway.

    Overrides the private ``_create_default_callbacks``; a callback whose class moved is kept."""
    unneeded: list[tuple[type, Callable[[Any], bool]]] = []
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        unneeded.append((PlacementGroupCleanerCallback, lambda trainer: local))
    except ImportError:
        pass
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

        unneeded.append((DatasetsCallback, lambda trainer: not trainer.datasets))
    except ImportError:
        pass

    class TrimmedTrainer(trainer_cls):
        def _create_default_callbacks(self):
            drop = tuple(cls for cls, applies in unneeded if applies(self))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, drop)]

    TrimmedTrainer.__name__ = TrimmedTrainer.__qualname__ = trainer_cls.__name__
    return TrimmedTrainer


def setup_hook_env(hook: str) -> dict:
    """A runtime env that runs ``hook`` (``module.function``) in each new worker process before anything else.

    Ray turns a ``worker_process_setup_hook`` into this environment variable only for a job's runtime env
    (``ray.init``); an actor's own runtime env, such as Ray Train's ``worker_runtime_env``, has to carry the variable
    itself, which the worker process reads at start (``default_worker.py``). Checked against Ray 2.60."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {"env_vars": {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: hook}}


class TorchBackendConfig:
    """Ray Train's ``TorchConfig`` (the torch process group of a run: ``backend`` "gloo" or "nccl", set up through
    environment variables), without torch in Ray Train's controller.

    The controller unpickles the trainer's backend config and runs its backend's ``on_start``: with Ray's own
    ``TorchConfig`` both live in ``ray.train.torch.config``, which imports torch (1.3 s of every run's start-up on
    2 cores, before the controller even creates the workers). Here the config and its backend are plain classes of
    this module, and every step that needs torch runs on the workers, by the same functions of
    ``ray.train.torch.config`` that ``TorchConfig`` runs (imported there, where torch is loaded anyway). The
    duck-typed members are what Ray Train's controller reads (``backend_cls``, ``train_func_context``,
    ``framework``, ``to_dict``); accelerators other than CUDA GPUs (TPU, HPU) are left out."""

    init_method = "env"

    def __init__(self, backend: str, timeout_s: int = 1800):
        self.backend = backend
        self.timeout_s = timeout_s

    @property
    def backend_cls(self) -> type:
        return _TorchBackend

    @property
    def train_func_context(self) -> type:
        return _TorchDeviceContext

    @property
    def framework(self) -> Any:
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


def _torch_config_call(name: str, **kwargs: Any) -> Any:
    """``ray.train.torch.config.<name>(**kwargs)``, run on a Train worker."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


def _set_master_address(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _TorchBackend:
    """``ray.train.torch.config._TorchBackend``'s steps for a GPU or CPU run, each run on the workers."""

    share_cuda_visible_devices = True
    has_replica_groups = False

    def on_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master_address, addr=addr, port=port)
        worker_group.execute(_torch_config_call, "_set_torch_distributed_env_vars")
        ray.get([worker_group.execute_single_async(
            rank, _torch_config_call, "_setup_torch_process_group", backend=backend_config.backend,
            world_rank=rank, world_size=len(worker_group), init_method="env://", timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])

    def on_training_start(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        pass

    def on_shutdown(self, worker_group: Any, backend_config: TorchBackendConfig) -> None:
        import ray
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        futures = worker_group.execute_async(_torch_config_call, "_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            pass  # as Ray's: the workers are being stopped anyway


class _TorchDeviceContext:
    """``TorchConfig``'s ``train_func_context`` (a GPU worker's default CUDA device), imported on the worker."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc: Any) -> bool:
        return False


@contextmanager
def lean_local_instance(log_monitor: bool) -> Iterator[None]:
    """``ray.init`` inside starts a local instance without two Python daemons rayfine's local instances have no use
    for: the autoscaler's monitor (a local instance has the size it was started with) and, unless ``log_monitor``,
    the log monitor, which streams the workers' output to drivers that ask for it (``log_to_driver``; rayfine asks
    only under RAYFINE_VERBOSE=1). Two processes fewer to start with Ray on a small machine (each imports Ray: about
    0.5 s of CPU) and none polling files for the life of the instance. ``ray.init`` has no parameter for either:
    ``Node.start_monitor`` / ``Node.start_log_monitor`` are skipped while the block runs."""
    from ray._private.node import Node

    saved = Node.start_monitor, Node.start_log_monitor
    Node.start_monitor = lambda self: None
    if not log_monitor:
        Node.start_log_monitor = lambda self: None
    try:
        yield
    finally:
        Node.start_monitor, Node.start_log_monitor = saved
