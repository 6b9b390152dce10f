"""Token classification (named-entity recognition): one BIO tag per word.

Records are sentences: a list of words and one tag per word (JSONL/Parquet columns, or CoNLL files read by
``training.data``). Words are split into sub-tokens by the tokenizer; the first sub-token of a word carries
the word's label and the others are ignored by the loss (or, with ``data.label_all_subtokens``, carry it
too, as ``I-`` for a ``B-`` word). Evaluation reads one prediction per word (its first sub-token) and scores
entities with seqeval's semantics; words cut off by ``data.max_seq_length`` count as predicted ``O``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.errors import UserError
from training.span_metrics import entity_metrics, split_tag
from training.tasks.base import LabelSpace, ParseError, TaskAdapter, label_head_kwargs, pad_sequences, padded_inputs

IGNORE = -100  # the label id torch's cross-entropy skips


class TagError(ParseError):
    """A problem with one word's tag; ``line`` is its line in a CoNLL file (None elsewhere)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def check_tags(tags: list[str], scheme: str, column: str, lines: list[int] | None = None) -> list[str]:
    """Validate BIO tags and return them as IOB2 (``scheme="iob1"`` turns a stray ``I-X`` into ``B-X``)."""
    out, prev = [], "O"
    for i, tag in enumerate(tags):
        line = lines[i] if lines else None
        prefix, kind = split_tag(tag)
        if prefix not in ("B", "I", "O") or (prefix != "O" and not kind) or (prefix == "O" and tag != "O"):
            raise TagError(f"{column}[{i}] '{tag}' is not a BIO tag; use O, B-TYPE or I-TYPE (IOBES and bare "
                           "types need converting to IOB2)", line)
        if prefix == "I" and prev not in (f"B-{kind}", f"I-{kind}"):
            if scheme == "iob2":
                raise TagError(f"{column}[{i}] '{tag}' follows '{prev}': IOB2 starts an entity with B-{kind}; "
                               "fix the tag, or set data.tag_scheme: iob1 if the data is IOB1", line)
            tag = f"B-{kind}"
        out.append(tag)
        prev = tag
    return out


def _string_list(value: Any, column: str, option: str) -> list[str]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ParseError(f"'{column}' must be a list of strings ({option}), got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ParseError(f"{column}[{i}] must be a string, got {item!r}")
    return list(value)


class TokenClassification(TaskAdapter):
    name = "token_classification"
    has_labels = True
    auto_model = "AutoModelForTokenClassification"
    label_option = "data.tags_column"

    # ---- records -------------------------------------------------------------------------------
    def parse_record(self, record: dict[str, Any]) -> dict[str, Any]:
        d = self.data
        for column, option in ((d.tokens_column, "data.tokens_column"), (d.tags_column, "data.tags_column")):
            if column not in record:
                cols = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "none"
                raise ParseError(f"missing column '{column}' ({option}); columns are {cols}")
        tokens = _string_list(record[d.tokens_column], d.tokens_column, "data.tokens_column")
        tags = _string_list(record[d.tags_column], d.tags_column, "data.tags_column")
        lines = record.get("_lines")  # CoNLL: the line of each word
        if not tokens:
            raise ParseError(f"'{d.tokens_column}' is empty: a sentence needs at least one word")
        if len(tokens) != len(tags):
            raise ParseError(f"'{d.tokens_column}' has {len(tokens)} words but '{d.tags_column}' has {len(tags)} "
                             "tags; give exactly one tag per word")
        for i, word in enumerate(tokens):
            if not word.strip():
                raise TagError(f"{d.tokens_column}[{i}] is an empty word; remove it and its tag",
                               lines[i] if lines else None)
        return {"tokens": tokens, "tags": check_tags(tags, d.tag_scheme, d.tags_column, lines)}

    @staticmethod
    def empty_record() -> dict[str, Any]:
        return {"tokens": [], "tags": []}

    @staticmethod
    def record_labels(batch: dict[str, np.ndarray]) -> list[list[str]]:
        """The label strings of each record (for label counts): its tags."""
        return [[str(t) for t in tags] for tags in batch["tags"]]

    @staticmethod
    def build_label_space(counts: dict[str, int]) -> LabelSpace:
        """``O`` first, then ``B-``/``I-`` of every entity type seen (both, so the model can tag any length)."""
        kinds = sorted({split_tag(tag)[1] for tag in counts} - {""})
        return LabelSpace(["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")])

    # ---- tokens --------------------------------------------------------------------------------
    def tokenize(self, batch: dict[str, np.ndarray], tokenizer, labels: LabelSpace | None,
                 truncate: bool = True) -> dict[str, Any]:
        if not tokenizer.is_fast:
            raise UserError("task token_classification needs a fast tokenizer (word ids); this model's "
                            "tokenizer is a slow one")
        words = [[str(w) for w in row] for row in batch["tokens"]]
        enc = tokenizer(words, is_split_into_words=True, truncation=truncate,
                        max_length=self.data.max_seq_length if truncate else None)
        ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
        out = {"input_ids": ids, "length": np.array([len(x) for x in ids], dtype=np.int32)}
        if "token_type_ids" in enc:
            out["token_type_ids"] = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
        if labels is None:
            return out
        lookup = labels.label2id
        out["labels"], out["word_starts"], out["gold"] = [], [], []
        for i, tags in enumerate(batch["tags"]):
            tag_ids = [lookup.get(str(t), IGNORE) for t in tags]
            token_labels, starts = align_labels(enc.word_ids(i), tag_ids, self._continuation(labels))
            out["labels"].append(token_labels)
            out["word_starts"].append(starts)
            out["gold"].append(np.asarray(tag_ids, dtype=np.int32))
        return out

    def _continuation(self, labels: LabelSpace) -> dict[int, int] | None:
        """Label id for the later sub-tokens of a word, by the word's label id (None: ignore them)."""
        if not self.data.label_all_subtokens:
            return None
        lookup = labels.label2id
        return {i: lookup.get("I-" + name[2:], i) if name.startswith("B-") else i
                for i, name in enumerate(labels.names)}

    def collate(self, batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
        return padded_inputs(batch, pad_id) | {"labels": pad_sequences(list(batch["labels"]), IGNORE)}

    # ---- model and metrics ---------------------------------------------------------------------
    def model_kwargs(self, labels: LabelSpace) -> dict[str, Any]:
        return label_head_kwargs(labels)

    @staticmethod
    def eval_outputs(batch: dict[str, np.ndarray], inputs: dict, outputs) -> list[dict]:
        preds = outputs.logits.argmax(-1).cpu().numpy()
        results = []
        for row, starts, gold in zip(preds, batch["word_starts"], batch["gold"]):
            pred = [int(row[s]) if s >= 0 else -1 for s in np.asarray(starts, dtype=np.int64)]
            results.append({"pred": pred, "gold": [int(x) for x in gold]})
        return results

    @staticmethod
    def compute_metrics(results: list[dict], label_space: LabelSpace) -> dict:
        names = label_space.names

        def tag(i: int) -> str:
            return names[i] if i >= 0 else "O"

        gold = [[tag(i) for i in r["gold"]] for r in results]
        # Words past data.max_seq_length (or with no token) got no prediction: they count as O, so their
        # entities are missed rather than left out of the score.
        pred = [[tag(i) for i in r["pred"]] + ["O"] * (len(r["gold"]) - len(r["pred"])) for r in results]
        return entity_metrics(gold, pred)


def align_labels(word_ids: list[int | None], tag_ids: list[int], continuation: dict[int, int] | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-token loss labels, and the position of each word's first sub-token.

    Special tokens get ``IGNORE``; the first sub-token of word ``w`` gets ``tag_ids[w]``; later sub-tokens get
    ``IGNORE`` or, with ``continuation``, ``continuation[tag_ids[w]]``. ``starts[w]`` is -1 for a word the
    tokenizer turned into no token; words cut off by truncation are not in ``starts``.
    """
    labels = np.full(len(word_ids), IGNORE, dtype=np.int64)
    seen = [w for w in word_ids if w is not None]
    starts = np.full(max(seen) + 1 if seen else 0, -1, dtype=np.int32)
    prev = None
    for pos, word in enumerate(word_ids):
        if word is None:
            prev = None
            continue
        tag = tag_ids[word]
        if word != prev:
            labels[pos] = tag
            starts[word] = pos
        elif continuation is not None and tag != IGNORE:
            labels[pos] = continuation[tag]
        prev = word
    return labels, starts
