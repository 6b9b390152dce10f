"""DeepSpeed settings, derived from the run config by pure functions (unit-tested, no torch import).

The derived config is the one owner of what the engine runs with: ``deepspeed.config`` (native keys, merged
last) may change the ZeRO stage, the micro batch or gradient accumulation, so the driver's step arithmetic,
the workers and the export read them back with ``engine_shape``, never from the raw run-config keys.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from core.config import RunConfig, deep_merge


def resolve_precision(precision: str, use_gpu: bool, bf16_supported: bool) -> str:
    """``auto`` is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if not use_gpu:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def _scheduler(cfg: RunConfig, total_steps: int) -> dict[str, Any]:
    t = cfg.training
    warmup = max(1, int(round(t.warmup_ratio * total_steps)))  # DeepSpeed rejects 0
    # The warmup starts from min: with no warmup asked for, its one step starts at the full rate (else the first
    # optimizer step would run at learning rate 0 and change nothing).
    start = 1.0 if t.warmup_ratio == 0 else 0.0
    if t.lr_scheduler == "cosine":
        # WarmupCosineLR, unlike WarmupLR, sets no rate until its first step() unless it starts at step 0.
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup, "last_batch_iteration": 0,
            "warmup_min_ratio": start, "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    params = {"warmup_min_lr": start * t.learning_rate, "warmup_max_lr": t.learning_rate, "warmup_num_steps": warmup,
              "warmup_type": "linear"}
    if t.lr_scheduler == "constant":
        return {"type": "WarmupLR", "params": params}
    # WarmupDecayLR needs total > warmup or it divides by zero at the end of warmup.
    return {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": max(total_steps, warmup + 1)}}


def single_rank_runs_zero_0(cfg: RunConfig, world_size: int) -> bool:
    """Whether ``deepspeed.stage`` 1 or 2 runs as ZeRO-0: one rank has nothing to partition, so ZeRO-1/2 would
    only add the bookkeeping of their flat buffers (a third of a small model's step on CPU). ZeRO-3 (zero.Init,
    parameter offload), optimizer offload and a stage named in ``deepspeed.config`` are kept."""
    ds = cfg.deepspeed
    return (world_size == 1 and ds.stage in (1, 2) and not ds.offload_optimizer
            and (ds.config.get("zero_optimization") or {}).get("stage") is None)


def _zero(cfg: RunConfig, use_gpu: bool, num_params: int | None, world_size: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    # deepspeed.config may name another stage: the stage-specific defaults below follow the one that runs
    stage = 0 if single_rank_runs_zero_0(cfg, world_size) else int(
        (ds.config.get("zero_optimization") or {}).get("stage", ds.stage))
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    # One bucket per ~model size: small models then reduce in a single collective instead of many tiny
    # ones (a large share of step time on CPU/gloo); large models cap at DeepSpeed's 500M default.
    # Rounded to whole MiB of elements: DeepSpeed asserts alignment of bucket sizes.
    bucket = int(min(5e8, max(2e6, num_params or 5e8))) // 2**20 * 2**20 + 2**20
    zero.update(contiguous_gradients=True, overlap_comm=use_gpu, reduce_scatter=True,
                reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True,
                    stage3_prefetch_bucket_size=bucket,
                    stage3_param_persistence_threshold=int(min(1e5, bucket // 10)))
        zero.pop("allgather_bucket_size")
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return zero


def build_deepspeed_config(cfg: RunConfig, *, world_size: int, total_steps: int, use_gpu: bool,
                           bf16_supported: bool = False, num_params: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for one run; ``deepspeed.config`` from the run config is merged last."""
    t = cfg.training
    precision = resolve_precision(cfg.deepspeed.precision, use_gpu, bf16_supported)
    optimizer_params = {"lr": t.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                        "weight_decay": t.weight_decay}
    if not cfg.deepspeed.offload_optimizer:
        # torch's AdamW, fused (one kernel over all of a step's tensors, on CPU and GPU; what the HF Trainer
        # uses): no JIT-compiled op needed. The per-tensor loop costs as much as forward and backward together
        # on small models. Offload uses DeepSpeed's CPU Adam instead.
        optimizer_params.update(torch_adam=True, fused=True)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": _scheduler(cfg, total_steps),
        "zero_optimization": _zero(cfg, use_gpu, num_params, world_size),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.max_grad_norm > 0:
        config["gradient_clipping"] = t.max_grad_norm
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    user = copy.deepcopy(cfg.deepspeed.config)
    merged = deep_merge(config, user)
    micro = merged["train_micro_batch_size_per_gpu"]
    if "train_batch_size" in user and "gradient_accumulation_steps" not in user:
        # DeepSpeed's rule: train_batch_size = micro batch x accumulation x world size
        merged["gradient_accumulation_steps"] = max(1, int(user["train_batch_size"]) // (micro * world_size))
    merged.setdefault("train_batch_size", micro * merged["gradient_accumulation_steps"] * world_size)
    return merged


@dataclass(frozen=True)
class EngineShape:
    """What the DeepSpeed engine runs with, read from the derived config."""

    stage: int
    micro_batch_per_worker: int
    gradient_accumulation_steps: int


def engine_shape(ds_config: dict[str, Any]) -> EngineShape:
    """The ZeRO stage, micro batch and accumulation of a derived DeepSpeed config."""
    return EngineShape(stage=int((ds_config.get("zero_optimization") or {}).get("stage", 0)),
                       micro_batch_per_worker=int(ds_config["train_micro_batch_size_per_gpu"]),
                       gradient_accumulation_steps=int(ds_config["gradient_accumulation_steps"]))


def run_engine_shape(cfg: RunConfig, world_size: int) -> EngineShape:
    """``engine_shape`` of the config a run's workers will build (the shape does not depend on the step count,
    the device or the model size, which only tune the schedule, precision and buckets)."""
    return engine_shape(build_deepspeed_config(cfg, world_size=world_size, total_steps=1, use_gpu=False))


@dataclass
class MemoryEstimate:
    device_bytes: float
    cpu_bytes: float


def estimate_memory_per_worker(num_params: int, stage: int, world_size: int,
                               offload_optimizer: bool = False, offload_params: bool = False) -> MemoryEstimate:
    """Model states per worker for mixed-precision Adam: 16 bytes/param, divided as ZeRO divides it.

    2 (16-bit weights) + 2 (16-bit grads) + 12 (fp32 master weights, Adam m and v). ZeRO-1 partitions the 12,
    ZeRO-2 also the grads, ZeRO-3 also the weights. Offload moves the optimizer part (and with ZeRO-3 the
    weights) to CPU memory. Activations and buffers come on top and depend on batch and sequence length.
    """
    n, p = float(num_params), max(world_size, 1)
    weights, grads, optim = 2 * n, 2 * n, 12 * n
    if stage >= 1:
        optim /= p
    if stage >= 2:
        grads /= p
    if stage >= 3:
        weights /= p
    cpu = 0.0
    if offload_optimizer:
        cpu += optim
        optim = 0.0
    if offload_params and stage == 3:
        cpu += weights
        weights = 0.0
    return MemoryEstimate(device_bytes=weights + grads + optim, cpu_bytes=cpu)
