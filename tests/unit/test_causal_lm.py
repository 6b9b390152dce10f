"""Chat rendering, loss masks, packing boundaries and OpenAI-style checks, without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import load_config
from tests.conftest import minilm_dir
from training.tasks.base import ParseError
from training.tasks.causal_lm import IGNORE, CausalLM, ensure_chat_template, pack_rows


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ensure_chat_template(tok)
    return tok


def adapter(**data):
    return CausalLM(load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                                     "data": {"train": "t.jsonl", "max_seq_length": 128, **data}}))


def encode(a, records, tok):
    rows = [a.parse_record(r) for r in records]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return a.tokenize(batch, tok, None)


def trained_text(enc, i, tok):
    ids, labels = enc["input_ids"][i], enc["labels"][i]
    return tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of peru?"},
                     {"role": "assistant", "content": "lima"}, {"role": "user", "content": "and chile?"},
                     {"role": "assistant", "content": "santiago", "weight": 1}]}


def test_loss_covers_assistant_tokens_only(tokenizer):
    enc = encode(adapter(), [CHAT], tokenizer)
    # both assistant turns and their end-of-sequence token; no header, system or user token
    assert trained_text(enc, 0, tokenizer) == "lima [SEP] santiago [SEP]"
    full = tokenizer.decode(enc["input_ids"][0])
    assert "< | user | > capital of peru?" in full and "be brief" in full


def test_weight_zero_turn_is_not_trained(tokenizer):
    record = json.loads(json.dumps(CHAT))
    record["messages"][2]["weight"] = 0
    assert trained_text(encode(adapter(), [record], tokenizer), 0, tokenizer) == "santiago [SEP]"


def test_prompt_completion_and_train_on_prompt(tokenizer):
    rec = {"prompt": "capital of cuba:", "completion": " havana"}
    assert trained_text(encode(adapter(), [rec], tokenizer), 0, tokenizer) == "havana [SEP]"
    everything = encode(adapter(train_on_prompt=True), [rec], tokenizer)
    assert (everything["labels"][0] != IGNORE).all()


def test_default_template_is_the_one_saved_with_the_model(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nhi[SEP]\n<|assistant|>\n"


@pytest.mark.parametrize("record,message", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, "messages[0] has no 'role'"),
    ({"messages": [{"role": "user"}]}, "messages[0] has no 'content'"),
    ({"messages": [{"role": "user", "content": "x", "mood": 1}]}, "messages[0] has unknown key(s) mood"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role 'robot' is not one of"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
     "messages[1].content is empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "messages[1].weight must be 0 or 1"),
    ({"messages": [{"role": "assistant", "content": "y"}], "extra": 1}, "unknown key(s) extra"),
    ({"prompt": "x"}, "'completion' is missing or empty"),
    ({"body": "x"}, "expected 'messages' (chat), 'prompt' + 'completion', or 'text'"),
])
def test_openai_style_checks(record, message):
    with pytest.raises(ParseError) as err:
        adapter().parse_record(record)
    assert message in str(err.value)


def test_packed_batch_gives_the_same_per_example_loss(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    records = [{"text": "the capital of " + c + " is " + c[::-1]} for c in ("peru", "norway", "japan", "kenya")]
    enc = encode(adapter(), records, tokenizer)

    def nll(input_ids, labels, **extra):
        logits = model(input_ids=torch.as_tensor(input_ids)[None], **extra).logits[0, :-1]
        target = torch.as_tensor(labels)[1:]
        return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")

    torch.set_grad_enabled(False)
    separate = sum(float(nll(i, l)) for i, l in zip(enc["input_ids"], enc["labels"]))
    rows = {"input_ids": enc["input_ids"], "labels": enc["labels"]}
    packed = pack_rows(rows, max_len=64, pad_id=tokenizer.pad_token_id)
    assert len(packed) < len(records)  # several examples share a sequence
    together = 0.0
    for seq in packed:
        together += float(nll(seq["input_ids"], seq["labels"],
                              attention_mask=torch.as_tensor(seq["attention_mask"])[None],
                              position_ids=torch.as_tensor(seq["position_ids"])[None]))
    # the first token of each example is never a target, packed or not
    assert together == pytest.approx(separate, rel=1e-4)
    assert sum(int(seq["length"]) for seq in packed) == sum(len(x) for x in enc["input_ids"])


def test_a_record_truncation_leaves_no_target_is_skipped_and_counted(tokenizer):
    """A prompt longer than max_seq_length leaves its answer no token: 0/0 loss; the record is left out of
    training rows, and the pre-flight counts and names it."""
    from training.preflight import DataSummary, _format_rows_and_checks

    a = adapter(max_seq_length=16)
    records = [{"prompt": "short question?", "completion": " yes"},
               {"prompt": " ".join(["word"] * 40), "completion": " cut off"},
               {"prompt": "another one?", "completion": " no"}]
    enc = encode(a, records, tokenizer)
    assert len(enc["input_ids"]) == 2 and all((l != IGNORE).any() for l in enc["labels"])
    rows = [a.parse_record(r) for r in records]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    stats = a.record_stats(batch, tokenizer)
    assert stats["rows"].tolist() == [1, 0, 1] and stats["no_target_after_truncation"].tolist() == [0, 1, 0]
    summary = DataSummary(counts={"train": 3}, stats={"train": {"rows": 2, "no_target_after_truncation": 1}},
                          where={"train": {"no_target_after_truncation": ["chat.jsonl:2"]}})
    report = "\n".join(_format_rows_and_checks(summary))
    assert "no target after truncation" in report and "chat.jsonl:2" in report
    assert summary.rows("train") == 2
