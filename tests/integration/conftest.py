"""A real local Ray instance shared by the integration tests (4 logical CPUs on a 2-core machine:
2 train workers plus room for Ray Data)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from training.progress import quiet_ray_data

    quiet_ray_data()
    yield ray
    ray.shutdown()
