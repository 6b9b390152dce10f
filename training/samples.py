"""A few greedy generations from validation prompts, written to the run folder as samples.jsonl.

Generated with plain transformers from the exported folder (the same files a user or the server loads), so
they also show that the export generates.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.config import RunConfig

NUM_SAMPLES = 3
MAX_NEW_TOKENS = 32


def sample_prompts(cfg: RunConfig, n: int = NUM_SAMPLES) -> list[dict]:
    """Up to ``n`` (messages or prompt, reference) pairs from the validation data (else train)."""
    from training.data import expand_inputs, iter_raw_records

    out = []
    for spec in (cfg.data.validation, cfg.data.train):
        for path, fmt in expand_inputs(spec, cfg.data.format, "data") if spec else []:
            for _, record, problem in iter_raw_records(path, fmt):
                if problem or record is None:
                    continue
                if isinstance(record.get("input"), dict) and "messages" in record["input"]:  # preference pair
                    preferred = record.get("preferred_output") or [{}]
                    out.append({"messages": [{"role": m["role"], "content": m["content"]}
                                             for m in record["input"]["messages"]],
                                "reference": preferred[0].get("content", "")})
                elif "messages" in record:
                    msgs = record["messages"]
                    last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
                    out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                                "reference": msgs[last]["content"]})
                elif "prompt" in record:
                    out.append({"prompt": record["prompt"], "reference": record.get("completion", "")})
                elif isinstance(record.get(cfg.data.text_column), str):
                    text = record[cfg.data.text_column]
                    out.append({"prompt": text[: len(text) // 2], "reference": text[len(text) // 2:]})
                if len(out) >= n:
                    return out
        if out:
            return out
    return out


def load_for_generation(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(model_dir).eval(), tokenizer
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval(), tokenizer


def write_samples(cfg: RunConfig, model_dir: Path, out_path: Path) -> list[dict]:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # runs in the CLI's process: no weight-loading bar there
    model, tokenizer = load_for_generation(model_dir)
    samples = []
    for item in sample_prompts(cfg):
        if "messages" in item:
            prompt = tokenizer.apply_chat_template(item["messages"], tokenize=False, add_generation_prompt=True)
        else:
            prompt = item["prompt"]
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids[:, -cfg.data.max_seq_length:]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        generated = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({**{k: v for k, v in item.items() if k != "reference"}, "reference": item["reference"],
                        "generated": generated})
    out_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return samples
