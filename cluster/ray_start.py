"""The one place rayfine starts, joins or stops Ray.

Every CLI verb that needs Ray calls ``start_ray`` once, before it calls into ``training`` or ``serving`` (which
assume Ray is up). Serve reads a few settings from the environment when its processes start, and a local
instance's processes inherit this process's environment: so they are set here, before ``ray.init``.

``stop_local_ray`` ends a local instance for good, including when its own processes were signalled with ours (a
SIGTERM to the whole process group, as ``timeout``, systemd and most supervisors send): Ray's workers and the
HAProxy that Serve started run in process groups of their own and would otherwise outlive it, holding the port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from cluster.ingress import use_ingress
from core import timings
from core.ray_connect import connect, is_local
from core.ray_private import PROXY_CALLBACK_ENV, RAYLET_PID_ENV, disconnect_driver
from serving.errors import PROXY_CALLBACK

logger = logging.getLogger(__name__)

RAY_SHUTDOWN_DEADLINE_S = 10.0
KILL_GRACE_S = 3.0
_started_local = False  # whether start_ray started a local instance (so this process owns its lifetime)


def prepare_ray_env(serve_proxy: Optional[str] = None, address: Optional[str] = None) -> None:
    """Set what Serve reads when Ray starts: its own 503/408 answered in the JSON error shape, and (for a local
    instance) the HTTP ingress of ``serve.proxy``. A running instance, or the cluster ``address`` names, keeps
    what its own environment chose."""
    import ray

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    if not ray.is_initialized() and is_local(address):
        use_ingress(serve_proxy)


def start_ray(address: Optional[str] = None, *, num_workers: int = 1, serve_proxy: Optional[str] = None) -> str:
    """Join the cluster at ``address`` / RAY_ADDRESS, else start a local instance with room for ``num_workers``
    train workers; returns where we run. ``serve_proxy``: the run's ``serve.proxy`` (``rayfine run`` serves on
    the Ray it trains on)."""
    import ray

    global _started_local
    prepare_ray_env(serve_proxy, address)
    starts_local = not ray.is_initialized() and is_local(address)
    timings.mark("imports, config")
    where = connect(address, num_workers=num_workers)
    timings.mark("Ray start or connect")
    _started_local = _started_local or starts_local
    return where


def started_local_instance() -> bool:
    """Whether this process started the local Ray instance it runs on (and stopping it is ours to do)."""
    return _started_local


def within(deadline_s: float, fn: Callable[[], object], give_up: Callable[[], bool] = lambda: False) -> bool:
    """Run ``fn`` in a daemon thread; True when it returned (or raised: logged) within ``deadline_s``, False at the
    deadline or as soon as ``give_up()`` says waiting is pointless (polled every 0.2 s)."""
    def call() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - stopping goes on; the reason is logged
            logger.warning("while stopping: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    thread = threading.Thread(target=call, daemon=True, name=f"rayfine-stop-{getattr(fn, '__name__', 'fn')}")
    thread.start()
    deadline = time.monotonic() + deadline_s
    while thread.is_alive() and time.monotonic() < deadline and not give_up():
        thread.join(min(0.2, max(0.0, deadline - time.monotonic())))
    return not thread.is_alive()


def group_members() -> list:
    """The local instance's processes in this process's group (its daemons and agents; Ray's workers have groups
    of their own): a signal sent to the whole group reached them too."""
    import psutil

    try:
        group = os.getpgid(0)
        members = []
        for child in psutil.Process().children(recursive=True):
            try:
                if os.getpgid(child.pid) == group:
                    members.append(child)
            except (OSError, psutil.Error):
                continue
        return members
    except (OSError, psutil.Error):
        return []


def signalled_with_us(members: list) -> bool:
    """Whether one of ``members`` has exited: the signal that stops this process went to its whole group (a
    supervisor's SIGTERM), so Ray itself is going away and waiting for Serve is pointless."""
    import psutil

    for proc in members:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            pass
        return True
    return False


def _node_id() -> Optional[str]:
    import ray

    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - only the HAProxy fallback is lost
        return None


def local_raylet_pids() -> list[int]:
    """The raylet of the local instance this process started (a child of ours, even once it has died)."""
    import psutil

    pids = []
    if not _started_local:
        return pids
    for child in psutil.Process().children():
        try:
            if child.name() == "raylet":
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def stop_local_ray(raylet_pids: Optional[list[int]] = None, *, ray_alive: bool = True) -> bool:
    """End the local instance this process started (no-op otherwise): disconnect from it, then kill every process
    of it at once (Ray's shutdown stops them one type after another, waiting up to a second for each): its
    daemons, its Ray workers (found by the raylet they were started under) and their children (Serve's HAProxy).
    ``raylet_pids``: as ``local_raylet_pids()`` answered while the instance ran (call it early when Ray may already
    be dying). ``ray_alive=False``: Ray did not answer (its daemons were stopped with this process): skip Ray's
    own shutdown, which would hang or end this process. Returns False when Ray's shutdown was skipped
    or did not finish within RAY_SHUTDOWN_DEADLINE_S."""
    import psutil
    import ray

    global _started_local
    if not _started_local:
        return True
    _started_local = False
    raylets = set(raylet_pids if raylet_pids is not None else local_raylet_pids())
    procs = _instance_processes(raylets, _node_id())  # while the process tree is intact
    clean = False
    if ray_alive and ray.is_initialized():
        clean = within(RAY_SHUTDOWN_DEADLINE_S, disconnect_driver)  # the processes are stopped below, at once
    left = [proc for proc in procs if _running(proc)]
    for proc in left:  # the driver is gone: nothing of the instance is kept (Ray's fate-sharing kills it so too)
        try:
            proc.kill()
        except psutil.Error:
            pass
    alive = _wait_gone(left, KILL_GRACE_S)  # gone before we return: a supervisor then finds none left
    if alive:
        logger.warning("%d process(es) of the local Ray instance did not end: %s", len(alive),
                       ", ".join(str(proc.pid) for proc in alive))
    return clean


def _wait_gone(procs: list, timeout_s: float) -> list:
    """Wait until each process has died (a zombie counts: killed, its parent or init has yet to reap it, which
    ``psutil.wait_procs`` waits for); returns those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    alive = [proc for proc in procs if _running(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [proc for proc in alive if _running(proc)]
    return alive


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _instance_processes(raylets: set[int], node_id: Optional[str]) -> list:
    """Every process of the local instance: the daemons this process started (GCS, raylet, agents: programs of
    Ray's package) and their children, the workers the raylet started (their env names it; they run in process
    groups of their own) and their children, and Serve's HAProxy (a worker's child, whose files are under the
    node's id). Other children of this process (a tracker's service, a child pytest) are not the instance's."""
    import psutil
    import ray

    found: dict[int, psutil.Process] = {}

    def add(proc: psutil.Process) -> None:
        found[proc.pid] = proc
        found.update((child.pid, child) for child in proc.children(recursive=True))

    ray_dir = os.path.dirname(ray.__file__) + os.sep
    try:
        children = psutil.Process().children()
    except psutil.Error:
        children = []
    for child in children:
        try:
            if any(ray_dir in arg for arg in child.cmdline()):
                add(child)
        except psutil.Error:
            continue
    names = {str(pid) for pid in raylets}
    for proc in psutil.process_iter():
        try:
            if proc.pid in found:
                continue
            if (names and proc.environ().get(RAYLET_PID_ENV) in names) or (
                    node_id and f"/{node_id}/" in " ".join(proc.cmdline())):
                add(proc)
        except psutil.Error:  # gone, a zombie, or another user's
            continue
    return list(found.values())
