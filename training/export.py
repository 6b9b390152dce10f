"""The exported model folder: the contract between training and serving.

    model/  config.json, model.safetensors, tokenizer files, rayfine.json (task, labels, base model,
            max_seq_length), README.md (model card with the metrics)
"""

from __future__ import annotations

from pathlib import Path

from core.config import RunConfig
from training.scaling import workers_text

_USAGE = {
    "sequence_classification": ('from transformers import pipeline\n'
                                'clf = pipeline("text-classification", model="{path}")\n'
                                'print(clf("I loved it"))'),
    "token_classification": ('from transformers import pipeline\n'
                             '# "first": a word takes its first sub-token\'s label, as training labelled and evaluation\n'
                             '# scored words (the other sub-tokens are not trained; "simple" would let them split words)\n'
                             'ner = pipeline("token-classification", model="{path}", aggregation_strategy="first")\n'
                             'print(ner("Ada Lovelace was born in London"))'),
    # transformers 5 removed pipeline("question-answering"): the decoding of the model's evaluation, in plain code.
    "question_answering": ('import torch\n'
                           'from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n'
                           'tok = AutoTokenizer.from_pretrained("{path}")\n'
                           'model = AutoModelForQuestionAnswering.from_pretrained("{path}").eval()\n'
                           '\n'
                           '\n'
                           'def answer(question, context, max_length={max_seq_length}, stride={doc_stride}, '
                           'n_best={n_best}, max_answer={max_answer_length}):\n'
                           '    # As the evaluation decoded: windows of max_length tokens overlapping by stride; in '
                           'each, the\n'
                           '    # n_best start and end tokens of the context; spans of at most max_answer tokens; '
                           'the best\n'
                           '    # start + end logit of all windows wins.\n'
                           '    enc = tok(question, context, truncation="only_second", max_length=max_length, '
                           'stride=stride,\n'
                           '              return_overflowing_tokens=True, return_offsets_mapping=True, '
                           'padding=True, return_tensors="pt")\n'
                           '    offsets = enc.pop("offset_mapping")\n'
                           '    enc.pop("overflow_to_sample_mapping")\n'
                           '    with torch.no_grad():\n'
                           '        out = model(**enc)\n'
                           '    best = (float("-inf"), "")\n'
                           '    for w in range(len(offsets)):\n'
                           '        ctx = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]\n'
                           '        starts = sorted(ctx, key=lambda i: -out.start_logits[w, i])[:n_best]\n'
                           '        ends = sorted(ctx, key=lambda i: -out.end_logits[w, i])[:n_best]\n'
                           '        for s in starts:\n'
                           '            for e in ends:\n'
                           '                score = float(out.start_logits[w, s] + out.end_logits[w, e])\n'
                           '                if s <= e < s + max_answer and score > best[0]:\n'
                           '                    best = (score, context[offsets[w][s][0]:offsets[w][e][1]])\n'
                           '    return best[1]\n'
                           '\n'
                           '\n'
                           'print(answer("Where was Ada born?", "Ada was born in London."))'),
}
PIPELINE_TAGS = {"sequence_classification": "text-classification", "token_classification": "token-classification",
                 "question_answering": "question-answering"}
METRICS = ("accuracy", "exact_match", "f1", "precision", "recall", "loss", "perplexity", "reward_accuracy",
           "reward_margin", "rewards_chosen", "rewards_rejected", "num_examples", "num_pairs")


def write_model_card(model_dir: Path, cfg: RunConfig, evaluation: dict) -> None:
    from training.ds_config import run_engine_shape

    t, ds = cfg.training, cfg.deepspeed
    shape = run_engine_shape(cfg, cfg.scaling.num_workers)
    rows = []
    for split, m in evaluation.items():
        for key in METRICS:
            if key in m:
                value = m[key]
                rows.append(f"| {split} | {key} | {value:.4f} |" if isinstance(value, float)
                            else f"| {split} | {key} | {value} |")
    d = cfg.data
    usage = _USAGE.get(cfg.task, "").format(  # model_dir is a staging folder
        path=Path(cfg.run_dir, "model"), max_seq_length=d.max_seq_length, doc_stride=d.doc_stride, n_best=d.n_best,
        max_answer_length=d.max_answer_length)
    method = f", DPO with beta {t.beta}" if t.method == "dpo" else ""
    text = f"""---
library_name: transformers
pipeline_tag: {PIPELINE_TAGS.get(cfg.task, cfg.task)}
base_model: {cfg.model.name_or_path}
---
# {cfg.output.name}

Fine-tuned with rayfine ({cfg.task}{method}) from `{cfg.model.name_or_path}`.

## Evaluation
| split | metric | value |
|---|---|---|
{chr(10).join(rows)}

## Training
- epochs {t.epochs}, learning rate {t.learning_rate}, batch size {shape.micro_batch_per_worker} per worker x
  {workers_text(cfg.scaling.num_workers)} x {shape.gradient_accumulation_steps} accumulation steps
- scheduler {t.lr_scheduler} with warmup ratio {t.warmup_ratio}, weight decay {t.weight_decay}, seed {t.seed}
- DeepSpeed ZeRO-{shape.stage}, precision {ds.precision}, max sequence length {cfg.data.max_seq_length}

## Use
```python
{usage}
```
"""
    (model_dir / "README.md").write_text(text)
