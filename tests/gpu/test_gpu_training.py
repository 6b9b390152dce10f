"""GPU tier: the NCCL + bf16 path of the same training loop. Skipped without CUDA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("stage", [2, 3])
def test_trains_on_gpu_with_nccl_and_bf16(stage, tmp_path, tiny_bert, ray_gpu):
    from tests.integration.helpers import classification_config, read_metrics
    from training.driver import train

    workers = min(2, torch.cuda.device_count())
    cfg = classification_config(tmp_path, tiny_bert, deepspeed={"stage": stage, "precision": "auto"},
                                scaling={"num_workers": workers, "use_gpu": True})
    result = train(cfg)
    losses = [m["loss"] for m in read_metrics(result.run_dir) if "loss" in m]
    assert np.mean(losses[-2:]) < losses[0]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert model.dtype in (expected, torch.float32)
    assert json.loads((result.run_dir / "eval.json").read_text())["validation"]["accuracy"] > 0.5
