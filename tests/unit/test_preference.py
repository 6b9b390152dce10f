"""DPO without Ray: OpenAI's preference-record checks, the loss masks, the step-0 invariant, and parity with
TRL's DPOTrainer on a fixed batch."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from core.config import load_config
from core.errors import ConfigError
from tests.conftest import minilm_dir, preference_rows
from training.tasks import get_adapter
from training.tasks.base import ParseError
from training.tasks.causal_lm import IGNORE, ensure_chat_template
from training.tasks.preference import Preference, dpo_loss, sequence_logps

GOOD = {"input": {"messages": [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "capital of france?"},
                               {"role": "assistant", "content": "which france?"},
                               {"role": "user", "content": "the country"}]},
        "preferred_output": [{"role": "assistant", "content": "paris"}],
        "non_preferred_output": [{"role": "assistant", "content": "rome is the capital"}]}


def dpo_cfg(**training):
    return load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                            "data": {"train": "t.jsonl", "max_seq_length": 128},
                            "training": {"method": "dpo", **training}})


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def encode(adapter, records, tok, truncate=True):
    rows = [adapter.parse_record(r) for r in records]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return adapter.tokenize(batch, tok, None, truncate=truncate)


def with_change(path: str, value):
    record = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    target = record
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return record


@pytest.mark.parametrize("record, expected", [
    (with_change("preferred_output", KeyError), "missing 'preferred_output'"),
    (with_change("extra", 1), "unknown key(s) extra"),
    (with_change("input", "hello"), "'input' must be an object"),
    (with_change("input.metadata", {}), "input has unknown key(s) metadata"),
    (with_change("input.messages", []), "input.messages must be a non-empty list"),
    (with_change("input.messages.3.role", "assistant"), "input.messages must end with a user message"),
    (with_change("input.messages.1.content", "  "), "input.messages[1].content is empty"),
    (with_change("input.messages.1.role", "robot"), "input.messages[1].role 'robot' is not one of"),
    (with_change("preferred_output", []), "preferred_output must be a list of exactly one assistant message"),
    (with_change("non_preferred_output", [{"role": "assistant", "content": "a"}] * 2),
     "non_preferred_output must be a list of exactly one assistant message (got a list of 2)"),
    (with_change("preferred_output", {"role": "assistant", "content": "a"}), "(got dict)"),
    (with_change("preferred_output.0.role", "user"), "preferred_output[0].role must be 'assistant'"),
    (with_change("preferred_output.0.content", ""), "preferred_output[0].content is empty"),
    (with_change("preferred_output.0.weight", 1), "preferred_output[0] has unknown key(s) weight"),
    (with_change("non_preferred_output.0.content", "paris"), "preferred_output and non_preferred_output are identical"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "training.method dpo reads preference records"),
])
def test_openai_preference_checks_name_the_field(record, expected):
    with pytest.raises(ParseError) as err:
        Preference(dpo_cfg()).parse_record(record)
    assert expected in str(err.value)


def test_only_each_output_carries_the_loss(tokenizer):
    adapter = get_adapter(dpo_cfg())
    assert isinstance(adapter, Preference)
    enc = encode(adapter, [GOOD], tokenizer)
    for side, text in (("chosen", "paris"), ("rejected", "rome is the capital")):
        ids, labels = enc[f"{side}_input_ids"][0], enc[f"{side}_labels"][0]
        target = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
        assert target == f"{text} {tokenizer.eos_token}"  # not the earlier assistant turn of the input
        assert "which france" in tokenizer.decode(ids)
    assert enc["length"][0] == max(len(enc["chosen_input_ids"][0]), len(enc["rejected_input_ids"][0]))
    same = encode(adapter, [GOOD], tokenizer)["pair_id"][0]
    other = encode(adapter, [with_change("preferred_output.0.content", "Paris")], tokenizer)["pair_id"][0]
    assert enc["pair_id"][0] == same != other
    collated = adapter.collate(enc, tokenizer.pad_token_id)
    assert collated["input_ids"].shape[0] == 2 and "ref_logps" not in collated


def test_a_pair_cut_to_nothing_by_truncation_is_counted_and_left_out(tokenizer):
    adapter = Preference(load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                                          "data": {"train": "t.jsonl", "max_seq_length": 32},
                                          "training": {"method": "dpo"}}))
    long_prompt = with_change("input.messages.3.content", "tell me " * 20)
    rows = [adapter.parse_record(r) for r in (preference_rows(1)[0], long_prompt)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    assert adapter.record_stats(batch, tokenizer)["no_target_after_truncation"].tolist() == [0, 1]
    assert len(adapter.tokenize(batch, tokenizer, None)["pair_id"]) == 1
    untruncated = adapter.tokenize(batch, tokenizer, None, truncate=False)
    assert untruncated["length"][1] > 32  # pre-flight sees the full length


def test_at_step_zero_the_loss_is_log_2_and_every_reward_0(tokenizer, tiny_lm):
    adapter = Preference(dpo_cfg(beta=0.3))
    enc = encode(adapter, preference_rows(6, seed=0), tokenizer)
    inputs = {k: torch.as_tensor(v) for k, v in adapter.collate(enc, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        reference = adapter.logps(tiny_lm, inputs)
        out = adapter.forward(tiny_lm, {**inputs, "ref_logps": reference})
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.chosen_rewards.abs().max().item() == 0 and out.rejected_rewards.abs().max().item() == 0
    metrics = adapter.compute_metrics(adapter.eval_outputs(enc, inputs, out), None)
    assert metrics["reward_accuracy"] == 0.0 and metrics["num_pairs"] == 6


def test_lora_reference_is_the_base_with_the_adapter_disabled(tokenizer, tiny_lm):
    from peft import LoraConfig, get_peft_model

    cfg = load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m", "lora": {"enabled": True}},
                           "data": {"train": "t.jsonl"}, "training": {"method": "dpo"}})
    adapter = Preference(cfg)
    assert not adapter.reference_pass  # no reference scores computed before training
    model = get_peft_model(copy.deepcopy(tiny_lm), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enc = encode(adapter, preference_rows(4, seed=1), tokenizer)
    inputs = {k: torch.as_tensor(v) for k, v in adapter.collate(enc, tokenizer.pad_token_id).items()}
    with torch.no_grad():
        assert adapter.forward(model, inputs).loss.item() == pytest.approx(math.log(2), abs=1e-6)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
        moved = adapter.forward(model, inputs)
        base = adapter.logps(tiny_lm, inputs)
        policy = adapter.logps(model, inputs)
    chosen, rejected = (policy - base).chunk(2)
    assert torch.allclose(moved.chosen_rewards, cfg.training.beta * chosen, atol=1e-5)
    assert torch.allclose(moved.rejected_rewards, cfg.training.beta * rejected, atol=1e-5)


def test_loss_and_rewards_match_trl_dpo_trainer(tmp_path, tokenizer, tiny_lm):
    """TRL's sigmoid loss on its own collated batch (prompt and completion tokenized its way), policy and
    reference two different models: the same loss, rewards and accuracy to 1e-5."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(1)
    reference = LlamaForCausalLM(tiny_lm.config).eval()
    rows = preference_rows(6, seed=3)
    data = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                               "rejected": r["non_preferred_output"]} for r in rows])
    trainer = DPOTrainer(model=tiny_lm, ref_model=reference, processing_class=tokenizer, train_dataset=data,
                         args=DPOConfig(output_dir=str(tmp_path), beta=0.25, report_to=[], use_cpu=True,
                                        max_length=64, per_device_train_batch_size=6))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    trl = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    with torch.no_grad():
        policy = sequence_logps(tiny_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                labels)
        ref = sequence_logps(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                             labels)
    losses, chosen, rejected = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta=0.25)
    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-5)
    assert float(chosen.mean()) == pytest.approx(trl["rewards/chosen"], abs=1e-5)
    assert float(rejected.mean()) == pytest.approx(trl["rewards/rejected"], abs=1e-5)
    assert float((chosen - rejected).mean()) == pytest.approx(trl["rewards/margins"], abs=1e-5)
    assert float((chosen > rejected).float().mean()) == pytest.approx(trl["rewards/accuracies"], abs=1e-6)
    assert abs(trl_loss - math.log(2)) > 1e-3  # two different models: a real comparison, not the step-0 value


def test_dpo_config_rules():
    with pytest.raises(ConfigError) as err:
        load_config(raw={"task": "sequence_classification", "model": {"name_or_path": "m"},
                         "data": {"train": "t.jsonl"}, "training": {"method": "dpo"}})
    assert "training.method: dpo tunes a causal LM" in err.value.render()
    with pytest.raises(ConfigError) as err:
        load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                         "data": {"train": "t.jsonl", "packing": True}, "training": {"method": "dpo", "beta": 0}})
    text = err.value.render()
    assert "training.beta" in text
    with pytest.raises(ConfigError) as err:
        load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                         "data": {"train": "t.jsonl", "packing": True}, "training": {"method": "dpo"}})
    assert "data.packing: not used with training.method dpo" in err.value.render()
    assert json.loads(json.dumps(dpo_cfg().training.beta)) == 0.1  # the default
