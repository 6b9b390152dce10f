"""OpenAI hyperparameters -> the run config of one job.

A job's config is the operator's base config with only these keys changed (TRAPS: API users never set paths,
``runtime_env``, ``working_dir`` or the entrypoint):

- ``n_epochs`` -> ``training.epochs``;
- ``learning_rate_multiplier`` -> ``training.learning_rate`` = base learning rate x multiplier;
- ``batch_size`` is the total batch, examples per optimizer step over all workers (OpenAI's meaning). The
  base config's total is ``training.batch_size x scaling.num_workers x training.gradient_accumulation_steps``
  (a base config with ``num_workers: auto`` trains each job on one worker: the total has to be split before the
  job reaches the cluster, so a base config for several GPUs names its count).
  A requested total ``B`` gives each of the ``W`` workers ``B / W`` examples per step (so ``B`` must be a
  multiple of ``W``), in micro-batches no larger than the base ``training.batch_size`` (the size the operator
  knows fits in memory): ``gradient_accumulation_steps`` is the fewest micro-batches of equal size;
- ``seed`` -> ``training.seed``;
- ``method.type`` -> ``training.method`` (``supervised`` -> ``sft``, ``dpo`` -> ``dpo``, which needs a causal-LM
  base model and turns ``data.packing`` off), and ``beta`` (DPO only) -> ``training.beta``;
- ``"auto"`` (or leaving a key out) keeps the base config's value.

Then ``data.train``/``data.validation`` become the stored files, ``data.test`` is dropped (a job evaluates on
its own validation data), ``tune`` is off (a job is one training run), and ``output`` is the job's run folder
under the server's storage with ``output.model_id`` = the ``ft:`` name the exported model is served under.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from pydantic import ValidationError

from cluster.api.errors import APIError
from core.config import RunConfig, TuneConfig

Auto = Union[str, int, float, None]


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved values (what the job object reports) and the config keys they set."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    per_worker_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    method: str = "supervised"  # OpenAI's method.type
    beta: Optional[float] = None  # dpo

    def public(self) -> dict[str, Union[int, float]]:
        out = {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
               "learning_rate_multiplier": self.learning_rate_multiplier}
        return out | ({"beta": self.beta} if self.method == "dpo" else {})


def base_total_batch(base: RunConfig) -> int:
    t = base.training
    return t.batch_size * base.scaling.workers() * t.gradient_accumulation_steps


def split_batch(total: int, workers: int, max_micro: int) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` with ``micro x accumulation x workers == total`` and micro <= max_micro.

    Raises APIError when ``total`` is not a multiple of ``workers``.
    """
    if total % workers:
        near = sorted({max(workers, total - total % workers), total - total % workers + workers})
        raise APIError(400, f"batch_size {total} must be a multiple of this model's {workers} training workers "
                            f"(each worker takes an equal share); e.g. {' or '.join(map(str, near))}",
                       param="hyperparameters.batch_size", code="invalid_hyperparameters")
    per_worker = total // workers
    accumulation = -(-per_worker // max_micro)
    while per_worker % accumulation:
        accumulation += 1
    return per_worker // accumulation, accumulation


def resolve(base: RunConfig, n_epochs: Auto = "auto", batch_size: Auto = "auto",
            learning_rate_multiplier: Auto = "auto", method: str = "supervised",
            beta: Auto = "auto") -> Hyperparameters:
    """Map OpenAI hyperparameters onto ``base``; ``"auto"``/None keep the base value."""
    t = base.training
    if method == "dpo" and base.task != "causal_lm":
        raise APIError(400, f"method dpo tunes a causal language model; this base model is {base.task}.",
                       param="method.type", code="invalid_method")
    epochs = t.epochs if _auto(n_epochs) else int(n_epochs)
    multiplier = 1.0 if _auto(learning_rate_multiplier) else float(learning_rate_multiplier)
    if _auto(batch_size):
        total, micro, accumulation = base_total_batch(base), t.batch_size, t.gradient_accumulation_steps
    else:
        total = int(batch_size)
        micro, accumulation = split_batch(total, base.scaling.workers(), t.batch_size)
    return Hyperparameters(epochs, total, multiplier, micro, accumulation, t.learning_rate * multiplier, method,
                           (t.beta if _auto(beta) else float(beta)) if method == "dpo" else None)


def _auto(value: Auto) -> bool:
    return value is None or value == "auto"


def build_job_config(base: RunConfig, hp: Hyperparameters, *, seed: int, train_path: str,
                     validation_path: Optional[str], storage: str, job_id: str, model_id: str,
                     mlflow_uri: Optional[str] = None, wandb: Optional[dict] = None,
                     wandb_mode: str = "online") -> RunConfig:
    """The job's run config: ``base`` plus the resolved hyperparameters, the stored files and the job's output;
    with ``mlflow_uri`` (``rayfine api --mlflow-uri``) the run is tracked there, named after the job; with ``wandb``
    (the job's ``integrations[].wandb``: project, name, entity, tags) in Weights & Biases (``wandb_mode``).

    Raises APIError (400) when the result is not a valid config (e.g. a learning rate the schema refuses), or
    when the job has no validation data (no validation_file and a base config that holds none out).
    """
    if validation_path is None and base.data.validation_split <= 0:
        raise APIError(400, "This base model holds out no validation data (data.validation_split is 0); give a "
                            "validation_file.", param="validation_file", code="validation_file_required")
    raw = base.model_dump(mode="json")
    raw["data"].update(train=train_path, validation=validation_path, test=None, format="jsonl")
    raw["training"].update(epochs=hp.n_epochs, learning_rate=hp.learning_rate, batch_size=hp.per_worker_batch_size,
                           gradient_accumulation_steps=hp.gradient_accumulation_steps, seed=seed,
                           method="dpo" if hp.method == "dpo" else "sft")
    if hp.method == "dpo":
        raw["training"]["beta"] = hp.beta
        raw["data"]["packing"] = False  # an SFT optimization; DPO runs each output whole
    raw["scaling"]["num_workers"] = base.scaling.workers()  # the count the batch was split for
    raw["tune"] = TuneConfig().model_dump(mode="json")
    raw["output"] = {"dir": storage, "name": job_id, "model_id": model_id}
    if mlflow_uri:
        raw.setdefault("tracking", {})["mlflow"] = {"tracking_uri": mlflow_uri, "experiment": "rayfine-api",
                                                    "run_name": job_id}
    if wandb:
        raw.setdefault("tracking", {})["wandb"] = {"project": wandb["project"], "entity": wandb.get("entity"),
                                                   "name": wandb.get("name") or job_id, "mode": wandb_mode,
                                                   "tags": list(wandb.get("tags") or [])}
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(400, f"These hyperparameters give an invalid training config: {where}: {err['msg']}",
                       param="hyperparameters", code="invalid_hyperparameters") from None
