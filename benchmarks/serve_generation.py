"""Causal LM generation through Ray Serve at rising concurrency, against the same model's ``generate`` at batch 1.

    .venv/bin/python benchmarks/serve_generation.py [--rounds 3] [--concurrency 1 4 16 64] [--max-tokens 64]
        [--engine auto] [--proxy haproxy]

Model: a Llama of about 34M parameters (6 layers, hidden 384, the MiniLM tokenizer's 30,522 tokens) built from a
config with random weights (speed does not depend on them), saved as a model folder. Serve: that folder deployed
the way ``rayfine serve`` deploys it (one replica, its default threads), ``serve.engine`` as given. Each
concurrency level runs that many clients in a closed loop (each sends its next request when the previous one
ended), ``--requests-per-client`` streaming greedy chat requests each with prompts of 5 to 40 words, and reads
``usage`` for the tokens generated. Direct: ``model.generate`` of the same prompts one at a time (greedy, the same
number of new tokens), in this process with the replica's thread count, measured while Ray idles.

Prints generated tokens/s, p50/p99 time to first token and inter-token latency (gaps between streamed chunks),
each the median over rounds, then the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
DIRECT = "direct generate, batch 1"


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.serve_fixtures import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    # No EOS token: random weights would end some requests early and make the token counts differ.
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"task": "causal_lm", "base_model": "llama-34m-random", "max_seq_length": 1024, "labels": None,
            "model_id": "bench-lm"}
    (out / "rayfine.json").write_text(json.dumps(info))
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    return out


def bench_direct(model_dir: Path, texts: list[str], max_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.model_folder import DEFAULT_CHAT_TEMPLATE

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            chat = tok.apply_chat_template([{"role": "user", "content": text}], chat_template=DEFAULT_CHAT_TEMPLATE,
                                           tokenize=False, add_generation_prompt=True)
            ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids.shape[1]
    return {"tokens_per_s": tokens / (time.perf_counter() - start)}


async def _client(client, url: str, texts: list[str], max_tokens: int, stats: dict) -> None:
    for text in texts:
        body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        last = None
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    stats["tokens"] += chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - sent)
                    else:
                        stats["itl"].append(now - last)
                    last = now


async def bench_http(url: str, texts: list[str], concurrency: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        warm = {"tokens": 0, "ttft": [], "itl": []}
        await asyncio.gather(*(_client(client, url, texts[i:i + 1], 8, warm) for i in range(min(concurrency, 4))))
        stats = {"tokens": 0, "ttft": [], "itl": []}
        start = time.perf_counter()
        await asyncio.gather(*(_client(client, url, texts[i * per_client:(i + 1) * per_client], max_tokens, stats)
                               for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": stats["tokens"] / elapsed,
            "ttft_p50_ms": percentile(stats["ttft"], 0.5) * 1000, "ttft_p99_ms": percentile(stats["ttft"], 0.99) * 1000,
            "itl_p50_ms": percentile(stats["itl"], 0.5) * 1000, "itl_p99_ms": percentile(stats["itl"], 0.99) * 1000}


def main() -> int:
    args = parse_args()
    import ray
    from ray import serve

    from cluster.ray_start import start_ray
    from core.config import ServeConfig
    from serving.app import replica_threads
    from serving.deploy import deploy

    texts = prompts(max(args.concurrency) * args.requests_per_client)
    load_before = os.getloadavg()[0]
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "bench-lm")
        cfg = ServeConfig(engine=args.engine, proxy=args.proxy, max_new_tokens=args.max_tokens,
                          max_ongoing_requests=max(args.concurrency), max_queued_requests=-1)
        print(start_ray(None, serve_proxy=args.proxy), flush=True)
        try:
            url = deploy(model_dir, cfg, name="bench-lm") + "/v1/chat/completions"
            threads = replica_threads(cfg)
            for round_ in range(args.rounds):
                runs.setdefault((DIRECT, 1), []).append(
                    bench_direct(model_dir, texts[:args.requests_per_client], args.max_tokens, threads))
                for c in args.concurrency:
                    result = asyncio.run(bench_http(url, texts, c, args.requests_per_client, args.max_tokens))
                    runs.setdefault((f"serve ({args.engine})", c), []).append(result)
                    print(f"round {round_ + 1}, concurrency {c}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    rows = {key: {k: statistics.median(r[k] for r in results) for k in results[0]} for key, results in runs.items()}
    print(f"\n{args.rounds} round(s), {args.requests_per_client} requests per client, {args.max_tokens} new tokens "
          f"each; 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"({os.cpu_count()} cores)")
    print_table(rows)
    print_targets(rows, f"serve ({args.engine})")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="the table shows each metric's median over rounds")
    parser.add_argument("--engine", choices=["auto", "transformers", "sequential"], default="auto")
    parser.add_argument("--proxy", choices=["haproxy", "python"], default="haproxy")
    return parser.parse_args()


def print_table(rows: dict[tuple[str, int], dict]) -> None:
    print(f"\n{'configuration':<26}{'conc':>5}{'tokens/s':>10}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}  (ms)")
    for (label, c), r in sorted(rows.items(), key=lambda kv: (kv[0][0] != DIRECT, kv[0][1])):
        if label == DIRECT:
            print(f"{label:<26}{c:>5}{r['tokens_per_s']:>10.1f}")
        else:
            print(f"{label:<26}{c:>5}{r['tokens_per_s']:>10.1f}{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>8.0f}"
                  f"{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}")
    print()


def print_targets(rows: dict[tuple[str, int], dict], label: str) -> None:
    direct, one = rows[(DIRECT, 1)], rows.get((label, 1))
    if one is None:
        return
    print(f"tokens/s at concurrency 1 / direct generate: {one['tokens_per_s'] / direct['tokens_per_s']:.2f}x "
          "(target >= 0.9x)")
    for c in sorted(c for name, c in rows if name == label and c > 1):
        r = rows[(label, c)]
        print(f"concurrency {c}: tokens/s {r['tokens_per_s'] / one['tokens_per_s']:.2f}x concurrency 1"
              + (" (target >= 4x on CPU, 8x on a GPU)" if c == 16 else "")
              + f"; p50 TTFT {r['ttft_p50_ms'] / one['ttft_p50_ms']:.2f}x concurrency 1"
              + (" (target < 4x)" if c == 16 else ""))


if __name__ == "__main__":
    sys.exit(main())
