"""The causal LM generation engines without Ray or HTTP: continuous batching (transformers' manager) and the
sequential engine, behind the same ``Generator.stream``, against plain ``model.generate``."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from core.config import ServeConfig
from core.errors import ConfigError
from serving.engine import PAGE_SIZE, kv_bytes_per_token, plan_engine
from serving.generation import Finished, Generator
from serving.model_folder import load_model_spec
from serving.sampling import SamplingParams

# One event loop for the module, as a replica has one: an engine hands its outputs to the loop its requests
# came from.
LOOP = asyncio.new_event_loop()


def arun(coroutine):
    return LOOP.run_until_complete(coroutine)


PROMPTS = ["Once", "hello there my friend how are", "a b", "the quick brown fox jumps over the lazy dog and"]


@pytest.fixture(scope="module", params=["transformers", "sequential"])
def generator(request, tiny_models):
    g = Generator(load_model_spec(tiny_models["causal_lm"]), "cpu",
                  ServeConfig(max_input_tokens=64, max_new_tokens=32, engine=request.param), False)
    yield g
    g.close()


@pytest.fixture(scope="module")
def llama(tiny_llama):  # a 2-layer Llama: rotary positions, RMSNorm, its task read from config.json
    g = Generator(load_model_spec(tiny_llama), "cpu", ServeConfig(max_input_tokens=64, max_new_tokens=32), False)
    yield g
    g.close()


async def run(g: Generator, ids: list[int], params: SamplingParams, deadline_s: float = 60) -> tuple[str, Finished]:
    parts, finished = [], None
    async for event in g.stream(ids, params, time.monotonic() + deadline_s):
        if isinstance(event, Finished):
            finished = event
        else:
            parts.append(event)
    return "".join(parts), finished


def generate_text(g: Generator, ids: list[int], max_tokens: int) -> str:
    with torch.inference_mode():
        out = g.model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=0)[0, len(ids):].tolist()
    ends = [i for i, token in enumerate(out) if token in g.eos_ids]
    return g._decoder.decode(out[:ends[0]] if ends else out, skip_special_tokens=True)


def assert_greedy_batched_equals_generate(g: Generator) -> None:
    prompts = [g.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)

    async def together():
        return await asyncio.gather(*(run(g, p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts))

    for ids, (text, finished) in zip(prompts, arun(together())):
        assert text == generate_text(g, ids, 24)
        assert finished.reason in ("stop", "length") and finished.completion_tokens <= 24


def test_greedy_batched_equals_generate_for_prompts_of_different_lengths(generator):
    assert_greedy_batched_equals_generate(generator)  # GPT-2, both engines


def test_greedy_batched_equals_generate_for_a_llama(llama):
    assert_greedy_batched_equals_generate(llama)


def test_greedy_tokens_equal_generate_token_for_token(llama):
    """The engine's token ids themselves, batched: not only their text."""
    prompts = [llama.encode_prompt(p) for p in PROMPTS]
    engine = llama.engine

    async def together():
        loop, done = asyncio.get_running_loop(), {}
        finished = {i: loop.create_future() for i in range(len(prompts))}

        def deliver_for(i):
            def deliver(update):
                if update.done:
                    done[i] = update.tokens
                    finished[i].set_result(None)
            return deliver

        for i, ids in enumerate(prompts):
            engine.submit(f"tokens-{i}", ids, SamplingParams(max_tokens=16, temperature=0), deliver_for(i))
        await asyncio.gather(*finished.values())
        return done

    done = arun(together())
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            reference = llama.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                             pad_token_id=0)[0, len(ids):].tolist()
            ends = [k for k, token in enumerate(reference) if token in llama.eos_ids]
            assert done[i] == (reference[:ends[0] + 1] if ends else reference)


def test_a_seed_gives_the_same_text_alone_and_batched(generator):
    ids = generator.encode_prompt("Once upon a time")

    def params(seed):
        return SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=seed)

    async def batched():
        return await asyncio.gather(*(run(generator, ids, params(s)) for s in (1, 2, 1, 3)))

    texts = [text for text, _ in arun(batched())]
    alone = arun(run(generator, ids, params(1)))[0]
    assert texts[0] == texts[2] == alone
    assert len(set(texts)) > 1  # other seeds sample other tokens


def test_a_cancelled_request_leaves_the_others_unchanged_and_its_slot_free(generator):
    prompts = [generator.encode_prompt(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    alone = [arun(run(generator, p, greedy))[0] for p in prompts[1:]]

    async def with_a_quitter():
        async def quitter():
            stream = generator.stream(prompts[0], SamplingParams(max_tokens=30, temperature=0),
                                      time.monotonic() + 60)
            async for _ in stream:
                break  # the client went away after its first delta
            await stream.aclose()

        results = await asyncio.gather(quitter(), *(run(generator, p, greedy) for p in prompts[1:]))
        return [text for text, _ in results[1:]]

    assert arun(with_a_quitter()) == alone
    assert generator.running == 0 and generator.waiting == 0
    if generator.engine.name == "transformers":
        scheduler = generator.engine.manager.batch_processor.scheduler
        deadline = time.monotonic() + 10
        while (scheduler.active_requests or scheduler.waiting_requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not scheduler.active_requests and not scheduler.waiting_requests


def test_a_stop_sequence_that_spans_tokens_cuts_the_text_and_nothing_past_it_is_sent(generator):
    ids = generator.encode_prompt("hello there my friend how are")
    full, _ = arun(run(generator, ids, SamplingParams(max_tokens=24, temperature=0)))
    tokens = generator.tokenizer(full, add_special_tokens=False)["input_ids"]
    pieces = [generator._decoder.decode(tokens[:k], skip_special_tokens=True) for k in range(1, len(tokens) + 1)]
    # A stop string that starts inside one token's text and ends inside the next one's.
    boundary = next(len(p) for p in pieces if 4 <= len(p) <= len(full) - 4)
    stop = full[boundary - 2:boundary + 2]
    deltas: list[str] = []

    async def collect():
        async for event in generator.stream(ids, SamplingParams(max_tokens=24, temperature=0, stop=[stop]),
                                            time.monotonic() + 60):
            deltas.append(event)

    arun(collect())
    *texts, finished = deltas
    assert "".join(texts) == full[:full.index(stop)]
    assert finished.reason == "stop"


def test_max_tokens_ends_with_length_and_the_deadline_with_timeout(generator):
    ids = generator.encode_prompt("the quick brown fox")
    text, finished = arun(run(generator, ids, SamplingParams(max_tokens=3, temperature=0)))
    if finished.reason == "length":
        assert finished.completion_tokens == 3
    _, late = arun(run(generator, ids, SamplingParams(max_tokens=30, temperature=0), deadline_s=0))
    assert late.reason == "timeout"


def test_the_plan_follows_the_serve_keys_and_the_model_shape(tiny_models):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["causal_lm"])  # GPT-2: 2 layers, 2 heads, hidden 32
    per_token = kv_bytes_per_token(config, 4)
    assert per_token == 2 * 2 * 2 * 16 * 4
    cfg = ServeConfig(max_input_tokens=64, max_new_tokens=32, max_ongoing_requests=8)
    plan = plan_engine(cfg, config, context_length=128, dtype_bytes=4, free_bytes=10**12)
    assert plan.engine == "transformers" and plan.max_running == 8
    assert plan.kv_cache_tokens == 8 * 96  # 8 sequences of 64 + 32 tokens, a whole number of pages
    assert plan.kv_cache_tokens % PAGE_SIZE == 0
    small = plan_engine(cfg, config, 128, 4, free_bytes=per_token * 1000)  # 20% of it: 200 tokens, 4 pages
    assert small.kv_cache_tokens == 256
    set_ = plan_engine(cfg.model_copy(update={"kv_cache_tokens": 500, "max_running_sequences": 3}), config, 128, 4,
                       10**12)
    assert (set_.kv_cache_tokens, set_.max_running) == (512, 3)
    assert "continuous batching" in set_.describe() and "3 sequences" in set_.describe()
    assert plan_engine(cfg, config, 128, 4, 10**12, supports_paged=False).engine == "sequential"
    with pytest.raises(ConfigError, match="serve.kv_cache_tokens"):
        plan_engine(cfg.model_copy(update={"kv_cache_tokens": 50}), config, 128, 4, 10**12)
    with pytest.raises(ConfigError, match="serve.engine"):
        plan_engine(cfg.model_copy(update={"engine": "transformers"}), config, 128, 4, 10**12, supports_paged=False)


@pytest.mark.parametrize("engine", ["transformers", "sequential"])
def test_closing_an_engine_lets_its_running_requests_finish(engine, tiny_models):
    """What an unloaded model (Serve evicting it past max_models_per_replica) does to requests still running."""
    g = Generator(load_model_spec(tiny_models["causal_lm"]), "cpu",
                  ServeConfig(max_input_tokens=64, max_new_tokens=32, engine=engine), False)
    ids = g.encode_prompt("the quick brown fox")
    greedy = SamplingParams(max_tokens=30, temperature=0)
    expected = generate_text(g, ids, 30)

    async def close_while_running():
        closing = None
        parts, finished = [], None
        async for event in g.stream(ids, greedy, time.monotonic() + 60):
            if isinstance(event, Finished):
                finished = event
            else:
                parts.append(event)
            if closing is None:  # the first delta: the request is in the engine
                closing = asyncio.get_running_loop().run_in_executor(None, g.close)
        await closing
        return "".join(parts), finished

    text, finished = arun(close_while_running())
    assert text == expected and finished.reason in ("stop", "length")
    assert not g.engine.alive()
