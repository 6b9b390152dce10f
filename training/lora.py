"""LoRA with peft: wrap the model before DeepSpeed sees it, export the adapter and optionally a merged model."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.config import RunConfig

PEFT_TASK = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS",
             "token_classification": "TOKEN_CLS", "question_answering": "QUESTION_ANS"}


def lora_config(cfg: RunConfig):
    from peft import LoraConfig

    lora = cfg.model.lora
    # target_modules None: peft's per-architecture default (q/v projections for Llama, c_attn for GPT-2, ...).
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=PEFT_TASK[cfg.task])


def apply_lora(model, cfg: RunConfig):
    """The peft-wrapped model: only adapter (and task head) parameters keep requires_grad."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:  # e.g. no default target modules known for this architecture
        from core.errors import UserError

        raise UserError(f"model.lora: {exc}; set model.lora.target_modules to the names of the linear "
                        "layers to adapt (e.g. [q_proj, v_proj])") from None


def export_lora(module, state_dict, out_dir: Path, cfg: RunConfig, tokenizer, model_kwargs: dict) -> None:
    """Write ``adapter/`` (peft folder) beside ``out_dir``; ``out_dir`` gets the merged model when
    ``model.lora.merge`` is set, else the adapter itself (transformers loads it with peft installed)."""
    import transformers
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter_dir = out_dir.parent / "adapter"
    module.save_pretrained(adapter_dir, state_dict=state_dict)
    tokenizer.save_pretrained(adapter_dir)
    if not cfg.model.lora.merge:
        shutil.copytree(adapter_dir, out_dir)
        return
    adapter_weights = get_peft_model_state_dict(module, state_dict=state_dict)
    auto = getattr(transformers, type(module.get_base_model()).__name__, None) or transformers.AutoModel
    base = auto.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code,
                                **model_kwargs)
    fresh = get_peft_model(base, lora_config(cfg))
    set_peft_model_state_dict(fresh, adapter_weights)
    fresh.merge_and_unload().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
