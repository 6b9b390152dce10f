"""Causal-LM supervised fine-tuning: OpenAI chat JSONL, prompt/completion pairs, or plain text.

Chat records are rendered with the tokenizer's chat template (``core.model_folder.DEFAULT_CHAT_TEMPLATE`` when
it has none; the template is saved with the exported model, so serving renders prompts exactly as training
did). The loss
covers assistant tokens only (completion tokens for prompt/completion) unless ``data.train_on_prompt``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from core.model_folder import DEFAULT_CHAT_TEMPLATE
from training.tasks.base import LabelSpace, ParseError, TaskAdapter, pad_sequences

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "weight", "name")
RECORD_KEYS = {"messages"}

def ensure_chat_template(tokenizer) -> None:
    """Give the tokenizer a pad token and a chat template if it lacks them (saved with the export)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token or tokenizer.unk_token
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def check_message(msg: Any, where: str, allowed: tuple[str, ...]) -> None:
    """One chat message: an object with a known role, non-empty content and only the ``allowed`` keys."""
    if not isinstance(msg, dict):
        raise ParseError(f"{where} must be an object with 'role' and 'content'")
    for key in ("role", "content"):
        if key not in msg:
            raise ParseError(f"{where} has no '{key}'")
    extra = sorted(set(msg) - set(allowed))
    if extra:
        raise ParseError(f"{where} has unknown key(s) {', '.join(extra)}; allowed: {', '.join(allowed)}")
    if msg["role"] not in ROLES:
        raise ParseError(f"{where}.role {msg['role']!r} is not one of {', '.join(ROLES)}")
    if not isinstance(msg["content"], str) or not msg["content"].strip():
        raise ParseError(f"{where}.content is empty")


def check_chat(record: dict[str, Any]) -> list[dict]:
    """OpenAI's checks for a chat fine-tuning example; raises ParseError naming the problem."""
    unknown = sorted(set(record) - RECORD_KEYS)
    if unknown:
        raise ParseError(f"unknown key(s) {', '.join(unknown)}; a chat example has only 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ParseError("'messages' must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        check_message(msg, where, MESSAGE_KEYS)
        if "weight" in msg and (msg["role"] != "assistant" or msg["weight"] not in (0, 1)
                                or isinstance(msg["weight"], bool)):
            raise ParseError(f"{where}.weight must be 0 or 1, on assistant messages only")
    if not any(m["role"] == "assistant" for m in messages):
        raise ParseError("no assistant message: a chat example needs at least one to learn from")
    return messages


class CausalLM(TaskAdapter):
    name = "causal_lm"
    has_labels = False
    auto_model = "AutoModelForCausalLM"

    def report_lines(self, summary) -> list[str]:
        """Pre-flight additions: billed-style token counts and the padding saved by packing."""
        d, t = self.data, self.cfg.training
        stats = summary.length_stats("train", d.max_seq_length)
        if not stats:
            return []
        grouped, packed = padding_fractions(summary.lengths["train"], d.max_seq_length, t.batch_size, t.seed)
        return [f"  training tokens billed-style (tokens per epoch x {t.epochs} epochs): "
                f"{stats['tokens'] * t.epochs:,}",
                f"  padding per epoch: {grouped:.1%} in length-grouped batches, {packed:.1%} with data.packing "
                f"(now {'on' if d.packing else 'off'})"]

    @staticmethod
    def prepare_tokenizer(tokenizer) -> None:
        ensure_chat_template(tokenizer)

    # ---- records -------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        if "messages" in record:
            return {"kind": "chat", "payload": json.dumps(check_chat(record))}
        if "prompt" in record or "completion" in record:
            for key in ("prompt", "completion"):
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise ParseError(f"'{key}' is missing or empty (prompt/completion data)")
            return {"kind": "completion", "payload": json.dumps([record["prompt"], record["completion"]])}
        text_col = self.data.text_column
        if isinstance(record.get(text_col), str) and record[text_col].strip():
            return {"kind": "text", "payload": json.dumps(record[text_col])}
        cols = ", ".join(sorted(record)) or "none"
        raise ParseError(f"expected 'messages' (chat), 'prompt' + 'completion', or '{text_col}' "
                         f"(data.text_column); columns are {cols}")

    @staticmethod
    def empty_record() -> dict[str, Any]:
        return {"kind": "", "payload": ""}

    # ---- tokens --------------------------------------------------------------------------------
    def render(self, kind: str, payload: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
        """The training text of one record and the character spans that carry the loss."""
        value = json.loads(payload)
        eos = tokenizer.eos_token or ""
        if kind == "text":
            text = value + eos
            return text, [(0, len(text))]
        if kind == "completion":
            prompt, completion = value
            return prompt + completion + eos, [(len(prompt), len(prompt) + len(completion) + len(eos))]
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in value]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, msg in enumerate(value):
            if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
                continue
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                        if i else tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False).rstrip())
            spans.append((start, end))
        return text, spans

    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        """Input ids and loss targets. Truncated (training, evaluation): a record whose every target token was
        cut off at data.max_seq_length is left out, as it has nothing to learn from (its loss would be 0/0);
        ``record_stats`` counts them for the pre-flight report."""
        out = self._encode(batch, tokenizer, truncate)
        if truncate and (out["trained_tokens"] == 0).any():
            keep = np.flatnonzero(out["trained_tokens"] > 0)
            out = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in out.items()}
        return out

    def record_stats(self, batch: dict[str, np.ndarray], tokenizer) -> dict[str, np.ndarray]:
        """Per record: a training row, unless truncation at data.max_seq_length left it no target token."""
        empty = self._encode(batch, tokenizer, truncate=True)["trained_tokens"] == 0
        return {"rows": (~empty).astype(np.int64), "no_target_after_truncation": empty.astype(np.int64)}

    def _encode(self, batch: dict[str, np.ndarray], tokenizer, truncate: bool) -> dict[str, Any]:
        ensure_chat_template(tokenizer)
        rendered = [self.render(k, p, tokenizer) for k, p in zip(batch["kind"], batch["payload"])]
        max_len = self.data.max_seq_length if truncate else None
        enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, truncation=truncate,
                        max_length=max_len, return_offsets_mapping=True)
        ids, targets, trained = [], [], []
        for (text, spans), input_ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
            tokens = np.asarray(input_ids, dtype=np.int32)
            if self.data.train_on_prompt:
                target = tokens.astype(np.int64)
            else:
                keep = np.array([any(s <= a and b <= e and b > a for s, e in spans) for a, b in offsets],
                                dtype=bool)
                target = np.where(keep, tokens, IGNORE).astype(np.int64)
            ids.append(tokens)
            targets.append(target)
            trained.append(int((target != IGNORE).sum()))
        return {"input_ids": ids, "labels": targets, "length": np.array([len(x) for x in ids], dtype=np.int32),
                "trained_tokens": np.array(trained, dtype=np.int32)}

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        ids = list(batch["input_ids"])
        if "position_ids" in batch:  # already packed by pack_rows
            return {k: np.asarray(batch[k]) for k in ("input_ids", "labels", "attention_mask", "position_ids")}
        return {"input_ids": pad_sequences(ids, pad_id),
                "attention_mask": (pad_sequences(ids, -1) != -1).astype(np.int64),
                "labels": pad_sequences(list(batch["labels"]), IGNORE)}

    # ---- model and metrics ---------------------------------------------------------------------
    def model_kwargs(self, labels: LabelSpace | None) -> dict[str, Any]:
        return {}

    @staticmethod
    def eval_outputs(batch: dict[str, np.ndarray], inputs: dict, outputs) -> list[dict]:
        """Summed token negative log-likelihood and token count of the batch (exact perplexity)."""
        import torch

        logits = outputs.logits[:, :-1].float()
        target = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
        return [{"nll": float(nll), "tokens": int((target != IGNORE).sum())}]

    @staticmethod
    def compute_metrics(results: list[dict], label_space: LabelSpace | None) -> dict:
        tokens = sum(r["tokens"] for r in results)
        loss = sum(r["nll"] for r in results) / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def pack_rows(rows: dict[str, np.ndarray], max_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Pack tokenized examples into sequences of at most ``max_len`` tokens (first-fit decreasing).

    Attention never crosses an example boundary: each packed sequence gets a block-diagonal causal 4D mask
    (0 = attend, dtype-min = blocked) and position ids that restart at 0 per example; the first token of each
    example is not a target (it must not be predicted from the previous example's last token).
    """
    bins = first_fit_decreasing([len(x) for x in rows["input_ids"]], max_len)
    return [_pack_one(rows, members, max_len, pad_id) for members in bins]


def first_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``max_len`` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_len - lengths[i])
    return bins


def padding_fractions(lengths: np.ndarray, max_len: int, batch_size: int, seed: int = 0) -> tuple[float, float]:
    """Share of padding tokens in a training epoch: (length-grouped batches, packed sequences).

    Simulates the train loop's batching on the token lengths: buckets of 16 batches, sorted within a bucket
    and padded to the longest in each batch; or packed first-fit-decreasing into ``max_len`` sequences.
    """
    x = np.minimum(np.asarray(lengths), max_len)
    x = x[np.random.default_rng(seed).permutation(len(x))]
    bucket = batch_size * 16
    padded = packed = 0
    for start in range(0, len(x), bucket):
        part = np.sort(x[start: start + bucket])
        padded += sum(int(part[i: i + batch_size].max()) * len(part[i: i + batch_size])
                      for i in range(0, len(part), batch_size))
        packed += len(first_fit_decreasing(part.tolist(), max_len)) * max_len
    tokens = int(x.sum())
    return (1 - tokens / padded if padded else 0.0), (1 - tokens / packed if packed else 0.0)


def _pack_one(rows, members: list[int], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    ids = np.full(max_len, pad_id, dtype=np.int64)
    labels = np.full(max_len, IGNORE, dtype=np.int64)
    positions = np.zeros(max_len, dtype=np.int64)
    segment = np.full(max_len, -1, dtype=np.int64)
    at = 0
    for seg, i in enumerate(members):
        n = len(rows["input_ids"][i])
        ids[at: at + n] = rows["input_ids"][i]
        labels[at: at + n] = rows["labels"][i]
        labels[at] = IGNORE
        positions[at: at + n] = np.arange(n)
        segment[at: at + n] = seg
        at += n
    causal = np.tril(np.ones((max_len, max_len), dtype=bool))
    allowed = (segment[:, None] == segment[None, :]) & causal & (segment[:, None] >= 0)
    np.fill_diagonal(allowed, True)  # padding rows attend to themselves: no all-masked softmax rows
    mask = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[None]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask,
            "length": np.int32(at)}
