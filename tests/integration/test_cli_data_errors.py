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
from tests.conftest import sentiment_rows, write_jsonl

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
