"""Multi-model serving: what routing by model id costs, how long a model takes to answer first, and what each
extra LoRA model costs in memory.

    .venv/bin/python benchmarks/multiplex.py [--requests 200] [--rounds 3] [--layers 6] [--width 512]

Model: a GPT-2 built from a config (``--layers`` x ``--width``, the MiniLM tokenizer's vocabulary; random
weights: speed and memory do not depend on what the weights learned), and 8 LoRA adapters of it (r=8 on c_attn,
random weights), saved to a temp folder. One local Ray instance, two apps on it, one replica each:

- ``/single``: ``rayfine serve BASE`` (one model folder);
- ``/multi``: ``rayfine serve BASE LORA0..7 FULL`` (the multi-model app: Serve's model multiplexing, adapters on
  one shared base; FULL is a copy of the base folder under another id, loaded as a whole model).

Prints (each the median over ``--rounds``, alternating the apps):
1. p50/p99 latency of /v1/completions (max_tokens 1, greedy, one client: the least model time, so the route's
   own cost shows) for the base model through each app, and the difference (target: under 3 ms added by the
   multiplexed route);
2. time to the first answer of a model not loaded yet: the first LoRA model (its base loads too), a LoRA model
   whose base is loaded (the adapter alone), the whole model FULL;
3. the replica's resident memory holding 1 vs 8 LoRA models, per extra LoRA model as a share of the base model's
   weights (target: under 5%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "the movie was great and the acting felt honest"


def build_models(root: Path, layers: int, width: int, adapters: int) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.serve_fixtures import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=width, n_layer=layers, n_head=8,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    base = root / "base"
    GPT2LMHeadModel(config).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    folders = {"base": base}
    for i in range(adapters):
        torch.manual_seed(i + 1)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(base), LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM", fan_in_fan_out=True,
            init_lora_weights=False))
        out = root / f"lora{i}"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        folders[f"lora{i}"] = out
    full = root / "full"
    shutil.copytree(base, full)
    folders["full"] = full
    return folders


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def complete(client, url: str, model: str, max_tokens: int = 4) -> float:
    start = time.perf_counter()
    response = client.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT,
                                                           "max_tokens": max_tokens, "temperature": 0})
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def replica(client, url: str) -> dict:
    return client.get(f"{url}/v1/replica").json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()

    import httpx

    from cluster.ingress import free_port
    from cluster.ray_start import start_ray
    from core.config import ServeConfig
    from serving.deploy import deploy, shutdown

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="rayfine-multiplex-"))
    folders = build_models(tmp, args.layers, args.width, adapters=8)
    base_bytes = weights_bytes(folders["base"])
    start_ray(None, serve_proxy="haproxy")
    common = dict(port=free_port(), num_replicas=1, cpus_per_replica=1, threads_per_replica=1, max_new_tokens=8,
                  max_models_per_replica=16)
    try:
        single = deploy(folders["base"], ServeConfig(route_prefix="/single", **common), name="single")
        multi = deploy(None, ServeConfig(route_prefix="/multi", **common), name="multi",
                       models={name: path for name, path in folders.items()})
        with httpx.Client(timeout=120) as client:
            # 2. and 3.: first answers and memory, on the fresh multi-model replica
            rss_empty = replica(client, multi)["rss_bytes"]
            first = {"lora0 (base + adapter)": complete(client, multi, "lora0")}
            rss_one = replica(client, multi)["rss_bytes"]
            adapter_loads = [complete(client, multi, f"lora{i}") for i in range(1, 8)]
            first["LoRA adapter, base loaded (median of 7)"] = statistics.median(adapter_loads)
            status = replica(client, multi)
            rss_eight = status["rss_bytes"]
            first["whole model (full)"] = complete(client, multi, "full")
            assert [len(b["models"]) for b in status["base_models_loaded"]] == [8], status

            # 1.: latency of the same model through each app, alternating
            for url in (single, multi):
                for _ in range(10):
                    complete(client, url, "base")
            p50s = {"single": [], "multi": []}
            p99s = {"single": [], "multi": []}
            for _ in range(args.rounds):
                for name, url in (("single", single), ("multi", multi)):
                    model = "base" if name == "multi" else None
                    times = sorted(complete(client, url, model, max_tokens=1) for _ in range(args.requests))
                    p50s[name].append(times[len(times) // 2])
                    p99s[name].append(times[min(len(times) - 1, int(0.99 * len(times)))])
    finally:
        shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"multi-model serving, GPT-2 {args.layers} layers x {args.width} "
          f"({base_bytes / 2**20:.0f} MiB of weights), 8 LoRA adapters r=8; load average before: "
          f"{load_before:.2f}, after: {os.getloadavg()[0]:.2f}")
    p50 = {k: statistics.median(v) for k, v in p50s.items()}
    p99 = {k: statistics.median(v) for k, v in p99s.items()}
    print(f"\n1. /v1/completions, max_tokens 1, 1 client, {args.requests} requests x {args.rounds} rounds (medians; "
          f"p50 per round: single {', '.join(f'{v:.2f}' for v in p50s['single'])}, "
          f"multi {', '.join(f'{v:.2f}' for v in p50s['multi'])})")
    print(f"   rayfine serve BASE            p50 {p50['single']:7.2f} ms   p99 {p99['single']:7.2f} ms")
    print(f"   multi-model app, model=base   p50 {p50['multi']:7.2f} ms   p99 {p99['multi']:7.2f} ms")
    print(f"   added by the multiplexed route: {p50['multi'] - p50['single']:+.2f} ms at p50 "
          f"(ratio {p50['multi'] / p50['single']:.3f}; target < 3 ms)")
    print("\n2. first answer of a model not loaded yet (load + one request)")
    for name, ms in first.items():
        print(f"   {name:<42} {ms / 1000:6.2f} s")
    print("\n3. replica resident memory")
    print(f"   no model {rss_empty / 2**20:7.1f} MiB, 1 LoRA model {rss_one / 2**20:7.1f} MiB, "
          f"8 LoRA models {rss_eight / 2**20:7.1f} MiB")
    per_extra = (rss_eight - rss_one) / 7
    print(f"   each extra LoRA model: {per_extra / 2**20:.2f} MiB = {100 * per_extra / base_bytes:.1f}% of the base "
          f"model's weights (target < 5%)")


if __name__ == "__main__":
    main()
