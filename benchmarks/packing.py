"""Useful tokens per second with and without packing, on long-tailed chat data.

    .venv/bin/python benchmarks/packing.py [--records 256] [--max-seq-length 256] [--batch-size 8]

Runs rayfine's own batching (training/loop.py `iter_train_batches` logic: length-grouped batches, or
`pack_rows` into max_seq_length sequences with block-diagonal attention) through forward + backward + AdamW
of a small Llama (2 layers, hidden 128) on CPU, in one process. Lengths follow a log-normal distribution
(median ~40 tokens, a tail past 256), as chat data does. "Useful" tokens are non-padding tokens; packed
batches hold batch-size sequences of max_seq_length tokens, unpacked ones batch-size examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_rows(n: int, max_len: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.7, sigma=0.8, size=n).astype(int), 8, max_len)
    ids = [rng.integers(5, vocab, size=L).astype(np.int64) for L in lengths]
    return {"input_ids": np.array(ids, dtype=object), "labels": np.array(ids, dtype=object),
            "length": lengths}


def batches(rows, mode: str, batch_size: int, max_len: int, seed: int = 0):
    from training.tasks.base import pad_sequences
    from training.tasks.causal_lm import IGNORE, pack_rows

    n = len(rows["length"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if mode == "packed":
        bucket = {k: v[order] for k, v in rows.items()}
        packed = pack_rows(bucket, max_len, pad_id=0)
        for i in range(0, len(packed), batch_size):
            group = packed[i: i + batch_size]
            yield {k: np.stack([g[k] for g in group]) for k in ("input_ids", "labels", "attention_mask",
                                                                  "position_ids")}
        return
    if mode == "grouped":
        bucket_size = batch_size * 16
        chunks = []
        for start in range(0, n, bucket_size):
            part = sorted(order[start: start + bucket_size], key=lambda i: rows["length"][i])
            chunks += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(chunks)
    else:
        chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    for idx in chunks:
        ids = [rows["input_ids"][i] for i in idx]
        yield {"input_ids": pad_sequences(ids, 0), "labels": pad_sequences(ids, IGNORE),
               "attention_mask": (pad_sequences(ids, -1) != -1).astype(np.int64)}


def run(rows, mode, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=args.max_seq_length))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    useful = total = 0
    start = time.perf_counter()
    for batch in batches(rows, mode, args.batch_size if mode != "packed" else args.packed_batch_size,
                         args.max_seq_length):
        inputs = {k: torch.as_tensor(v) for k, v in batch.items()}
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
        useful += int((inputs["input_ids"] != 0).sum())
        total += inputs["input_ids"].numel()
    elapsed = time.perf_counter() - start
    return useful / elapsed, 1 - useful / total, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per unpacked batch")
    parser.add_argument("--packed-batch-size", type=int, default=2, help="packed sequences per batch")
    parser.add_argument("--vocab", type=int, default=8000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = make_rows(args.records, args.max_seq_length, args.vocab)
    lengths = rows["length"]
    print(f"{args.records} examples, lengths p50 {np.median(lengths):.0f} p90 {np.percentile(lengths, 90):.0f} "
          f"max {lengths.max()}, max_seq_length {args.max_seq_length}, {os.cpu_count()} cores")
    results = {mode: run(rows, mode, args) for mode in ("random", "grouped", "packed")}
    for mode, (rate, pad, secs) in results.items():
        label = {"random": "unpacked, random batches", "grouped": "unpacked, length-grouped (rayfine)",
                 "packed": "packed (data.packing: true)"}[mode]
        print(f"  {label:<38}{rate:>9.0f} useful tokens/s   padding {pad:6.1%}   ({secs:.1f}s)")
    print(f"  packing / random batches: {results['packed'][0] / results['random'][0]:.2f}x useful tokens/s; "
          f"packing / length-grouped: {results['packed'][0] / results['grouped'][0]:.2f}x")


if __name__ == "__main__":
    main()
