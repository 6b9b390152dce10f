"""The exported model folder: the contract between training and serving.

    model/  config.json, model.safetensors, tokenizer files, rayfine.json (task, labels, base model,
            max_seq_length), README.md (model card with the metrics)
"""

from __future__ import annotations

from pathlib import Path

from cluster.config import RunConfig

_USAGE = {
    "sequence_classification": ('from transformers import pipeline\n'
                                'clf = pipeline("text-classification", model="{path}")\n'
                                'print(clf("I loved it"))'),
}


def write_model_card(model_dir: Path, cfg: RunConfig, evaluation: dict) -> None:
    t, ds = cfg.training, cfg.deepspeed
    rows = []
    for split, m in evaluation.items():
        for key in ("accuracy", "f1", "precision", "recall", "loss", "num_examples"):
            if key in m:
                value = m[key]
                rows.append(f"| {split} | {key} | {value:.4f} |" if isinstance(value, float)
                            else f"| {split} | {key} | {value} |")
    usage = _USAGE.get(cfg.task, "").format(path=model_dir.name)
    text = f"""---
library_name: transformers
pipeline_tag: {'text-classification' if cfg.task == 'sequence_classification' else cfg.task}
base_model: {cfg.model.name_or_path}
---
# {cfg.output.name}

Fine-tuned with rayfine ({cfg.task}) from `{cfg.model.name_or_path}`.

## Evaluation
| split | metric | value |
|---|---|---|
{chr(10).join(rows)}

## Training
- epochs {t.epochs}, learning rate {t.learning_rate}, batch size {t.batch_size} per worker x
  {cfg.scaling.num_workers} workers x {t.gradient_accumulation_steps} accumulation steps
- scheduler {t.lr_scheduler} with warmup ratio {t.warmup_ratio}, weight decay {t.weight_decay}, seed {t.seed}
- DeepSpeed ZeRO-{ds.stage}, precision {ds.precision}, max sequence length {cfg.data.max_seq_length}

## Use
```python
{usage}
```
"""
    (model_dir / "README.md").write_text(text)
