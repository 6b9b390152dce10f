"""The one place rayfine starts or joins Ray.

Every CLI verb that needs Ray calls ``start_ray`` once, before it calls into ``training`` or ``serving`` (which
assume Ray is up). Serve reads a few settings from the environment when its processes start, and a local
instance's processes inherit this process's environment: so they are set here, before ``ray.init``.
"""

from __future__ import annotations

import os
from typing import Optional

from cluster.ingress import use_ingress
from core.ray_connect import connect, is_local
from core.ray_private import PROXY_CALLBACK_ENV
from serving.errors import PROXY_CALLBACK


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
    prepare_ray_env(serve_proxy, address)
    return connect(address, num_workers=num_workers)
