"""Start-up and wall time of the default run, `rayfine train ray_config.yaml`, next to the Hugging Face Trainer
doing the same job in one process.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--config ray_config.yaml]

Each side runs as a fresh process, `--runs` times, alternating (warm caches: run the script once before
measuring, so that the file cache holds the libraries and the model). For each: seconds from process start to
the first completed optimizer step, to the end, and the final validation accuracy. Figures are medians with the
spread (min-max), and the 1-minute load average before each run is printed beside them: measure on a quiet
machine.

- rayfine: `rayfine train CONFIG` with `RAYFINE_TIMINGS=1` (its start-up table gives the first step), local Ray,
  `scaling.num_workers` workers, DeepSpeed, pre-flight data pass, evaluation, export, plots and model card;
- HF Trainer, same schedule: this file with `--hf-child`: the config's model, data, epochs, learning rate, warm-up,
  schedule, sequence length and global batch (workers x batch), one process using every core, evaluating and
  checkpointing when the config does (`training.eval_every_steps`: the Trainer's `eval_steps`, 0 at each epoch end;
  `training.checkpoint_every_steps`: `save_steps`, 0 at each epoch end: `save_strategy="epoch"`; a checkpoint holds
  the model, optimizer and scheduler, as rayfine's does), then a final evaluation and the model saved; the first
  step is timed by a callback;
- HF Trainer, minimal: the same without the evaluations and checkpoints during training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def process_age() -> float:
    """Seconds since this process started (the clock both sides are measured on)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def hf_child(config: str, out: Path, schedule: bool) -> None:
    """The HF Trainer side; writes {first_step, wall, accuracy} to ``out``. ``schedule``: evaluate and checkpoint
    during training as the config does."""
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from core.config import load_config

    cfg = load_config(config)
    d, t = cfg.data, cfg.training
    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    raw = load_dataset("json", data_files={"train": str(d.train), "validation": str(d.validation)})
    names = sorted(set(raw["train"][d.label_column]))
    label_ids = {name: i for i, name in enumerate(names)}
    data = raw.map(lambda b: {**tok(b[d.text_column], truncation=True, max_length=d.max_seq_length),
                              "labels": [label_ids[x] for x in b[d.label_column]]},
                   batched=True, remove_columns=raw["train"].column_names)
    torch.manual_seed(t.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model.name_or_path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label_ids)
    first_step: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not first_step:
                first_step.append(process_age())

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    during = {}
    if schedule and t.eval_every_steps:
        during.update(eval_strategy="steps", eval_steps=t.eval_every_steps)
    elif schedule:
        during.update(eval_strategy="epoch")
    if schedule and t.checkpoint_every_steps:
        during.update(save_strategy="steps", save_steps=t.checkpoint_every_steps)
    elif schedule:
        during.update(save_strategy="epoch")
    args = TrainingArguments(
        output_dir=str(out.parent / "hf"), per_device_train_batch_size=t.batch_size * cfg.scaling.workers(),
        per_device_eval_batch_size=64, num_train_epochs=t.epochs, learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio, lr_scheduler_type=t.lr_scheduler, weight_decay=t.weight_decay,
        seed=t.seed, report_to=[], logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        **{"save_strategy": "no", "eval_strategy": "no", **during})
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy, callbacks=[FirstStep()])
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model(str(out.parent / "hf" / "model"))
    out.write_text(json.dumps({"first_step": first_step[0], "wall": process_age(),
                               "accuracy": evaluation["eval_accuracy"]}))


def run_hf(config: str, tmp: Path, schedule: bool = True) -> dict:
    out = tmp / "hf.json"
    subprocess.run([sys.executable, __file__, "--hf-child", "--config", config, "--out", str(out),
                    *([] if schedule else ["--minimal"])], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_hf_minimal(config: str, tmp: Path) -> dict:
    return run_hf(config, tmp, schedule=False)


def run_rayfine(config: str, tmp: Path) -> dict:
    """`rayfine train` as a user runs it; the first step from its start-up table (seconds since the command
    started), the wall time around the process, the accuracy from eval.json."""
    rayfine = Path(sys.executable).parent / "rayfine"
    started = time.time()
    run = subprocess.run([str(rayfine), "train", config, "--set", f"output.dir={tmp / 'runs'}"], cwd=REPO,
                         env={**os.environ, "RAYFINE_TIMINGS": "1"}, capture_output=True, text=True)
    wall = time.time() - started
    if run.returncode != 0:
        raise SystemExit(f"rayfine train failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    line = next(x for x in run.stdout.splitlines() if x.strip().startswith("first optimizer step"))
    evaluation = next((tmp / "runs").glob("*/eval.json"))
    return {"first_step": float(line.split()[-1]), "wall": wall,
            "accuracy": json.loads(evaluation.read_text())["validation"]["accuracy"]}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} s  ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", default="ray_config.yaml")
    parser.add_argument("--hf-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--minimal", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_child:
        return hf_child(args.config, Path(args.out), schedule=not args.minimal)
    sides = (("rayfine", "rayfine train", run_rayfine), ("hf", "HF Trainer, same schedule", run_hf),
             ("hf-minimal", "HF Trainer, minimal", run_hf_minimal))
    results: dict[str, list[dict]] = {name: [] for name, _, _ in sides}
    loads = []
    for i in range(args.runs):
        for name, _, fn in sides:
            loads.append(os.getloadavg()[0])
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(fn(args.config, Path(tmp)))
            r = results[name][-1]
            print(f"run {i + 1} {name:<10} first step {r['first_step']:5.1f} s  end {r['wall']:5.1f} s  "
                  f"accuracy {r['accuracy']:.4f}  (load {loads[-1]:.2f})", flush=True)
    print(f"\n{args.config}, {args.runs} runs each, {os.cpu_count()} cores, 1-min load before the runs: "
          f"{min(loads):.2f}-{max(loads):.2f}")
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    for name, label, _ in sides:
        rs = results[name]
        print(f"  {label:<26} first step {summary([r['first_step'] for r in rs])}   "
              f"end {summary([r['wall'] for r in rs])}   accuracy {median(name, 'accuracy'):.4f}")
    for name, label, _ in sides[1:]:
        print(f"  rayfine / {label}: first step {median('rayfine', 'first_step') / median(name, 'first_step'):.2f}x, "
              f"end {median('rayfine', 'wall') / median(name, 'wall'):.2f}x")


if __name__ == "__main__":
    main()
