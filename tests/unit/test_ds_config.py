import pytest

from core.config import load_config
from training.ds_config import (
    build_deepspeed_config,
    engine_shape,
    estimate_memory_per_worker,
    resolve_precision,
    run_engine_shape,
)


def cfg_with(**sections):
    raw = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    raw.update(sections)
    return load_config(raw=raw)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_stage(stage):
    ds = build_deepspeed_config(cfg_with(deepspeed={"stage": stage}), world_size=2, total_steps=100,
                                use_gpu=False, num_params=22_000_000)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ds["train_batch_size"] == 16 * 1 * 2
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert "bf16" not in ds and "fp16" not in ds  # CPU trains in fp32
    if stage == 0:
        assert set(zero) == {"stage"}
    else:
        assert zero["reduce_bucket_size"] % 2**20 == 0 and zero["reduce_bucket_size"] >= 22_000_000
        assert zero["overlap_comm"] is False
    assert zero.get("stage3_gather_16bit_weights_on_model_save") is (True if stage == 3 else None)


def test_gpu_precision_offload_and_user_keys_merged_last():
    cfg = cfg_with(training={"batch_size": 4, "gradient_accumulation_steps": 8, "max_grad_norm": 0.5},
                   deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True,
                              "config": {"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 7}})
    ds = build_deepspeed_config(cfg, world_size=4, total_steps=10, use_gpu=True, bf16_supported=True)
    assert ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 4 * 8 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert {"torch_adam", "fused"}.isdisjoint(ds["optimizer"]["params"])  # offload uses DeepSpeed's CPU Adam
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["steps_per_print"] == 7
    assert ds["zero_optimization"]["stage"] == 3  # merge keeps the derived keys


def test_precision_resolution():
    assert resolve_precision("auto", use_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", use_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", use_gpu=True, bf16_supported=False) == "fp16"
    ds = build_deepspeed_config(cfg_with(deepspeed={"precision": "fp16"}), world_size=1, total_steps=5,
                                use_gpu=True)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("sched,kind", [("linear", "WarmupDecayLR"), ("cosine", "WarmupCosineLR"),
                                        ("constant", "WarmupLR")])
def test_scheduler_with_warmup(sched, kind):
    cfg = cfg_with(training={"lr_scheduler": sched, "warmup_ratio": 0.1, "learning_rate": 3e-4})
    s = build_deepspeed_config(cfg, world_size=1, total_steps=200, use_gpu=False)["scheduler"]
    assert s["type"] == kind
    assert s["params"]["warmup_num_steps"] == 20
    if sched == "linear":
        assert s["params"]["total_num_steps"] == 200 and s["params"]["warmup_max_lr"] == 3e-4


def test_memory_estimate_divides_as_zero_does():
    n, p = 1_000_000, 4
    assert estimate_memory_per_worker(n, 0, p).device_bytes == 16 * n
    assert estimate_memory_per_worker(n, 1, p).device_bytes == 4 * n + 12 * n / p
    assert estimate_memory_per_worker(n, 2, p).device_bytes == 2 * n + 14 * n / p
    assert estimate_memory_per_worker(n, 3, p).device_bytes == 16 * n / p
    off = estimate_memory_per_worker(n, 3, p, offload_optimizer=True, offload_params=True)
    assert off.device_bytes == 2 * n / p  # only the 16-bit gradient partition stays on the device
    assert off.cpu_bytes == 12 * n / p + 2 * n / p


def test_native_keys_own_the_engine_shape():
    """deepspeed.config is merged last, and what the engine runs with is read back from the derived config."""
    cfg = cfg_with(deepspeed={"stage": 2, "config": {"zero_optimization": {"stage": 3},
                                                     "train_micro_batch_size_per_gpu": 4,
                                                     "gradient_accumulation_steps": 2}})
    ds = build_deepspeed_config(cfg, world_size=2, total_steps=10, use_gpu=False, num_params=1_000_000)
    shape = engine_shape(ds)
    assert (shape.stage, shape.micro_batch_per_worker, shape.gradient_accumulation_steps) == (3, 4, 2)
    assert ds["train_batch_size"] == 4 * 2 * 2
    # ZeRO-3's own settings follow the stage that runs, not deepspeed.stage
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert run_engine_shape(cfg, world_size=2) == shape


def test_a_native_train_batch_size_sets_accumulation():
    cfg = cfg_with(training={"batch_size": 4}, deepspeed={"config": {"train_batch_size": 32}})
    ds = build_deepspeed_config(cfg, world_size=2, total_steps=10, use_gpu=False)
    assert engine_shape(ds).gradient_accumulation_steps == 4 and ds["train_batch_size"] == 32


@pytest.mark.parametrize("sched", ["linear", "cosine", "constant"])
def test_no_warmup_means_the_first_step_runs_at_the_full_rate(sched):
    """DeepSpeed needs one warmup step at least; with warmup_ratio 0 it must not start from learning rate 0."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR, WarmupLR
    from torch.optim import SGD

    cfg = cfg_with(training={"lr_scheduler": sched, "warmup_ratio": 0.0, "learning_rate": 3e-4})
    s = build_deepspeed_config(cfg, world_size=1, total_steps=10, use_gpu=False)["scheduler"]
    import torch

    optimizer = SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    kind = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}[s["type"]]
    scheduler = kind(optimizer, **s["params"])
    assert scheduler.get_lr()[0] == pytest.approx(3e-4)


def test_one_worker_runs_zero_0_unless_it_offloads_or_asks_natively():
    def stage(world_size, **deepspeed):
        return build_deepspeed_config(cfg_with(deepspeed=deepspeed), world_size=world_size, total_steps=10,
                                      use_gpu=False)["zero_optimization"]["stage"]

    assert [stage(1, stage=s) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]  # one rank has nothing to partition
    assert [stage(2, stage=s) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]
    assert stage(1, stage=2, offload_optimizer=True) == 2  # offload needs the ZeRO optimizer
    assert stage(1, stage=2, config={"zero_optimization": {"stage": 2}}) == 2  # a native key is taken as given


def test_workers_build_deepspeed_ops_with_the_ninja_of_their_environment(monkeypatch):
    """A system ninja and pip's keep incompatible build logs: with both in use, DeepSpeed's CPU op is compiled
    again each time the other one ran last. Workers put their environment's first on PATH (once)."""
    import os
    import shutil
    import sys

    from training.loop import use_this_environments_ninja

    bin_dir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bin_dir, "ninja")):
        pytest.skip("no ninja installed in this Python environment")
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")
    use_this_environments_ninja()
    assert shutil.which("ninja") == os.path.join(bin_dir, "ninja")
    use_this_environments_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [bin_dir, "/usr/bin", "/bin"]


def test_deepspeed_on_cpu_starts_its_comm_layer_without_compiling_an_op(tmp_path):
    """DeepSpeed's CPU comm backend would compile its shared-memory all-reduce op (25-60 s on a fresh machine);
    training does not use it, and the workers' import of deepspeed leaves it out. In a child process: the comm
    layer starts with an empty extensions folder, which stays empty."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.serve_fixtures import free_port

    child = ("import torch.distributed as dist\n"
             "from training.loop import import_deepspeed\n"
             "deepspeed = import_deepspeed(use_gpu=False)\n"
             "deepspeed.init_distributed(dist_backend='gloo')\n"
             "import importlib\n"
             "backend = importlib.import_module('deepspeed.comm.comm').cdb\n"
             "assert dist.get_world_size() == 1 and backend.shm_comm_op is None\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").rglob("*.so"))
