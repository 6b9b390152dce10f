from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from core.config import load_config
from tests.conftest import sentiment_rows, write_jsonl


def classification_config(tmp_path: Path, model: Path, n_train: int = 320, n_val: int = 32, **sections):
    """A small run config for the tiny BERT; ``sections`` are merged into the defaults below."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", sentiment_rows(n_train, seed=1))
    val = write_jsonl(tmp_path / "data" / "val.jsonl", sentiment_rows(n_val, seed=2))
    raw = {
        "task": "sequence_classification",
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train), "validation": str(val), "max_seq_length": 32},
        "training": {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8, "warmup_ratio": 0.0,
                     "log_every_steps": 4, "eval_every_steps": 0, "checkpoint_every_steps": 0},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "output": {"dir": str(tmp_path / "runs"), "name": "run"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(raw=raw)


def wait_for_no_actors(classes: tuple[str, ...], timeout: float = 60.0) -> list[dict]:
    """Wait until no actor of ``classes`` is alive on the session's Ray (or ``timeout`` passes); the live ones."""
    import time

    from ray._private.state import state

    deadline = time.time() + timeout
    while True:
        alive = [a for a in state.actor_table(None).values()
                 if a["State"] == "ALIVE" and a["ActorClassName"] in classes]
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(1.0)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


@contextmanager
def served(model_dir: Path, name: str, **serve):
    """``model_dir`` deployed on the session's Ray as app ``name`` (route ``/name``); yields its base URL, then
    removes the app (Serve itself stays up for the next one)."""
    from ray import serve as ray_serve

    from core.config import ServeConfig
    from serving.deploy import deploy
    from tests.serve_fixtures import SERVE_PROXY, free_port

    cfg = ServeConfig(route_prefix=f"/{name}", port=free_port(), cpus_per_replica=0.5, threads_per_replica=1,
                      proxy=SERVE_PROXY, **serve)
    url = deploy(model_dir, cfg, name=name)
    try:
        yield url
    finally:
        ray_serve.delete(name)


def evaluate_endpoint_cli(cfg, url: str, tmp_path: Path) -> dict:
    """``rayfine evaluate CONFIG --endpoint URL --output FILE``, in-process; returns the metrics it wrote."""
    from cluster.cli import main
    from core.config import dump_config

    config, out = tmp_path / "endpoint-eval.yaml", tmp_path / "endpoint-metrics.json"
    config.write_text(dump_config(cfg))
    assert main(["evaluate", str(config), "--endpoint", url, "--output", str(out)]) == 0
    return json.loads(out.read_text())
