"""The per-worker training loop: DeepSpeed engine, streaming batches, evaluation, checkpoints, export.

Runs inside every Ray Train worker. Every rank executes the same sequence of collectives and the same number
of ``ray.train.report`` calls (a report is a barrier), so every decision below depends only on the global
step, never on rank-local data.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core import __version__, collector
from core.config import RunConfig
from core.model_folder import ModelInfo
from core.ray_private import move_into_storage, run_storage_dir
from core.run_folder import TRAINER_STATE
from training.scaling import workers_text
from training.tasks.base import LabelSpace

DS_TAG = "ds"
STAGING = ".staging"  # in the run's storage: checkpoints being written, before Ray Train persists them
REFERENCE_FILE = "reference_logps.npz"  # DPO without LoRA: the initial model's scores, kept with checkpoints
logger = logging.getLogger(__name__)  # in the workers: their lines go to Ray's log folder; rank 0 logs


@dataclass
class TrainPlan:
    """Step arithmetic fixed by the driver from the pre-flight counts (identical on every rank)."""

    train_records: int
    world_size: int
    micro_per_epoch: int
    total_steps: int
    use_gpu: bool
    packed: bool = False
    zero_stage: int = 0  # as the derived DeepSpeed config sets it (for messages; workers read their own config)

    @classmethod
    def build(cls, cfg: RunConfig, train_records: int, world_size: int, use_gpu: bool,
              packed_sequences: int | None = None):
        """``packed_sequences``: with data.packing, the estimated number of packed sequences per epoch. Their
        exact count depends on each worker's data, so workers then end an epoch together when one runs out."""
        from training.ds_config import run_engine_shape

        t = cfg.training
        shape = run_engine_shape(cfg, world_size)  # deepspeed.config may override the micro batch or accumulation
        # streaming_split(equal=True) gives every worker floor(N / world) records.
        per_worker = (packed_sequences or train_records) // world_size
        micro = max(1, math.ceil(per_worker / shape.micro_batch_per_worker))
        total = (micro * t.epochs) // shape.gradient_accumulation_steps
        if t.max_steps:
            total = min(total, t.max_steps)
        return cls(train_records, world_size, micro, max(total, 1), use_gpu,
                   packed=packed_sequences is not None, zero_stage=shape.stage)


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a restart continues mid-epoch."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    samples_seen: int = 0
    trained_tokens: int = 0  # tokens of every worker's batches so far (padding excluded)
    finished: bool = False


def _set_threads(cfg: RunConfig, local_world: int) -> int:
    """Ray workers don't get torchrun's OMP_NUM_THREADS=1: split the cores between local workers."""
    import torch

    threads = cfg.scaling.threads_per_worker or max(1, (os.cpu_count() or 1) // max(local_world, 1))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def _configure_logging() -> None:
    """rayfine's own lines at INFO on the worker's stderr (Ray keeps it in its log folder and shows it with
    RAYFINE_VERBOSE=1; ``Worker.log`` writes from rank 0 only); weight loading and DeepSpeed internals at
    WARNING, or they bury the run's lines."""
    import sys

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ours = logging.getLogger("training")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s rayfine %(message)s"))
        ours.addHandler(handler)


def import_deepspeed(use_gpu: bool):
    """``deepspeed``, ready for a training engine.

    - Imported without MLflow: DeepSpeed's autotuner imports ``mlflow`` when deepspeed is imported, if it is
      installed, for its own experiment logging (0.5-1.3 s of every worker's start-up on 2 cores). rayfine runs no
      DeepSpeed autotuning and tracks runs from the driver (``training.tracking``), so mlflow is hidden while
      deepspeed loads and imports normally afterwards.
    - On CPU, without its shared-memory all-reduce op: DeepSpeed's comm layer builds that C++ op when it starts
      (a compile of 25-60 s the first time on each machine and virtualenv), and only its inference all-reduce
      (tensor-parallel inference) uses it; training reduces through torch.distributed (gloo).
    """
    import importlib
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed
    else:
        sys.modules["mlflow"] = None  # ``import mlflow`` raises ImportError: the autotuner runs without it
        try:
            import deepspeed
        finally:
            if sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    if not use_gpu:  # the module's own global, looked up when the comm backend starts
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def build_model(cfg: RunConfig, adapter, labels: LabelSpace | None):
    import transformers

    kwargs = adapter.model_kwargs(labels) if labels is not None else {}
    return getattr(transformers, adapter.auto_model).from_pretrained(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code, **kwargs)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _take(batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in batch.items()}


def iter_train_batches(shard, cfg: RunConfig, epoch: int, pad_id: int = 0, batch_size: int | None = None):
    """Micro-batches grouped by length: sort within a bucket of 16 batches, then shuffle batch order.

    Padding is most of the wasted compute on short texts; grouping keeps it small while the local shuffle
    and the shuffled batch order keep epochs varied. With ``data.packing`` the bucket's examples are packed
    into ``max_seq_length`` sequences instead. Deterministic for a given seed and epoch. ``batch_size``: the
    engine's micro batch (default: training.batch_size).
    """
    bs = batch_size or cfg.training.batch_size
    bucket = bs * 16
    rng = np.random.default_rng([cfg.training.seed, epoch])
    for big in shard.iter_batches(batch_size=bucket, batch_format="numpy", prefetch_batches=2,
                                  local_shuffle_buffer_size=bucket * 2,
                                  local_shuffle_seed=cfg.training.seed + epoch):
        if cfg.data.packing:
            from training.tasks.causal_lm import pack_rows

            packed = pack_rows(big, cfg.data.max_seq_length, pad_id)
            rng.shuffle(packed)
            for i in range(0, len(packed), bs):
                group = packed[i: i + bs]
                yield {k: np.stack([g[k] for g in group]) for k in group[0]}
            continue
        order = np.argsort(np.asarray(big["length"]), kind="stable")
        chunks = [order[i: i + bs] for i in range(0, len(order), bs)]
        rng.shuffle(chunks)
        for idx in chunks:
            yield _take(big, idx)


class Prefetched:
    """An iterable whose first item is fetched in a background thread from the moment it is made; iterating it
    waits for that item (or raises what fetching it raised), then goes on in the caller's thread."""

    def __init__(self, iterable):
        import threading

        self._it = iter(iterable)
        self._first: tuple = ()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="rayfine-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = (next(self._it),)
        except StopIteration:
            pass
        except BaseException as exc:  # noqa: BLE001 - raised in the iterating thread
            self._error = exc

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._it


def synchronized(batches, device):
    """Stop every rank's epoch as soon as one rank runs out of batches (packed epochs differ in length)."""
    import torch
    import torch.distributed as dist

    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MIN)
        if not more.item():
            return
        yield batch


def _to_device(arrays: dict[str, np.ndarray], device):
    import torch

    return {k: torch.tensor(v, device=device) for k, v in arrays.items()}


def _match_dtype(inputs: dict, dtype) -> dict:
    """A float attention mask (packed 4D) follows the engine's compute dtype; other inputs keep theirs (DPO's
    reference scores stay float32)."""
    mask = inputs.get("attention_mask")
    if mask is not None and mask.is_floating_point():
        inputs = {**inputs, "attention_mask": mask.to(dtype)}
    return inputs


class Worker:
    """State of one rank: the engine, the data shards, and the current position."""

    def __init__(self, cfg: RunConfig, plan: TrainPlan, labels: LabelSpace | None, held: dict | None = None):
        import ray.train
        import torch

        from training.tasks import get_adapter

        ctx = ray.train.get_context()
        _configure_logging()
        self.cfg, self.plan, self.labels = cfg, plan, labels
        self.held = held or {}  # split -> object ref of a small split held whole (training.data.held_split)
        self._shards: dict = {}
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.threads = _set_threads(cfg, ctx.get_local_world_size())
        torch.manual_seed(cfg.training.seed)
        self.adapter = get_adapter(cfg)
        if plan.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        self.adapter.prepare_tokenizer(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.state = TrainState()
        self.resumed_from_step = 0
        self.log_window: list[float] = []
        self.metric_window: dict[str, list[float]] = {}  # the task's batch metrics besides the loss
        self.reference: dict[str, np.ndarray] | None = None  # pair id -> initial model's scores (DPO)
        self.window_start = time.perf_counter()
        self.window_samples = 0
        self.window_tokens = 0
        self.startup: dict[str, float] = {}
        self.startup_sent = False

    def shard(self, split: str):
        """This rank's share of the train split, or a whole evaluation split: from the object store for a held
        split (``training.data.HeldSplit``), else Ray Train's shard of the Ray Dataset."""
        if split not in self.held:
            import ray.train

            return ray.train.get_dataset_shard(split)
        if split not in self._shards:
            import ray

            from training.data import HeldSplit

            columns = ray.get(self.held[split])
            self._shards[split] = HeldSplit(columns, self.rank, self.world) if split == "train" else HeldSplit(columns)
        return self._shards[split]

    # ---- engine ---------------------------------------------------------------------------------
    def configure_engine(self) -> None:
        """The derived DeepSpeed config and the shape the engine will run (cheap: nothing is built yet)."""
        import torch

        from training.ds_config import build_deepspeed_config, engine_shape
        from training.preflight import count_parameters

        bf16 = bool(self.plan.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        # Built on the meta device: it imports the model's code, which loading the weights needs next anyway.
        num_params = count_parameters(self.cfg, len(self.labels.names) if self.labels else None)
        self.ds_config = build_deepspeed_config(
            self.cfg, world_size=self.world, total_steps=self.plan.total_steps, use_gpu=self.plan.use_gpu,
            bf16_supported=bf16, num_params=num_params)
        self.shape = engine_shape(self.ds_config)  # stage, micro batch, accumulation: as the engine runs them

    def build_engine(self):
        import torch

        deepspeed = import_deepspeed(self.plan.use_gpu)

        # Join DeepSpeed's comm layer to the process group Ray Train already set up; DeepSpeed's config
        # (built below, also by HfDeepSpeedConfig) reads the world size from it.
        deepspeed.init_distributed(dist_backend="nccl" if self.plan.use_gpu else "gloo")
        dschf = None
        if self.shape.stage == 3:
            # Keeps ZeRO-3 active while transformers loads the weights, so each rank only materializes its
            # partition (zero.Init). Must stay referenced until the model is built.
            from transformers.integrations import HfDeepSpeedConfig

            dschf = HfDeepSpeedConfig(self.ds_config)  # noqa: F841
        model = build_model(self.cfg, self.adapter, self.labels)
        if self.cfg.model.lora.enabled:
            from training.lora import apply_lora

            model = apply_lora(model, self.cfg)
        self.adapter.prepare_model(model)
        precision = "bf16" if "bf16" in self.ds_config else "fp16" if "fp16" in self.ds_config else "fp32"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=_param_groups(model, self.cfg.training.weight_decay),
            config=self.ds_config)
        del dschf
        self.log(f"DeepSpeed ZeRO-{self.shape.stage} engine, {precision}: micro batch "
                 f"{self.shape.micro_batch_per_worker} x {workers_text(self.world)} x "
                 f"{self.shape.gradient_accumulation_steps} accumulation, {self.threads} torch threads per worker")

    def staging(self) -> tempfile.TemporaryDirectory:
        """A folder for a checkpoint before Ray Train persists it: inside the run's storage when that is a mounted
        filesystem (sized for checkpoints; a container's /tmp often is not, and a full model can be gigabytes;
        ``upload`` then moves the files into place), else the system's temp folder (object storage: Ray copies
        them there)."""
        root = None
        if self.storage_dir:
            root = Path(self.storage_dir) / STAGING
            root.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=root, prefix=f"rank{self.rank}-")

    @functools.cached_property
    def storage_dir(self) -> str | None:
        try:
            return run_storage_dir()
        except Exception:  # noqa: BLE001 - Ray's DeveloperAPI moved: stage in the temp folder, Ray copies
            return None

    @property
    def upload(self):
        """``ray.train.report``'s ``checkpoint_upload_fn``: a rename when staged in the storage folder, else None
        (Ray's copy)."""
        return move_into_storage if self.storage_dir else None

    def log(self, message: str) -> None:
        """Log once per run (rank 0), not once per worker."""
        if self.rank == 0:
            logger.info(message)

    def restore(self, checkpoint) -> bool:
        """Load engine and position from a Ray checkpoint; returns True when training already finished."""
        with checkpoint.as_directory() as path:
            state = json.loads((Path(path) / TRAINER_STATE).read_text())
            self.state = TrainState(**state)
            self.resumed_from_step = self.state.global_step
            if self.state.finished:
                return True
            self.engine.load_checkpoint(path, tag=DS_TAG)
            if self.adapter.reference_pass:
                with np.load(Path(path) / REFERENCE_FILE) as saved:
                    self.reference = {k: saved[k] for k in saved.files}
        return False

    # ---- reporting ------------------------------------------------------------------------------
    def save_and_report(self, metrics: dict, checkpoint: bool):
        import ray.train
        from ray.train import Checkpoint

        if self.startup and not self.startup_sent:  # rank 0's start-up timestamps, once (RAYFINE_TIMINGS)
            metrics = {**metrics, "startup": self.startup}
            self.startup_sent = True

        if not checkpoint:
            ray.train.report(metrics)
        else:
            with self.staging() as tmp:
                self.engine.save_checkpoint(tmp, tag=DS_TAG)  # every rank writes its own ZeRO shard
                if self.rank == 0:
                    (Path(tmp) / TRAINER_STATE).write_text(json.dumps(asdict(self.state)))
                    if self.reference is not None:
                        np.savez(Path(tmp) / REFERENCE_FILE, **self.reference)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_upload_fn=self.upload)
        self.window_start = time.perf_counter()  # throughput excludes evaluation and checkpoint time

    def epoch_progress(self) -> float:
        """Epochs done; within a packed epoch only an estimate (its length is known when it ends)."""
        fraction = self.state.micro_in_epoch / max(self.plan.micro_per_epoch, 1)
        return round(self.state.epoch + (min(fraction, 0.99) if self.plan.packed else fraction), 4)

    def train_metrics(self) -> dict:
        import torch
        import torch.distributed as dist

        names = sorted(self.metric_window)  # the same on every rank: the same task
        window = torch.tensor([sum(self.log_window), len(self.log_window), self.window_tokens]
                              + [sum(self.metric_window[k]) for k in names], dtype=torch.float64)
        if dist.is_initialized():
            window = window.to(self.device)
            dist.all_reduce(window)
        loss, tokens = window[:2], int(window[2])  # tokens: every worker's
        task_metrics = {k: float(window[3 + i] / max(loss[1], 1)) for i, k in enumerate(names)}
        self.state.trained_tokens += tokens
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        metrics = {
            "step": self.state.global_step,
            "epoch": self.epoch_progress(),
            "loss": float(loss[0] / max(loss[1], 1)),
            "lr": float(self.engine.get_lr()[0]),
            "samples_per_second": self.window_samples * self.world / elapsed,
            "tokens_per_second": tokens / elapsed,
            "trained_tokens": self.state.trained_tokens,
            "total_steps": self.plan.total_steps,
            "resumed_from_step": self.resumed_from_step,
            **task_metrics,
        }
        self.log_window.clear()
        self.metric_window.clear()
        self.window_start, self.window_samples, self.window_tokens = time.perf_counter(), 0, 0
        return metrics

    # ---- evaluation -----------------------------------------------------------------------------
    def inputs_of(self, batch: dict[str, np.ndarray]) -> dict:
        """A batch's model inputs on this rank's device (with the reference scores when the task uses them)."""
        if self.reference is not None:
            batch = with_reference(batch, self.reference)
        return _match_dtype(_to_device(self.adapter.collate(batch, self.pad_id), self.device), self.dtype)

    def each_batch(self, split: str, forward, keep) -> None:
        """``keep(batch, inputs, forward(inputs))`` for this rank's share of a full (unsplit) split, in eval mode
        without gradients. Batches are dealt round-robin to ranks, and the ranks run their forward passes in
        lockstep, one round at a time (under ZeRO-3 each forward gathers parameters collectively): in a round
        where a rank has no batch left, it runs a pass that is not kept, on its last batch (or the split's first)."""
        import torch
        import torch.distributed as dist

        shard = self.shard(split)
        bs = self.shape.micro_batch_per_worker * 2
        seen: list = []  # the split's first batch: a rank dealt none still has one to run

        def own_batches():
            for i, batch in enumerate(shard.iter_batches(batch_size=bs, batch_format="numpy")):
                if not seen:
                    seen.append(batch)
                if i % self.world == self.rank:
                    yield batch

        batches, pending = own_batches(), None
        self.engine.eval()
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                more = torch.tensor([0 if batch is None else 1], device=self.device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)
                if not more.item():
                    break
                if batch is not None:
                    pending = batch
                    inputs = self.inputs_of(batch)
                    keep(batch, inputs, forward(inputs))
                elif pending is not None or seen:
                    forward(self.inputs_of(pending if pending is not None else seen[0]))
        self.engine.train()

    def evaluate(self, split: str) -> dict:
        """Metrics on a full (unsplit) split, gathered from every rank."""
        import torch.distributed as dist

        results, totals = [], [0.0, 0]  # loss sum, examples

        def keep(batch, inputs, out):
            results.extend(self.adapter.eval_outputs(batch, inputs, out))
            n = len(batch["length"])
            totals[0] += float(out.loss) * n
            totals[1] += n

        self.each_batch(split, lambda inputs: self.adapter.forward(self.engine, inputs), keep)
        loss_sum, count = totals
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (results, loss_sum, count))
        metrics = self.adapter.compute_metrics([r for part in gathered for r in part[0]], self.labels)
        # a task that weighs its loss itself (causal LM: per token) keeps it; else the per-example mean
        metrics.setdefault("loss", sum(p[1] for p in gathered) / max(sum(p[2] for p in gathered), 1))
        return metrics

    def score_reference(self) -> None:
        """DPO without LoRA: the initial model's log-probabilities of both outputs of every pair of every split,
        computed once before the first step and shared by all ranks (the reference model is never held)."""
        import torch.distributed as dist

        from training.tasks.preference import Preference

        started = time.perf_counter()
        ids, scores = [], []

        def keep(batch, inputs, logps):
            chosen, rejected = logps.double().chunk(2)
            ids.append(np.asarray(batch["pair_id"]))
            scores.append(np.stack([chosen.cpu().numpy(), rejected.cpu().numpy()], axis=1))

        for split in ("reference", "validation", "test"):
            if split != "test" or self.cfg.data.test is not None:
                self.each_batch(split, lambda inputs: Preference.logps(self.engine, inputs), keep)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (ids, scores))
        all_ids = np.concatenate([a for part in gathered for a in part[0]] or [np.zeros(0, np.int64)])
        all_scores = np.concatenate([a for part in gathered for a in part[1]] or [np.zeros((0, 2))])
        order = np.argsort(all_ids, kind="stable")
        self.reference = {"pair_id": all_ids[order], "chosen": all_scores[order, 0], "rejected": all_scores[order, 1]}
        self.log(f"reference log-probabilities of {len(np.unique(all_ids)):,} pairs computed with the initial "
                 f"model in {time.perf_counter() - started:.1f}s")

    def eval_report(self) -> dict:
        metrics = self.evaluate("validation")
        return {f"eval_{k}": v for k, v in metrics.items() if not isinstance(v, dict)} | {
            "eval_report": json.dumps(metrics)}

    # ---- export ---------------------------------------------------------------------------------
    def export(self, out_dir: Path) -> None:
        """Consolidate the (possibly ZeRO-3 sharded) weights into one safetensors model on rank 0."""
        if self.shape.stage == 3:
            state_dict = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls
        else:
            state_dict = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return
        module = self.engine.module
        if self.cfg.model.lora.enabled:
            from training.lora import export_lora

            kwargs = self.adapter.model_kwargs(self.labels) if self.labels is not None else {}
            export_lora(module, state_dict, out_dir, self.cfg, self.tokenizer, kwargs)
        else:
            module.save_pretrained(out_dir, state_dict=state_dict)
            self.tokenizer.save_pretrained(out_dir)
        d = self.cfg.data
        qa = self.cfg.task == "question_answering"
        ModelInfo(task=self.cfg.task, model_id=self.cfg.output.model_id or self.cfg.output.name,
                  base_model=self.cfg.model.name_or_path, max_seq_length=d.max_seq_length,
                  labels=self.labels.names if self.labels else None, rayfine_version=__version__,
                  aggregation_strategy="first" if self.cfg.task == "token_classification" else None,
                  doc_stride=d.doc_stride if qa else None, max_answer_length=d.max_answer_length if qa else None,
                  n_best=d.n_best if qa else None).save(out_dir)


def use_this_environments_ninja() -> None:
    """Put the bin folder of this Python environment first on PATH when it holds a ``ninja``.

    DeepSpeed builds its C++ ops (CPU Adam for optimizer offload) on first use with the first ``ninja`` on PATH,
    into one cache folder (``~/.cache/torch_extensions``). Ninja versions keep incompatible build logs: a system
    ninja (1.11) and the one pip installs with DeepSpeed (1.13) each take the other's build for stale and compile
    the op again, about 40 s on 2 cores, each time processes started with one PATH follow processes started with
    the other (``rayfine`` run from an unactivated venv, then a ``ray start`` from an activated one)."""
    import sys

    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def train_loop_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker (``config`` carries the typed run config and the plan)."""
    cfg: RunConfig = config["cfg"]
    plan: TrainPlan = config["plan"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if plan.use_gpu else "cpu")
    use_this_environments_ninja()
    import ray.train

    started = time.time()
    w = Worker(cfg, plan, config["labels"], config.get("held"))
    w.configure_engine()
    checkpoint = ray.train.get_checkpoint()
    shard = w.shard("train")
    # A fresh run's first batches are on their way while the engine is built (DeepSpeed's and the model's
    # imports, the weights): Ray Data starts its stream in other processes meanwhile (a held split is read in a
    # thread here). A resumed run starts from its checkpoint's epoch, and DPO's reference pass reads the data first.
    first_epoch = (Prefetched(iter_train_batches(shard, cfg, 0, w.pad_id, w.shape.micro_batch_per_worker))
                   if checkpoint is None and not w.adapter.reference_pass else None)
    w.build_engine()
    collector.resume()  # paused since the process started (core.collector)
    w.startup = {"worker_start": started, "engine_built": time.time()}  # sent with the first report
    if checkpoint is not None and w.restore(checkpoint):
        return  # finished before a driver restart; the final checkpoint already holds the model
    resumed = checkpoint is not None
    if w.adapter.reference_pass and w.reference is None:
        w.score_reference()
    t = cfg.training
    s = w.state
    while s.epoch < t.epochs and s.global_step < plan.total_steps:
        epoch, micro = s.epoch, 0
        batches = (first_epoch if first_epoch is not None and epoch == 0
                   else iter_train_batches(shard, cfg, epoch, w.pad_id, w.shape.micro_batch_per_worker))
        first_epoch = None
        for batch in (synchronized(batches, w.device) if plan.packed else batches):
            w.startup.setdefault("first_batch", time.time())
            if micro < s.micro_in_epoch:  # resuming mid-epoch: skip what the checkpoint already covers
                micro += 1
                continue
            inputs = w.inputs_of(batch)
            out = w.adapter.forward(w.engine, inputs)
            loss = out.loss
            if not all_finite(loss, w.device):  # every rank stops at the same micro-step, and the run ends
                _report_divergence(w, float(loss.detach()))  # here: a restart would only diverge again
                return
            w.engine.backward(loss)
            boundary = w.engine.is_gradient_accumulation_boundary()
            w.engine.step()
            micro += 1
            s.micro_in_epoch = micro
            examples = len(batch["length"])  # a packed sequence, a record's window, a preference pair
            s.samples_seen += examples * w.world
            w.window_samples += examples
            w.window_tokens += int((inputs["input_ids"] != w.pad_id).sum()) if plan.packed else \
                int(inputs["attention_mask"].sum())
            w.log_window.append(float(loss.detach()))
            for name, value in w.adapter.batch_metrics(out).items():
                w.metric_window.setdefault(name, []).append(value)
            epoch_done = not plan.packed and micro >= plan.micro_per_epoch
            if epoch_done:  # a checkpoint taken now must resume at the next epoch's start
                s.epoch, s.micro_in_epoch = epoch + 1, 0
            if boundary:
                s.global_step += 1
                w.startup.setdefault("first_step", time.time())
                if t.inject_failure_at_step == s.global_step and not resumed and w.rank == 0:
                    raise RuntimeError(f"injected failure at step {s.global_step} "
                                       "(training.inject_failure_at_step)")
                _maybe_report(w, end_of_epoch=epoch_done and s.epoch < t.epochs)
            if epoch_done or s.global_step >= plan.total_steps:
                break
        if s.epoch == epoch:  # a packed epoch ran out, or max_steps stopped it
            s.epoch, s.micro_in_epoch = epoch + 1, 0
            if plan.packed and s.epoch < t.epochs and s.global_step < plan.total_steps:
                _maybe_report(w, end_of_epoch=True)
    _finish(w)


def all_finite(loss, device) -> bool:
    """Whether every rank's loss of this micro-step is finite (a sum over ranks: a NaN or inf anywhere shows)."""
    import torch
    import torch.distributed as dist

    total = loss.detach().float().reshape(1).to(device).clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return bool(torch.isfinite(total).item())


def _report_divergence(w: Worker, loss: float) -> None:
    """End the run on a non-finite loss with a report the driver turns into the error (never a worker failure,
    which ``scaling.max_failures`` would retry from the last checkpoint into the same divergence)."""
    import ray.train

    step = w.state.global_step + 1
    w.log(f"loss is {loss} at step {step}: training diverged")
    ray.train.report({"step": w.state.global_step, "diverged_at_step": step, "diverged_loss": str(loss)})


def with_reference(batch: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with each pair's reference scores, looked up by its ``pair_id``."""
    from training.tasks.preference import REFERENCE

    ids = np.asarray(batch["pair_id"])
    at = np.searchsorted(reference["pair_id"], ids).clip(max=max(len(reference["pair_id"]) - 1, 0))
    if not len(reference["pair_id"]) or (reference["pair_id"][at] != ids).any():
        raise RuntimeError("a preference pair has no reference score: the data changed since the reference pass "
                           "(start the run in a new output.name)")
    return {**batch, REFERENCE[0]: reference["chosen"][at], REFERENCE[1]: reference["rejected"][at]}


def _maybe_report(w: Worker, end_of_epoch: bool) -> None:
    t, s = w.cfg.training, w.state
    step = s.global_step
    final = step >= w.plan.total_steps
    log = end_of_epoch or step % t.log_every_steps == 0 or final
    evaluate = (t.eval_every_steps and step % t.eval_every_steps == 0) or end_of_epoch
    checkpoint = (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0) or end_of_epoch
    if final and not end_of_epoch:
        evaluate = checkpoint = False  # _finish evaluates and exports right after
    if not (log or evaluate or checkpoint):
        return
    metrics = w.train_metrics() if w.log_window else {"step": step, "epoch": w.epoch_progress()}
    if evaluate:
        metrics |= w.eval_report()
    w.save_and_report(metrics, checkpoint=bool(checkpoint))


def _finish(w: Worker) -> None:
    import ray.train
    from ray.train import Checkpoint

    metrics = {"step": w.state.global_step, "final": True} | w.eval_report()
    if w.cfg.data.test is not None:
        test = w.evaluate("test")
        metrics |= {f"test_{k}": v for k, v in test.items() if not isinstance(v, dict)}
        metrics["test_report"] = json.dumps(test)
    w.state.finished = True
    with w.staging() as tmp:
        w.export(Path(tmp) / "model")
        if w.rank == 0:
            (Path(tmp) / TRAINER_STATE).write_text(json.dumps(asdict(w.state)))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp) if w.rank == 0 else None,
                         checkpoint_upload_fn=w.upload)
