"""Encoder tasks (classification, NER, extractive QA): tokenize one request, run a batch, post-process.

No HTTP here. ``encode`` runs per request (and raises ServingError 413 for over-long inputs before the
request joins a batch); ``predict`` runs a whole batch. A batch is split into length buckets first: on
CPU a batch of 16 padded to its longest text is slower per item than batch 1, while 16 texts of similar
length run about 4x faster per item (all-MiniLM-L6-v2, 2 cores). ``plan_buckets`` picks the split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from serving.errors import ServingError, input_too_long
from serving.model_folder import ModelSpec

# The fixed cost of one forward call, in token-equivalents of padded work. Measured for all-MiniLM-L6-v2
# on 2 CPU cores: ~5.5 ms per call plus ~0.15 ms per (padded) token, so a call costs about 32 tokens.
# Two length groups are merged when the padding this adds is cheaper than one more call.
CALL_OVERHEAD_TOKENS = 32
# Longest answer span considered by /v1/qa, in tokens (the transformers QA pipeline default).
MAX_ANSWER_TOKENS = 15


@dataclass
class Encoded:
    """One tokenized input, kept unpadded until its bucket is known."""

    ids: list[int]
    type_ids: Optional[list[int]] = None
    offsets: Optional[list[tuple[int, int]]] = None  # character spans; (0, 0) for special tokens
    text: str = ""  # NER: the input text; QA: the context
    context_mask: Optional[list[bool]] = None  # QA: tokens that belong to the context


def plan_buckets(lengths: list[int], overhead: int = CALL_OVERHEAD_TOKENS) -> list[list[int]]:
    """Split items into groups of similar length that minimise padded tokens + ``overhead`` per group.

    Exact for the cost model ``sum(overhead + size * longest)`` over groups of the length-sorted items
    (contiguous groups are optimal once sorted). O(n^2); n is at most ``serve.max_batch_size``.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + overhead + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class EncoderRunner:
    """Loads an encoder model and runs padded forward passes, one per length bucket."""

    def __init__(self, spec: ModelSpec, auto_class: Any, device: str, trust_remote_code: bool):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.is_fast:
            raise ServingError(500, f"{spec.path}: serving needs a fast tokenizer (tokenizer.json)")
        self.model = auto_class.from_pretrained(spec.path, use_safetensors=True,
                                                trust_remote_code=trust_remote_code, **spec.load_kwargs())
        self.model = self.model.to(device).eval()
        self.device = device
        self.pad_id = self.tokenizer.pad_token_id or 0

    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)

    def forward(self, items: list[Encoded]) -> list[dict[str, torch.Tensor]]:
        """Model outputs per item, with padding stripped, in the order of ``items``."""
        results: list[Optional[dict[str, torch.Tensor]]] = [None] * len(items)
        for group in plan_buckets([len(e.ids) for e in items]):
            outputs = self._forward_padded([items[i] for i in group])
            for row, i in enumerate(group):
                n = len(items[i].ids)
                results[i] = {k: v[row, :n] if _per_token(k, v) else v[row] for k, v in outputs.items()}
        return results  # type: ignore[return-value]

    def _forward_padded(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        width = max(len(e.ids) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = torch.zeros((len(items), width), dtype=torch.long) if items[0].type_ids else None
        for row, e in enumerate(items):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)
            mask[row, :len(e.ids)] = 1
            if types is not None:
                types[row, :len(e.ids)] = torch.tensor(e.type_ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            inputs["token_type_ids"] = types
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return {k: v.float().cpu() for k, v in out.items() if isinstance(v, torch.Tensor)}


def _per_token(name: str, value: torch.Tensor) -> bool:
    """Whether a model output has a sequence axis (token logits, QA start/end logits)."""
    return value.dim() == 3 or name in ("start_logits", "end_logits")


def _check_length(n_tokens: int, limit: int, param: str) -> None:
    if n_tokens > limit:
        raise input_too_long(n_tokens, limit, param)


class Classifier:
    """``/v1/classify``: label, score and every label's score for each text."""

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool):
        from transformers import AutoModelForSequenceClassification

        self.runner = EncoderRunner(spec, AutoModelForSequenceClassification, device, trust_remote_code)
        config = self.runner.model.config
        self.labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
        self.multi_label = config.problem_type == "multi_label_classification"
        self.limit = min(max_input_tokens, self.runner.max_positions())

    def encode(self, text: str) -> Encoded:
        enc = self.runner.tokenizer(text)
        _check_length(len(enc["input_ids"]), self.limit, "input")
        return Encoded(ids=enc["input_ids"], type_ids=enc.get("token_type_ids"))

    def predict(self, items: list[Encoded]) -> list[dict[str, Any]]:
        results = []
        for out in self.runner.forward(items):
            logits = out["logits"]
            probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            best = int(torch.argmax(probs))
            results.append({"label": self.labels[best], "score": float(probs[best]),
                            "scores": {label: float(p) for label, p in zip(self.labels, probs.tolist())}})
        return results


class Tagger:
    """``/v1/ner``: entities grouped like the transformers pipeline's ``aggregation_strategy="simple"``."""

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool):
        from transformers import AutoModelForTokenClassification

        self.runner = EncoderRunner(spec, AutoModelForTokenClassification, device, trust_remote_code)
        config = self.runner.model.config
        self.labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
        self.limit = min(max_input_tokens, self.runner.max_positions())

    def encode(self, text: str) -> Encoded:
        enc = self.runner.tokenizer(text, return_offsets_mapping=True)
        _check_length(len(enc["input_ids"]), self.limit, "input")
        return Encoded(ids=enc["input_ids"], type_ids=enc.get("token_type_ids"),
                       offsets=[tuple(o) for o in enc["offset_mapping"]], text=text)

    def predict(self, items: list[Encoded]) -> list[list[dict[str, Any]]]:
        return [self._entities(item, out["logits"]) for item, out in zip(items, self.runner.forward(items))]

    def _entities(self, item: Encoded, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs = torch.softmax(logits, dim=-1)
        scores, best = probs.max(dim=-1)
        tokens = [(self.labels[int(b)], float(s), start, end)
                  for b, s, (start, end) in zip(best, scores, item.offsets) if end > start]
        groups: list[list[tuple]] = []
        for token in tokens:
            bi, tag = _split_tag(token[0])
            if groups and bi != "B" and _split_tag(groups[-1][-1][0])[1] == tag:
                groups[-1].append(token)
            else:
                groups.append([token])
        entities = []
        for group in groups:
            tag = _split_tag(group[0][0])[1]
            if tag == "O":
                continue
            start, end = group[0][2], group[-1][3]
            entities.append({"entity": tag, "word": item.text[start:end], "start": start, "end": end,
                             "score": sum(t[1] for t in group) / len(group)})
        return entities


def _split_tag(label: str) -> tuple[str, str]:
    """``B-PER`` -> (B, PER); ``I-PER`` -> (I, PER); ``O`` or a bare label -> (I, label)."""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "I", label


class Reader:
    """``/v1/qa``: the best answer span in the context, with character offsets into the context."""

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool):
        from transformers import AutoModelForQuestionAnswering

        self.runner = EncoderRunner(spec, AutoModelForQuestionAnswering, device, trust_remote_code)
        self.limit = min(max_input_tokens, self.runner.max_positions())

    def encode(self, question: str, context: str) -> Encoded:
        enc = self.runner.tokenizer(question, context, return_offsets_mapping=True)
        _check_length(len(enc["input_ids"]), self.limit, "context")
        sequence_ids = enc.sequence_ids()
        return Encoded(ids=enc["input_ids"], type_ids=enc.get("token_type_ids"),
                       offsets=[tuple(o) for o in enc["offset_mapping"]], text=context,
                       context_mask=[s == 1 for s in sequence_ids])

    def predict(self, items: list[Encoded]) -> list[dict[str, Any]]:
        return [self._answer(item, out["start_logits"], out["end_logits"])
                for item, out in zip(items, self.runner.forward(items))]

    def _answer(self, item: Encoded, start_logits: torch.Tensor, end_logits: torch.Tensor) -> dict[str, Any]:
        outside = ~torch.tensor(item.context_mask)
        start_p = torch.softmax(start_logits.masked_fill(outside, -1e9), dim=-1)
        end_p = torch.softmax(end_logits.masked_fill(outside, -1e9), dim=-1)
        # Score every (start, end) pair with start <= end < start + MAX_ANSWER_TOKENS.
        pairs = torch.triu(torch.outer(start_p, end_p))
        pairs = torch.tril(pairs, diagonal=MAX_ANSWER_TOKENS - 1)
        flat = int(torch.argmax(pairs))
        s, e = divmod(flat, pairs.shape[1])
        start, end = item.offsets[s][0], item.offsets[e][1]
        return {"answer": item.text[start:end], "start": start, "end": end, "score": float(pairs[s, e])}


ENCODER_TASKS = {
    "sequence_classification": Classifier,
    "token_classification": Tagger,
    "question_answering": Reader,
}
