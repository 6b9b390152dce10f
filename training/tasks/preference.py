"""Preference tuning of a causal LM with DPO (``training.method: dpo``), on OpenAI's preference records.

One record is a prompt and two answers, the preferred one and the other::

    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Each output is rendered after the prompt with the chat template, as supervised chat data is, and only its tokens
count: the log-probability of an output is the sum over its tokens. The loss is DPO's sigmoid loss
(Rafailov et al., 2023), ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` with ``p`` the policy's and ``r`` the
reference model's log-probabilities of the chosen (``c``) and rejected (``r``) outputs; ``beta * (p - r)`` is an
output's implicit reward. The two outputs of a pair run in the same forward pass.

The reference model is the model before training. With LoRA it is the base with the adapter disabled; without
it, the train loop computes the reference log-probabilities once, before the first step, with the frozen initial
model (``reference_columns``), so no second model is ever held during training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.tasks.base import LabelSpace, ParseError
from training.tasks.causal_lm import IGNORE, CausalLM, check_message, ensure_chat_template

RECORD_KEYS = ("input", "preferred_output", "non_preferred_output")
INPUT_KEYS = {"messages", "tools", "parallel_tool_calls"}
INPUT_MESSAGE_KEYS = ("role", "content", "name")  # a chat message's keys but weight (nothing is trained there)
OUTPUT_KEYS = ("role", "content")
REFERENCE = ("ref_chosen_logps", "ref_rejected_logps")  # columns the train loop adds without LoRA
PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def check_preference(record: dict[str, Any]) -> tuple[list[dict], dict, dict]:
    """OpenAI's checks for a preference example: (prompt messages, preferred, non-preferred) or ParseError."""
    unknown = sorted(set(record) - set(RECORD_KEYS))
    if unknown:
        raise ParseError(f"unknown key(s) {', '.join(unknown)}; a preference example has only "
                         "input, preferred_output and non_preferred_output")
    for key in RECORD_KEYS:
        if key not in record:
            raise ParseError(f"missing '{key}'; a preference example has input, preferred_output and "
                             "non_preferred_output")
    given = record["input"]
    if not isinstance(given, dict):
        raise ParseError("'input' must be an object with 'messages'")
    extra = sorted(set(given) - INPUT_KEYS)
    if extra:
        raise ParseError(f"input has unknown key(s) {', '.join(extra)}; allowed: messages, tools, "
                         "parallel_tool_calls")
    messages = given.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParseError("input.messages must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        check_message(msg, f"input.messages[{i}]", INPUT_MESSAGE_KEYS)
    if messages[-1]["role"] != "user":
        raise ParseError(f"input.messages must end with a user message (the last is {messages[-1]['role']!r}): "
                         "both outputs answer it")
    outputs = [_one_output(record[key], key) for key in RECORD_KEYS[1:]]
    if outputs[0]["content"] == outputs[1]["content"]:
        raise ParseError("preferred_output and non_preferred_output are identical: a pair teaches a preference "
                         "only when its outputs differ")
    return messages, outputs[0], outputs[1]


def _one_output(value: Any, key: str) -> dict:
    if not isinstance(value, list) or len(value) != 1:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise ParseError(f"{key} must be a list of exactly one assistant message (got {got})")
    check_message(value[0], f"{key}[0]", OUTPUT_KEYS)
    if value[0]["role"] != "assistant":
        raise ParseError(f"{key}[0].role must be 'assistant' (got {value[0]['role']!r})")
    return value[0]


def pair_id(payload: str) -> int:
    """A stable id of a pair (its normalized content), under which its reference log-probabilities are kept."""
    return int.from_bytes(hashlib.blake2b(payload.encode(), digest_size=8).digest(), "little", signed=True)


# ---- the loss ------------------------------------------------------------------------------------
def sequence_logps(logits, labels):
    """Summed log-probability of each row's target tokens (``labels`` != -100; targets shift by one)."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float):
    """DPO's sigmoid loss per pair, and each output's implicit reward ``beta * (policy - reference)``."""
    import torch.nn.functional as F

    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass
class PairOutput:
    """What ``Preference.forward`` returns: the mean loss (for backward) and per-pair values."""

    loss: Any
    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Mean rewards, margin, and the share of pairs whose chosen output has the higher reward."""
    if not len(chosen):
        return {}
    return {"rewards_chosen": float(chosen.mean()), "rewards_rejected": float(rejected.mean()),
            "reward_margin": float((chosen - rejected).mean()), "reward_accuracy": float((chosen > rejected).mean())}


class Preference(CausalLM):
    """The causal-LM task trained on preference pairs: records, tokens and loss of DPO."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = cfg.training.beta
        self.reference_pass = not cfg.model.lora.enabled  # the loop computes the reference log-probabilities

    def report_lines(self, summary) -> list[str]:
        stats = summary.length_stats("train", self.data.max_seq_length)
        if not stats:
            return []
        return [f"  preference pairs: the longer output with its prompt is {stats['p50']:.0f} tokens at the median "
                f"(the table above); {stats['truncated']:,} pair(s) cut at data.max_seq_length; tokens per epoch "
                f"count both outputs, each with the prompt",
                f"  beta {self.beta}; reference model: "
                + ("the base with the LoRA adapter disabled" if not self.reference_pass else
                   "the initial model, its log-probabilities computed once before the first step")]

    # ---- records -------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        if not any(key in record for key in RECORD_KEYS):
            cols = ", ".join(sorted(record)) or "none"
            raise ParseError("training.method dpo reads preference records: input, preferred_output and "
                             f"non_preferred_output (OpenAI's format); columns are {cols}")
        messages, chosen, rejected = check_preference(record)
        return {"kind": "preference", "payload": json.dumps([messages, chosen, rejected])}

    # ---- tokens --------------------------------------------------------------------------------
    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        """Both outputs of each pair, after the prompt: ids and targets (the output's tokens only). Truncated,
        a pair that lost every token of one output is left out (``record_stats`` counts it)."""
        out = self._encode_pairs(batch, tokenizer, truncate)
        if truncate and (out["trained_tokens"] == 0).any():
            keep = np.flatnonzero(out["trained_tokens"] > 0)
            out = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in out.items()}
        return out

    def record_stats(self, batch: dict[str, np.ndarray], tokenizer) -> dict[str, np.ndarray]:
        """Per pair: a training row unless truncation left an output no token, and its tokens (both outputs
        with the prompt, after truncation: what a step runs through the model)."""
        enc = self._encode_pairs(batch, tokenizer, truncate=True)
        empty = enc["trained_tokens"] == 0
        tokens = [len(a) + len(b) for a, b in zip(enc["chosen_input_ids"], enc["rejected_input_ids"])]
        return {"rows": (~empty).astype(np.int64), "no_target_after_truncation": empty.astype(np.int64),
                "tokens": np.where(empty, 0, tokens).astype(np.int64)}

    @staticmethod
    def empty_tokens() -> dict[str, Any]:
        return {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                "length": np.zeros(0, np.int32), "trained_tokens": np.zeros(0, np.int32),
                "pair_id": np.zeros(0, np.int64)}

    def _encode_pairs(self, batch: dict[str, np.ndarray], tokenizer, truncate: bool) -> dict[str, Any]:
        ensure_chat_template(tokenizer)
        sides = {"chosen": [], "rejected": []}
        for payload in batch["payload"]:
            messages, chosen, rejected = json.loads(payload)
            context = [m | {"weight": 0} if m["role"] == "assistant" else m for m in messages]
            sides["chosen"].append(json.dumps(context + [chosen]))
            sides["rejected"].append(json.dumps(context + [rejected]))
        out: dict[str, Any] = {}
        for side, payloads in sides.items():
            enc = self._encode({"kind": ["chat"] * len(payloads), "payload": payloads}, tokenizer, truncate)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = enc["input_ids"], enc["labels"]
            out[f"{side}_tokens"] = enc["trained_tokens"]
        both = (out.pop("chosen_tokens"), out.pop("rejected_tokens"))
        out["trained_tokens"] = np.where((both[0] > 0) & (both[1] > 0), both[0] + both[1], 0).astype(np.int32)
        out["length"] = np.array([max(len(a), len(b)) for a, b in zip(out["chosen_input_ids"],
                                                                      out["rejected_input_ids"])], dtype=np.int32)
        out["pair_id"] = np.array([pair_id(p) for p in batch["payload"]], dtype=np.int64)
        return out

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        """Chosen outputs then rejected ones, as one batch of 2 x pairs rows (one forward pass)."""
        from training.tasks.base import pad_sequences

        ids = list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"])
        out = {"input_ids": pad_sequences(ids, pad_id),
               "attention_mask": (pad_sequences(ids, -1) != -1).astype(np.int64),
               "labels": pad_sequences(list(batch["chosen_labels"]) + list(batch["rejected_labels"]), IGNORE)}
        if REFERENCE[0] in batch:
            out["ref_logps"] = np.concatenate([batch[REFERENCE[0]], batch[REFERENCE[1]]]).astype(np.float32)
        return out

    # ---- model and metrics ---------------------------------------------------------------------
    @staticmethod
    def prepare_model(model) -> None:
        """No dropout: the policy and the reference must score a sequence alike (at step 0, identically)."""
        import torch

        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    @staticmethod
    def logps(model, inputs: dict):
        """Summed target log-probabilities of every row of a collated batch under ``model``."""
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        return sequence_logps(out.logits, inputs["labels"])

    def forward(self, model, inputs: dict) -> PairOutput:
        import torch

        policy = self.logps(model, inputs)
        if "ref_logps" in inputs:
            reference = inputs["ref_logps"]
        else:  # LoRA: the reference is the base model, the same weights with the adapter switched off
            with torch.no_grad(), getattr(model, "module", model).disable_adapter():
                reference = self.logps(model, inputs)
        chosen, rejected = policy.chunk(2)
        ref_chosen, ref_rejected = reference.to(policy.dtype).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        return PairOutput(losses.mean(), losses.detach(), chosen_rewards, rejected_rewards)

    @staticmethod
    def batch_metrics(outputs: PairOutput) -> dict[str, float]:
        return pair_metrics(outputs.chosen_rewards.float().cpu().numpy(),
                            outputs.rejected_rewards.float().cpu().numpy())

    @staticmethod
    def eval_outputs(batch: dict[str, np.ndarray], inputs: dict, outputs: PairOutput) -> list[dict]:
        return [{"loss": float(l), "chosen": float(c), "rejected": float(r)} for l, c, r in
                zip(outputs.losses.tolist(), outputs.chosen_rewards.tolist(), outputs.rejected_rewards.tolist())]

    @staticmethod
    def compute_metrics(results: list[dict], label_space: LabelSpace | None) -> dict:
        chosen = np.array([r["chosen"] for r in results], dtype=np.float64)
        rejected = np.array([r["rejected"] for r in results], dtype=np.float64)
        loss = float(np.mean([r["loss"] for r in results])) if results else 0.0
        return {"loss": loss, **pair_metrics(chosen, rejected), "num_pairs": len(results)}
