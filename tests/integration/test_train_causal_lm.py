"""Tiny Llama SFT on chat data: 2 workers, ZeRO-2 (full, packed, with a worker failure) and ZeRO-3 + LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import load_config
from tests.conftest import chat_rows, write_jsonl
from tests.integration.helpers import read_metrics, served
from training.driver import train

pytestmark = pytest.mark.integration


def chat_config(tmp_path, model_dir, **sections):
    train_file = write_jsonl(tmp_path / "data" / "chat_train.jsonl", chat_rows(128, seed=1))
    val_file = write_jsonl(tmp_path / "data" / "chat_val.jsonl", chat_rows(16, seed=2))
    raw = {"task": "causal_lm", "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(train_file), "validation": str(val_file), "max_seq_length": 64},
           "training": {"epochs": 2, "learning_rate": 5e-3, "batch_size": 4, "warmup_ratio": 0.0,
                        "log_every_steps": 2},
           "deepspeed": {"stage": 2}, "scaling": {"num_workers": 2, "use_gpu": False},
           "output": {"dir": str(tmp_path / "runs"), "name": "sft"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw=raw)


def losses_fall(run_dir, by: float):
    losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
    assert np.mean(losses[-2:]) < losses[0] - by, losses
    evaluation = json.loads((run_dir / "eval.json").read_text())["validation"]
    assert evaluation["perplexity"] == pytest.approx(np.exp(evaluation["loss"]), rel=1e-6)
    return evaluation


def test_full_sft_packed_zero2_survives_a_worker_failure(tmp_path, tiny_llama, ray_local):
    cfg = chat_config(tmp_path, tiny_llama, data={"packing": True},
                      training={"checkpoint_every_steps": 4, "inject_failure_at_step": 6},
                      scaling={"max_failures": 1})
    result = train(cfg)
    records = read_metrics(result.run_dir)
    # failed at step 6: the worker group restarted from the step-4 checkpoint and finished
    assert {m.get("resumed_from_step") for m in records if "loss" in m} == {0, 4}
    assert [m for m in records if "loss" in m and m["resumed_from_step"] == 4][0]["step"] in (5, 6)
    losses_fall(result.run_dir, by=3.0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    tok = AutoTokenizer.from_pretrained(result.model_dir)
    assert tok.chat_template and "<|assistant|>" in tok.chat_template  # saved for serving
    prompt = tok.apply_chat_template([{"role": "user", "content": "what is the capital of peru?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    samples = [json.loads(x) for x in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all("generated" in s and s["messages"] for s in samples)
    # What is served is what was evaluated: greedy answers of the deployment equal the run's samples.
    import httpx

    with served(result.model_dir, "parity-lm", max_new_tokens=32) as url:
        for sample in samples:
            response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": sample["messages"], "temperature": 0, "max_tokens": 32})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == sample["generated"]


def test_lora_zero3_exports_adapter_and_merged_model(tmp_path, tiny_llama, ray_local):
    cfg = chat_config(tmp_path, tiny_llama, deepspeed={"stage": 3},
                      model={"lora": {"enabled": True, "r": 8, "alpha": 16, "merge": True,
                                      "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
                      training={"learning_rate": 1e-2})
    result = train(cfg)
    losses_fall(result.run_dir, by=0.5)  # only rank-8 adapters on a random base: slower than full SFT
    adapter = result.run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(adapter).merge_and_unload()
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_merged, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.allclose(q_merged, with_adapter.model.layers[0].self_attn.q_proj.weight, atol=1e-5)
    # frozen weights outside the adapted modules did not move
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    ids = torch.tensor([[101, 2054, 2003]])
    assert merged.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > 3
