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
# /v1/qa for a model folder whose rayfine.json does not say how it was evaluated: the data.* defaults of training.
DEFAULT_DOC_STRIDE, DEFAULT_MAX_ANSWER_TOKENS, DEFAULT_N_BEST = 32, 30, 20


@dataclass
class Encoded:
    """One tokenized input, kept unpadded until its bucket is known."""

    ids: list[int]
    type_ids: Optional[list[int]] = None
    offsets: Optional[list[tuple[int, int]]] = None  # character spans; (0, 0) for special tokens
    text: str = ""  # NER: the input text; QA: the context
    word_ids: Optional[list[Optional[int]]] = None  # NER: each token's word (the tokenizer's pre-tokenized words)
    windows: Optional[list["Window"]] = None  # QA: the context's windows, each run as one sequence


@dataclass
class Window:
    """One QA window: ``ids`` as Encoded's, and each token's character span in the context (-1: not context)."""

    ids: list[int]
    type_ids: Optional[list[int]]
    offset_start: list[int]
    offset_end: list[int]
    cls_index: int


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

    def __init__(self, spec: ModelSpec, auto_class: Any, device: str, trust_remote_code: bool, weights: Any = None):
        from serving.tokenizers import shared_tokenizer

        self.tokenizer = shared_tokenizer(spec.path, "tokenizing", trust_remote_code)  # the tokenizing thread's
        if not self.tokenizer.is_fast:
            raise ServingError(500, f"{spec.path}: serving needs a fast tokenizer (tokenizer.json)")
        # ``weights``: a model already loaded (a LoRA adapter on a shared base, serving.pool)
        self.model = weights if weights is not None else auto_class.from_pretrained(
            spec.path, use_safetensors=True, trust_remote_code=trust_remote_code, **spec.load_kwargs())
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

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool,
                 weights: Any = None):
        from transformers import AutoModelForSequenceClassification

        self.runner = EncoderRunner(spec, AutoModelForSequenceClassification, device, trust_remote_code, weights)
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
    """``/v1/ner``: one label per word, its first sub-token's, as training labels words and evaluation scores them
    (the other sub-tokens are ignored by the loss, so their predictions are untrained); then B-/I- grouping of
    words into entities, with character offsets into the text and the mean of the words' scores. The transformers
    pipeline's ``aggregation_strategy="first"`` reads a model the same way. Words are the tokenizer's pre-tokenized
    words (whitespace and punctuation split)."""

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool,
                 weights: Any = None):
        from transformers import AutoModelForTokenClassification

        self.runner = EncoderRunner(spec, AutoModelForTokenClassification, device, trust_remote_code, weights)
        config = self.runner.model.config
        self.labels = spec.labels or [config.id2label[i] for i in range(config.num_labels)]
        self.limit = min(max_input_tokens, self.runner.max_positions())

    def encode(self, text: str) -> Encoded:
        enc = self.runner.tokenizer(text, return_offsets_mapping=True)
        _check_length(len(enc["input_ids"]), self.limit, "input")
        return Encoded(ids=enc["input_ids"], type_ids=enc.get("token_type_ids"),
                       offsets=[tuple(o) for o in enc["offset_mapping"]], text=text, word_ids=enc.word_ids())

    def predict(self, items: list[Encoded]) -> list[list[dict[str, Any]]]:
        return [self._entities(item, out["logits"]) for item, out in zip(items, self.runner.forward(items))]

    def _entities(self, item: Encoded, logits: torch.Tensor) -> list[dict[str, Any]]:
        probs = torch.softmax(logits, dim=-1)
        scores, best = probs.max(dim=-1)
        words: dict[int, list] = {}  # word -> [label, score, start, end]: label and score of its first sub-token
        for pos, (word, (start, end)) in enumerate(zip(item.word_ids, item.offsets)):
            if word is None or end <= start:
                continue
            if word not in words:
                words[word] = [self.labels[int(best[pos])], float(scores[pos]), start, end]
            else:
                words[word][3] = end
        groups: list[list[list]] = []
        for word in sorted(words):
            bi, tag = _split_tag(words[word][0])
            if groups and bi != "B" and _split_tag(groups[-1][-1][0])[1] == tag:
                groups[-1].append(words[word])
            else:
                groups.append([words[word]])
        entities = []
        for group in groups:
            tag = _split_tag(group[0][0])[1]
            if tag == "O":
                continue
            start, end = group[0][2], group[-1][3]
            entities.append({"entity": tag, "word": item.text[start:end], "start": start, "end": end,
                             "score": sum(w[1] for w in group) / len(group)})
        return entities


def _split_tag(label: str) -> tuple[str, str]:
    """``B-PER`` -> (B, PER); ``I-PER`` -> (I, PER); ``O`` or a bare label -> (I, label)."""
    if label[:2] in ("B-", "I-"):
        return label[0], label[2:]
    return "I", label


class Reader:
    """``/v1/qa``: the best answer span in the context, with character offsets into the context.

    A context longer than the model's ``max_seq_length`` is read in windows overlapping by ``doc_stride`` tokens,
    and each window decoded by ``core.qa_spans.best_spans`` (``n_best``, ``max_answer_length``): the windows and
    the rule of the model's evaluation (rayfine.json), so that the endpoint answers what evaluation scored. The
    best span of all windows wins; its score is the probability of its start times that of its end, in its window.
    """

    def __init__(self, spec: ModelSpec, device: str, max_input_tokens: int, trust_remote_code: bool,
                 weights: Any = None):
        from transformers import AutoModelForQuestionAnswering

        self.runner = EncoderRunner(spec, AutoModelForQuestionAnswering, device, trust_remote_code, weights)
        self.limit = max_input_tokens  # the whole question + context, before windowing
        self.window = min(spec.max_seq_length or 10**9, self.runner.max_positions(), max_input_tokens)
        # a model's own stride as evaluated; else the default, kept under a quarter of the window
        self.stride = spec.doc_stride if spec.doc_stride is not None else min(DEFAULT_DOC_STRIDE,
                                                                              max(self.window // 4, 1))
        self.max_answer = spec.max_answer_length or DEFAULT_MAX_ANSWER_TOKENS
        self.n_best = spec.n_best or DEFAULT_N_BEST

    def encode(self, question: str, context: str) -> Encoded:
        tokenizer = self.runner.tokenizer
        n_question = len(tokenizer(question, add_special_tokens=False)["input_ids"])
        _check_length(n_question + len(tokenizer(context, add_special_tokens=False)["input_ids"]) + 3,
                      self.limit, "context")
        room = self.window - n_question - 3  # context tokens per window
        if room <= self.stride:
            raise input_too_long(n_question, max(self.window - self.stride - 4, 1), "question")
        enc = tokenizer(question, context, truncation="only_second", max_length=self.window, stride=self.stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        windows = []
        for w, ids in enumerate(enc["input_ids"]):
            seq, offsets = enc.sequence_ids(w), enc["offset_mapping"][w]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            windows.append(Window(ids=ids, type_ids=enc["token_type_ids"][w] if "token_type_ids" in enc else None,
                                  offset_start=[o[0] if s == 1 else -1 for o, s in zip(offsets, seq)],
                                  offset_end=[o[1] if s == 1 else -1 for o, s in zip(offsets, seq)],
                                  cls_index=cls))
        return Encoded(ids=[i for w in windows for i in w.ids], text=context, windows=windows)

    def predict(self, items: list[Encoded]) -> list[dict[str, Any]]:
        flat = [Encoded(ids=w.ids, type_ids=w.type_ids) for item in items for w in item.windows]
        outputs = iter(self.runner.forward(flat))
        return [self._answer(item, [next(outputs) for _ in item.windows]) for item in items]

    def _answer(self, item: Encoded, outputs: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        import numpy as np

        from core.qa_spans import best_spans

        best = None  # (score, start, end, probability)
        for window, out in zip(item.windows, outputs):
            start_logits, end_logits = out["start_logits"].numpy(), out["end_logits"].numpy()
            _, spans = best_spans(start_logits, end_logits, np.asarray(window.offset_start),
                                  np.asarray(window.offset_end), self.n_best, self.max_answer, window.cls_index)
            if spans and (best is None or spans[0][0] > best[0]):
                context = np.asarray(window.offset_start) >= 0
                norm = _logsumexp(start_logits[context]) + _logsumexp(end_logits[context])
                best = (*spans[0], float(np.exp(spans[0][0] - norm)))
        if best is None:
            return {"answer": "", "start": 0, "end": 0, "score": 0.0}
        _, start, end, probability = best
        return {"answer": item.text[start:end], "start": start, "end": end, "score": probability}


def _logsumexp(values) -> float:
    import numpy as np

    top = float(np.max(values))
    return top + float(np.log(np.sum(np.exp(values - top))))


ENCODER_TASKS = {
    "sequence_classification": Classifier,
    "token_classification": Tagger,
    "question_answering": Reader,
}
