"""GPU tier: the continuous-batching engine on CUDA (paged KV cache on the device, per-request sampling drawn
on the CPU). Skipped without CUDA."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from core.config import ServeConfig
from serving.generation import Finished, Generator
from serving.model_folder import load_model_spec
from serving.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LOOP = asyncio.new_event_loop()


async def run(g: Generator, ids: list[int], params: SamplingParams) -> str:
    parts = []
    async for event in g.stream(ids, params, time.monotonic() + 60):
        if not isinstance(event, Finished):
            parts.append(event)
    return "".join(parts)


def test_batched_generation_on_cuda_matches_generate_and_keeps_seeds(tiny_llama):
    g = Generator(load_model_spec(tiny_llama), "cuda", ServeConfig(max_input_tokens=64, max_new_tokens=32,
                                                                   gpus_per_replica=1), False)
    try:
        assert g.engine.name == "transformers" and g.plan.max_batch_tokens == 2048
        prompts = [g.encode_prompt(p) for p in ("Once", "hello there my friend", "the quick brown fox jumps")]

        async def together(params):
            return await asyncio.gather(*(run(g, p, params) for p in prompts))

        texts = LOOP.run_until_complete(together(SamplingParams(max_tokens=16, temperature=0)))
        with torch.inference_mode():
            for ids, text in zip(prompts, texts):
                out = g.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False,
                                       pad_token_id=0)[0, len(ids):].tolist()
                ends = [i for i, t in enumerate(out) if t in g.eos_ids]
                assert text == g._decoder.decode(out[:ends[0]] if ends else out, skip_special_tokens=True)
        sampled = SamplingParams(max_tokens=16, temperature=0.9, seed=5)
        batched = LOOP.run_until_complete(together(sampled))
        alone = LOOP.run_until_complete(run(g, prompts[0], sampled))
        assert batched[0] == alone
    finally:
        g.close()
