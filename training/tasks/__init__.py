"""Task adapters: one per task, the seam between data, model and metrics (see ``training.tasks.base``)."""

from __future__ import annotations

from core.config import RunConfig
from training.tasks.base import TaskAdapter


def get_adapter(cfg: RunConfig) -> TaskAdapter:
    """The adapter for ``cfg.task`` (the config schema admits only the four tasks below; a causal LM trained
    with ``training.method: dpo`` reads preference pairs)."""
    if cfg.task == "sequence_classification":
        from training.tasks.sequence_classification import SequenceClassification

        return SequenceClassification(cfg)
    if cfg.task == "token_classification":
        from training.tasks.token_classification import TokenClassification

        return TokenClassification(cfg)
    if cfg.task == "question_answering":
        from training.tasks.question_answering import QuestionAnswering

        return QuestionAnswering(cfg)
    if cfg.training.method == "dpo":
        from training.tasks.preference import Preference

        return Preference(cfg)
    from training.tasks.causal_lm import CausalLM

    return CausalLM(cfg)
