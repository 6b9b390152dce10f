"""``rayfine evaluate``: metrics of an exported model on any labelled data.

Small local data (``training.data.IN_PROCESS_MAX_BYTES``) is read and scored in the command's own process, with
no Ray at all; larger or remote data goes through Ray Data, batch inference in an actor pool (one model per
actor), and only the small per-example results of the task adapter come back to the driver. The numbers equal
the ones training reports, since both use the task adapter's metrics.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from core.config import RunConfig
from core.errors import UserError
from core.model_folder import ModelInfo
from training.tasks.base import LabelSpace

logger = logging.getLogger(__name__)


def format_metrics_table(m: dict) -> str:
    lines = [f"  {'metric':<16}{'value':>10}"]
    for key, v in m.items():  # every scalar the task reports, in its order
        if isinstance(v, float):
            lines.append(f"  {key:<16}{v:>10.4f}")
        elif isinstance(v, int) and not isinstance(v, bool):
            lines.append(f"  {key:<16}{v:>10}")
    kind = "class" if "per_class" in m else "type"  # NER reports entity types
    per_class = m.get("per_class") or m.get("per_type")
    if per_class:
        lines.append(f"\n  {kind:<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
        for name, c in per_class.items():
            lines.append(f"  {name[:20]:<20}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}"
                         f"{c['support']:>10}")
    return "\n".join(lines)


def load_model_info(model_dir: Path) -> ModelInfo:
    if not (model_dir / "config.json").exists():
        raise UserError(f"--model {model_dir}: not a model folder (no config.json); pass RUN/model")
    return ModelInfo.load(model_dir) or ModelInfo()


PREDICT_BATCH = 256  # records per call of PredictBatch


class PredictBatch:
    """Ray Data actor UDF (or called in this process for small local data): tokenizer and model loaded once."""

    def __init__(self, cfg: RunConfig, model_dir: str, labels: LabelSpace, in_actor: bool = True):
        import torch
        import transformers
        from transformers import AutoTokenizer

        from training.tasks import get_adapter

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if in_actor:  # an actor shares its node with other processes; the command's own process takes every core
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        self.adapter = get_adapter(cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = getattr(transformers, self.adapter.auto_model).from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code).eval()
        self.labels = labels
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.reference = None  # DPO: rewards are measured against the model training started from
        if cfg.training.method == "dpo":
            self.reference = transformers.AutoModelForCausalLM.from_pretrained(
                cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        enc = self.adapter.tokenize(batch, self.tokenizer, self.labels)
        order = np.argsort(enc["length"], kind="stable")  # batch by length: little padding
        results, losses = [], []
        with torch.no_grad():
            for start in range(0, len(order), 32):
                idx = order[start: start + 32]
                chunk = {k: (v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]) for k, v in enc.items()}
                chunk = {k: (np.asarray(v, dtype=object) if isinstance(v, list) else v) for k, v in chunk.items()}
                inputs = {k: torch.as_tensor(v) for k, v in self.adapter.collate(chunk, self.pad_id).items()}
                if self.reference is not None:
                    inputs["ref_logps"] = self.adapter.logps(self.reference, inputs)
                out = self.adapter.forward(self.model, inputs)
                results += self.adapter.eval_outputs(chunk, inputs, out)
                losses += [float(out.loss)] * len(idx)
        return {"result": [json.dumps(r) for r in results], "loss": np.asarray(losses)}


def evaluate_model(cfg: RunConfig, model_dir: Path, data: str | None = None) -> dict:
    """Metrics of the model in ``model_dir`` on ``data`` (default: the config's test, else validation). Small
    local data is scored in this process; larger or remote data in a Ray Data actor pool."""
    from training.data import MAX_PROBLEMS, EvaluationData, batch_rows, raise_problems
    from training.tasks import get_adapter

    info = load_model_info(model_dir)
    names = info.labels or _labels_from_config(model_dir)
    labels = LabelSpace(list(names))
    source = EvaluationData(cfg, data)
    adapter = get_adapter(cfg)
    known = set(names)

    def unknown_labels(r: dict) -> list[str]:  # a record's labels (NER: its tags) the model cannot predict
        return sorted(set(adapter.record_labels({k: [v] for k, v in r.items()})[0]) - known)

    def raise_unknown(unknown: list[dict]) -> None:
        if unknown:
            raise UserError([f"{r['_file']}:{r['_line']}: label '{', '.join(unknown_labels(r))}' is not one the "
                             f"model knows ({', '.join(names)})" for r in unknown], header="Unknown labels:")

    predict_kwargs = {"cfg": cfg, "model_dir": str(model_dir), "labels": labels}
    if source.in_process:
        batches = list(source.batches())
        rows = [row for b in batches for row in batch_rows(b)]
        raise_problems(rows)
        raise_unknown([r for r in rows if adapter.has_labels and unknown_labels(r)][:5])
        predict = PredictBatch(**predict_kwargs, in_actor=False) if rows else None
        outputs = [predict({k: v[i: i + PREDICT_BATCH] for k, v in b.items()})
                   for b in batches for i in range(0, len(b["_error"]), PREDICT_BATCH)]
    else:
        from ray.data import ActorPoolStrategy

        records = source.dataset()
        raise_problems(records.filter(lambda r: r["_error"] != "").take(MAX_PROBLEMS))
        raise_unknown(records.filter(lambda r: bool(unknown_labels(r))).take(5) if adapter.has_labels else [])
        out = records.map_batches(PredictBatch, batch_size=PREDICT_BATCH, compute=ActorPoolStrategy(size=1),
                                  fn_constructor_kwargs=predict_kwargs)
        outputs = list(out.iter_batches(batch_size=4096, batch_format="numpy"))
    results = [json.loads(r) for batch in outputs for r in batch["result"]]
    if not results:
        raise UserError("the evaluation data has no records")
    metrics = adapter.compute_metrics(results, labels)
    metrics.setdefault("loss", float(np.concatenate([batch["loss"] for batch in outputs]).mean()))
    return metrics


def _labels_from_config(model_dir: Path) -> list[str]:
    config = json.loads((model_dir / "config.json").read_text())
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def evaluate_command(cfg: RunConfig, model_dir: Path, data: str | None, output: str | None) -> dict:
    """``rayfine evaluate``: the task's metrics of ``model_dir`` on ``data`` (default: the config's data)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights' loading bar, when the model loads in this process
    metrics = evaluate_model(cfg, model_dir, data)
    logger.info(f"Evaluation of {model_dir} on {data or 'the config data'}:\n{format_metrics_table(metrics)}")
    if output:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics
