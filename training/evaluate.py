"""``rayfine evaluate``: metrics of an exported model on any labelled data, computed with Ray Data.

Batch inference runs in an actor pool (one model per actor); only the small per-example results of the
task adapter come back to the driver. The numbers equal the ones training reports, since both use the task adapter's metrics.
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


class PredictBatch:
    """Ray Data actor UDF: tokenizer and model loaded once per actor."""

    def __init__(self, cfg: RunConfig, model_dir: str, labels: LabelSpace):
        import torch
        import transformers
        from transformers import AutoTokenizer

        from training.tasks import get_adapter

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
    """Metrics of the model in ``model_dir`` on ``data`` (default: the config's test, else validation)."""
    from ray.data import ActorPoolStrategy

    from training.data import Splits, build_records, expand_inputs
    from training.preflight import MAX_PROBLEMS
    from training.tasks import get_adapter

    info = load_model_info(model_dir)
    names = info.labels or _labels_from_config(model_dir)
    labels = LabelSpace(list(names))
    if data is not None:
        records = build_records(expand_inputs(data, cfg.data.format, "--data"), cfg)
    else:
        splits = Splits(cfg)
        records = splits.records("test") or splits.records("validation")
    problems = [f"{r['_file']}:{r['_line']}: {r['_error']}" for r in
                records.filter(lambda r: r["_error"] != "").take(MAX_PROBLEMS)]
    if problems:
        raise UserError(problems, header="Problems in the evaluation data:")
    adapter = get_adapter(cfg)
    known = set(names)

    def unknown_labels(r: dict) -> list[str]:  # a record's labels (NER: its tags) the model cannot predict
        return sorted(set(adapter.record_labels({k: [v] for k, v in r.items()})[0]) - known)

    unknown = records.filter(lambda r: bool(unknown_labels(r))).take(5) if adapter.has_labels else []
    if unknown:
        raise UserError([f"{r['_file']}:{r['_line']}: label '{', '.join(unknown_labels(r))}' is not one the model "
                         f"knows ({', '.join(names)})" for r in unknown], header="Unknown labels:")
    out = records.map_batches(PredictBatch, batch_size=256, compute=ActorPoolStrategy(size=1),
                              fn_constructor_kwargs={"cfg": cfg, "model_dir": str(model_dir), "labels": labels})
    results, losses = [], []
    for batch in out.iter_batches(batch_size=4096, batch_format="numpy"):
        results += [json.loads(r) for r in batch["result"]]
        losses.append(batch["loss"])
    if not results:
        raise UserError("the evaluation data has no records")
    metrics = adapter.compute_metrics(results, labels)
    metrics.setdefault("loss", float(np.concatenate(losses).mean()))
    return metrics


def _labels_from_config(model_dir: Path) -> list[str]:
    config = json.loads((model_dir / "config.json").read_text())
    id2label = config.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def evaluate_command(cfg: RunConfig, model_dir: Path, data: str | None, output: str | None) -> dict:
    """``rayfine evaluate``: the task's metrics of ``model_dir`` on ``data`` (default: the config's data)."""
    metrics = evaluate_model(cfg, model_dir, data)
    logger.info(f"Evaluation of {model_dir} on {data or 'the config data'}:\n{format_metrics_table(metrics)}")
    if output:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics
