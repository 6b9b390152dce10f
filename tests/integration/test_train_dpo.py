"""DPO on a tiny Llama: 2 workers, ZeRO-2 with the reference scored before training (a failed run, then the same
command again, which resumes it), and ZeRO-3 + LoRA with the adapter disabled as the reference."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from core.config import load_config
from core.errors import UserError
from tests.conftest import preference_rows, write_jsonl
from tests.integration.helpers import read_metrics
from training.driver import train

pytestmark = pytest.mark.integration


def dpo_config(tmp_path, model_dir, **sections):
    train_file = write_jsonl(tmp_path / "data" / "pref_train.jsonl", preference_rows(128, seed=1))
    # 40 pairs: 3 evaluation batches of 16, so one rank runs a pass that is not kept (ZeRO collectives stay
    # matched) in the reference scoring and in every evaluation
    val_file = write_jsonl(tmp_path / "data" / "pref_val.jsonl", preference_rows(40, seed=2))
    raw = {"task": "causal_lm", "model": {"name_or_path": str(model_dir)},
           "data": {"train": str(train_file), "validation": str(val_file), "max_seq_length": 64},
           "training": {"method": "dpo", "beta": 0.5, "epochs": 3, "learning_rate": 5e-3, "batch_size": 8,
                        "warmup_ratio": 0.0, "log_every_steps": 1, "eval_every_steps": 4},
           "deepspeed": {"stage": 2}, "scaling": {"num_workers": 2, "use_gpu": False},
           "output": {"dir": str(tmp_path / "runs"), "name": "dpo"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return load_config(raw=raw)


def output_logp(model, tokenizer, messages: list[dict], output: dict) -> float:
    """log p(output | prompt) under ``model``, from the chat template alone (not rayfine's tokenization)."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [output], tokenize=False)
    assert full.startswith(prompt)
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(start - 1, len(targets)), targets[start - 1:]].sum())


def test_dpo_full_zero2_learns_the_preference_and_resumes(tmp_path, tiny_llama, ray_local, monkeypatch, caplog):
    # The first run fails at step 18 (no retry): its run folder keeps the step-16 checkpoint and no model. Running
    # the same command again resumes from that checkpoint, with the reference scores stored in it.
    failing = dpo_config(tmp_path, tiny_llama, training={"checkpoint_every_steps": 16, "inject_failure_at_step": 18})
    with pytest.raises(UserError, match="injected failure at step 18"):
        train(failing)
    run_dir = tmp_path / "runs" / "dpo"
    assert not (run_dir / "model").exists() and not (run_dir / "eval.json").exists()
    assert list((run_dir / "checkpoints").glob("checkpoint_*"))

    cfg = dpo_config(tmp_path, tiny_llama, training={"checkpoint_every_steps": 16})
    monkeypatch.setenv("RAYFINE_TIMINGS", "1")  # the second run also reports its start-up phases
    with caplog.at_level(logging.INFO, logger="training.driver"):
        result = train(cfg)
    assert result.run_dir == run_dir
    table = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Start-up (RAYFINE_TIMINGS=1)"))
    phases = [line[:57].strip() for line in table.splitlines()[2:]]
    assert phases == ["pre-flight data pass", "run folder", "datasets: tokenize, hold or materialize small splits",
                      "Train controller, worker group, torch process group", "model load + DeepSpeed engine",
                      "first batch of data", "first optimizer step"], table
    assert all(float(line[57:64]) >= 0 for line in table.splitlines()[2:]), table
    records = read_metrics(result.run_dir)
    first_run = [m["step"] for m in records if "loss" in m and m["resumed_from_step"] == 0]
    rerun = [m["step"] for m in records if "loss" in m and m["resumed_from_step"] == 16]
    assert first_run[:16] == list(range(1, 17)) and first_run[-1] < 18, first_run
    assert rerun == list(range(17, 17 + len(rerun))) and rerun[-1] == 3 * 128 // 8 // 2, rerun
    steps = [m for m in records if "loss" in m]
    first = steps[0]
    # Step 0: the policy is the reference, so every reward is 0 and the loss is log 2.
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin"):
        assert first[key] == pytest.approx(0.0, abs=1e-4)
    # The rerun resumed from step 16 with the stored reference scores: had it scored the reference again with
    # the trained model, the loss would be back at log 2.
    resumed = [m for m in steps if m["resumed_from_step"] == 16]
    assert resumed and all(m["loss"] < 0.6 for m in resumed), resumed
    evals = [m for m in records if "eval_reward_accuracy" in m]
    assert evals[0]["eval_reward_accuracy"] <= 0.7 and evals[-1]["eval_reward_accuracy"] >= 0.9, evals
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.3
    validation = json.loads((result.run_dir / "eval.json").read_text())["validation"]
    assert validation["num_pairs"] == 40 and validation["reward_accuracy"] >= 0.9
    assert validation["reward_margin"] == pytest.approx(
        validation["rewards_chosen"] - validation["rewards_rejected"], abs=1e-6)
    assert (result.run_dir / "plots" / "rewards.png").is_file()

    # The exported model gives the preferred output the higher log-probability on most held-out pairs.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    pairs = preference_rows(40, seed=2)
    wins = sum(output_logp(model, tokenizer, p["input"]["messages"], p["preferred_output"][0])
               > output_logp(model, tokenizer, p["input"]["messages"], p["non_preferred_output"][0]) for p in pairs)
    assert wins >= 0.8 * len(pairs)

    # `rayfine evaluate` scores against the initial model as training did: the same numbers.
    from training.evaluate import evaluate_model

    offline = evaluate_model(cfg, result.model_dir)
    assert offline["reward_accuracy"] == pytest.approx(validation["reward_accuracy"])
    assert offline["loss"] == pytest.approx(validation["loss"], abs=1e-3)
    samples = [json.loads(x) for x in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["messages"][-1]["role"] == "user"


def test_dpo_lora_zero3_uses_the_base_as_reference(tmp_path, tiny_llama, ray_local):
    cfg = dpo_config(tmp_path, tiny_llama, deepspeed={"stage": 3},
                     model={"lora": {"enabled": True, "r": 8, "alpha": 16,
                                     "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
                     training={"max_steps": 6, "learning_rate": 2e-2, "eval_every_steps": 0})
    result = train(cfg)
    steps = [m for m in read_metrics(result.run_dir) if "loss" in m]
    # A fresh adapter changes nothing (B = 0): with it disabled, the reference equals the policy at step 0.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Then the adapter moves the policy away from the base: the rewards are no longer 0.
    assert steps[-1]["step"] == 6
    assert abs(steps[-1]["rewards_chosen"]) > 1e-3 and abs(steps[-1]["rewards_rejected"]) > 1e-3, steps
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert "reward_accuracy" in json.loads((result.run_dir / "eval.json").read_text())["validation"]
