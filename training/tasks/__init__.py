"""Task adapters: one per task, the seam between data, model and metrics."""

from __future__ import annotations

from cluster.config import RunConfig
from cluster.errors import ConfigError


def get_adapter(cfg: RunConfig):
    """The adapter for ``cfg.task``."""
    if cfg.task == "sequence_classification":
        from training.tasks.sequence_classification import SequenceClassification

        return SequenceClassification(cfg)
    if cfg.task == "token_classification":
        from training.tasks.token_classification import TokenClassification

        return TokenClassification(cfg)
    if cfg.task == "question_answering":
        from training.tasks.question_answering import QuestionAnswering

        return QuestionAnswering(cfg)
    if cfg.task == "causal_lm":
        from training.tasks.causal_lm import CausalLM

        return CausalLM(cfg)
    raise ConfigError(f"task: {cfg.task!r} is not available in this version of rayfine; use task: "
                      "sequence_classification, token_classification or question_answering")
