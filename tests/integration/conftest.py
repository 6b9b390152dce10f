"""The integration tests' in-process Ray and the shared classification run.

``ray_local``: an in-process local instance (4 logical CPUs on a 2-core machine: 2 train workers plus room for
Ray Data). The two-node cluster of the jobs tests is ``cluster/conftest.py``'s ``ray_head``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from core.ray_connect import prepare_local_env
    from core.ray_private import lean_local_instance

    prepare_local_env()
    if not ray.is_initialized():
        with lean_local_instance(log_monitor=False):  # as rayfine's own local instances start
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
    from core.ray_connect import quiet_ray_data

    quiet_ray_data()
    yield ray
    ray.shutdown()


# The shared classification run: 2 epochs of 320 records (40 steps). It fails once at step FAIL_AT and Ray Train
# restarts its worker group from the last checkpoint (scaling.max_failures 1).
SHARED_LOG_EVERY, SHARED_CHECKPOINT_EVERY, FAIL_AT = 4, 8, 10


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, tiny_bert, ray_local):
    """The session's one full classification run (tiny BERT, 2 workers, ZeRO-2, data read in Ray Data tasks,
    tracked in MLflow's embedded store, TensorBoard and W&B offline): test_train_classification checks its run
    folder, export, evaluation and tracking, test_resume_and_invariants the restart after its failure."""
    from tests.integration.helpers import classification_config
    from training.driver import train

    cfg = classification_config(
        tmp_path_factory.mktemp("classifier"), tiny_bert,
        training={"log_every_steps": SHARED_LOG_EVERY, "checkpoint_every_steps": SHARED_CHECKPOINT_EVERY,
                  "inject_failure_at_step": FAIL_AT},
        scaling={"max_failures": 1}, tracking={"mlflow": {"experiment": "tests", "register_model": "tiny-sentiment"},
                                             "tensorboard": True,
                                             "wandb": {"project": "rayfine-tests", "mode": "offline"}})
    from training import data

    # This run reads its data in Ray Data tasks; the others read their small data in the driver
    # (test_data_paths: both paths give the same rows).
    small, data.IN_PROCESS_MAX_BYTES = data.IN_PROCESS_MAX_BYTES, 0
    try:
        return cfg, train(cfg)
    finally:
        data.IN_PROCESS_MAX_BYTES = small
