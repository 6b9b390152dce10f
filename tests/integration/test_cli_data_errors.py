"""The CLI on bad and good data: one message per problem with file and line, exit 1, nothing written.

The CLI runs in-process (``cluster.cli.main``) on the session's local Ray: what it prints and its exit code are
those of ``rayfine`` in a shell, without a Python and Ray start per call."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import yaml

from cluster.cli import main
from tests.conftest import chat_rows, preference_rows, sentiment_rows, write_jsonl

pytestmark = pytest.mark.integration


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def rayfine(ray_local, capsys, monkeypatch):
    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def write_config(tmp_path, model, train, validation, **extra):
    raw = {"model": {"name_or_path": str(model)},
           "data": {"train": str(train), "validation": str(validation), "max_seq_length": 8},
           "scaling": {"num_workers": 2, "use_gpu": False},
           "output": {"dir": str(tmp_path / "runs"), "name": "bad"}, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_bad_records_are_all_reported_and_train_writes_nothing(tmp_path, tiny_bert, rayfine):
    train = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in sentiment_rows(20)]
    lines[3] = '{"text": "broken json", '
    lines[7] = json.dumps({"review": "wrong column", "label": "pos"})
    lines[11] = json.dumps({"text": "", "label": "neg"})
    lines[15] = json.dumps({"text": "list label", "label": ["pos"]})
    train.write_text("\n".join(lines) + "\n")
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(4) + [{"text": "new", "label": "meh"}])
    config = write_config(tmp_path, tiny_bert, train, val)

    proc = rayfine("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert f"{train}:4: malformed JSON" in err
    assert f"{train}:8: missing column 'text' (data.text_column); columns are label, review" in err
    assert f"{train}:12: 'text' is empty" in err
    assert f"{train}:16: 'label' must be a string or an integer" in err
    assert "4 problem(s) in the data" in err

    train.write_text("\n".join(json.dumps(r) for r in sentiment_rows(20)) + "\n")
    proc = rayfine("train", str(config), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{val}:5: label 'meh' in validation never appears in train" in proc.stderr
    assert not (tmp_path / "runs").exists(), "a failed pre-flight must not create the run folder"

    proc = rayfine("train", str(write_config(tmp_path, tiny_bert, tmp_path / "missing.jsonl", val)), cwd=tmp_path)
    assert proc.returncode == 1 and "data.train: no data file matches" in proc.stderr


def test_validate_prints_the_preflight_report(tmp_path, tiny_bert, rayfine):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40, seed=3))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(10, seed=4))
    proc = rayfine("validate", str(write_config(tmp_path, tiny_bert, train, val)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    pos_train = sum(r["label"] == "pos" for r in sentiment_rows(40, seed=3))
    pos_val = sum(r["label"] == "pos" for r in sentiment_rows(10, seed=4))
    assert re.search(r"train\s+40\n", out) and re.search(r"validation\s+10\n", out)
    assert re.search(rf"\n\s+pos\s+{pos_train}\s+{pos_val}\n", out), out
    assert "token lengths (data.max_seq_length = 8)" in out
    # "the X was Y" is 6-7 tokens with [CLS]/[SEP]; max_seq_length 8 truncates none
    assert "truncated" in out and "parameters:" in out
    assert "ZeRO-2:" in out and "<- chosen" in out
    assert "OK: config and data are valid." in out


def test_validate_of_a_causal_lm_prints_its_serving_plan(tmp_path, tiny_llama, rayfine):
    train = write_jsonl(tmp_path / "chat.jsonl", chat_rows(12, seed=1))
    val = write_jsonl(tmp_path / "chat_val.jsonl", chat_rows(4, seed=2))
    serve = {"max_input_tokens": 64, "max_new_tokens": 32, "max_running_sequences": 4}
    config = write_config(tmp_path, tiny_llama, train, val, task="causal_lm", serve=serve)
    proc = rayfine("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # 4 sequences of 64 + 32 tokens; 2 layers x 4 KV heads x 16 dims x keys and values x 4 bytes = 1 KiB a token
    assert ("Serving (generation): continuous batching (transformers): up to 4 sequences per step, KV cache 384 "
            "tokens (0.4 MiB)") in proc.stdout
    serve["kv_cache_tokens"] = 50
    config = write_config(tmp_path, tiny_llama, train, val, task="causal_lm", serve=serve)
    proc = rayfine("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "serve.kv_cache_tokens: 50 cannot hold one sequence of 96 tokens" in proc.stderr


def test_preference_records_are_checked_by_line_and_reported(tmp_path, tiny_llama, rayfine):
    rows = preference_rows(12, seed=5)
    rows[2]["non_preferred_output"] = rows[2]["preferred_output"]
    rows[4]["input"]["messages"].append({"role": "assistant", "content": "hm"})
    rows[6]["preferred_output"] = []
    rows[8]["score"] = 3
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    val = write_jsonl(tmp_path / "pairs_val.jsonl", preference_rows(4, seed=6))
    config = write_config(tmp_path, tiny_llama, train, val, task="causal_lm", training={"method": "dpo"})
    proc = rayfine("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{train}:3: preferred_output and non_preferred_output are identical" in proc.stderr
    assert f"{train}:5: input.messages must end with a user message" in proc.stderr
    assert f"{train}:7: preferred_output must be a list of exactly one assistant message" in proc.stderr
    assert f"{train}:9: unknown key(s) score" in proc.stderr
    assert "4 problem(s) in the data" in proc.stderr

    rows = preference_rows(12, seed=5)
    rows[3]["input"]["messages"][0]["content"] = "tell me " * 40  # the prompt alone fills max_seq_length
    write_jsonl(train, rows)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["max_seq_length"] = 48
    config.write_text(yaml.safe_dump(raw))
    proc = rayfine("validate", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"no target after truncation\s+1\s+0\n", proc.stdout), proc.stdout
    assert f"no target after truncation (train), first: {train}:4" in proc.stdout
    assert "1 pair(s) cut at data.max_seq_length" in proc.stdout
    from transformers import AutoTokenizer

    from training.tasks.causal_lm import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ensure_chat_template(tok)
    tokens = 0  # both outputs of every pair, each with its prompt, truncated; the cut pair left out
    for i, r in enumerate(rows):
        if i == 3:
            continue
        for key in ("preferred_output", "non_preferred_output"):
            text = tok.apply_chat_template(r["input"]["messages"] + r[key], tokenize=False)
            tokens += min(len(tok(text, add_special_tokens=False)["input_ids"]), 48)
    assert f"tokens per epoch (train, after truncation): {tokens:,}" in proc.stdout
