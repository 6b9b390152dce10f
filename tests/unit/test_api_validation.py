"""Record checks of uploaded files and of a job's files: every problem names its line."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.api.validation import check_job_files, check_upload
from core.config import load_config
from tests.conftest import chat_rows, preference_rows, sentiment_rows, write_jsonl


def config(task: str = "sequence_classification", **data):
    return load_config(raw={"task": task, "model": {"name_or_path": "m"},
                            "data": {"train": "unused.jsonl", **data}})


def stored(path: Path) -> dict:
    """A ``files`` row as the store keeps it."""
    return {"id": "file-" + path.stem, "filename": path.name, "path": str(path)}


def test_a_good_file_passes_and_counts_records(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(12))
    assert check_upload(path, {"clf": config()}) == (12, None)


def test_upload_problems_name_every_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in sentiment_rows(3)]
    lines += ['{"text": "no label"}', "[1, 2]", '{"text": "x", "label": ', "", '{"text": "", "label": "pos"}']
    path.write_text("\n".join(lines) + "\n")
    records, problem = check_upload(path, {"clf": config()})
    assert records == 7  # the blank line is not a record
    assert "4 problem(s) for sequence_classification data" in problem
    assert "line 4: missing column 'label'" in problem
    assert "line 5: expected a JSON object, got list" in problem
    assert "line 6: malformed JSON" in problem
    assert "line 8: 'text' is empty" in problem


def test_bad_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    _, problem = check_upload(path, {"clf": config()})
    assert "line 2: not UTF-8 text" in problem


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert check_upload(path, {"clf": config()}) == (0, "the file has no records; upload JSON lines, one example "
                                                        "per line")


def test_with_several_tasks_a_file_must_fit_one_of_them(tmp_path):
    configs = {"clf": config(), "chat": config("causal_lm")}
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    assert check_upload(chat, configs)[1] is None  # not classification data, but good chat data
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    _, problem = check_upload(bad, configs)
    assert problem.startswith("the records fit none of the base models")
    assert "for clf (sequence_classification): line 1: missing column 'text'" in problem
    assert "for chat (causal_lm sft): line 1: no assistant message" in problem
    assert "for chat (dpo) (causal_lm dpo): line 1: training.method dpo reads preference records" in problem


def test_preference_files_upload_for_a_causal_lm_and_are_checked_by_the_job_method(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(6))
    sft_base = config("causal_lm", packing=True)
    assert check_upload(pairs, {"chat": sft_base}) == (6, None)  # a DPO job may use it
    assert "missing column 'text'" in check_upload(pairs, {"clf": config()})[1]
    rows = preference_rows(3)
    rows[1]["non_preferred_output"] = rows[1]["preferred_output"]
    rows[2]["preferred_output"][0]["role"] = "user"
    bad = write_jsonl(tmp_path / "bad_pairs.jsonl", rows)
    _, problem = check_upload(bad, {"chat": sft_base})
    assert "line 2: preferred_output and non_preferred_output are identical" in problem
    assert "line 3: preferred_output[0].role must be 'assistant'" in problem
    dpo = load_config(raw={"task": "causal_lm", "model": {"name_or_path": "m"},
                           "data": {"train": "unused.jsonl"}, "training": {"method": "dpo"}})
    assert check_job_files(dpo, stored(pairs), None) is None
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))
    problem = check_job_files(dpo, stored(chat), None)
    assert problem.param == "training_file"
    assert "line 1: training.method dpo reads preference records" in problem.message


def test_column_settings_of_the_base_config_apply(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"review": "good", "stars": "5"}, {"review": "bad", "stars": "1"}])
    assert check_upload(path, {"clf": config(text_column="review", label_column="stars")})[1] is None
    assert "missing column 'text'" in check_upload(path, {"clf": config()})[1]


def test_job_files_pass(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(40, seed=1))
    val = write_jsonl(tmp_path / "v.jsonl", sentiment_rows(8, seed=2))
    assert check_job_files(config(), stored(train), stored(val)) is None
    assert check_job_files(config(), stored(train), None) is None  # 10% held out of 40 records


def test_a_validation_label_never_trained_on_fails_naming_its_line(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(20))
    rows = sentiment_rows(3, seed=5) + [{"text": "meh", "label": "neutral"}]
    val = write_jsonl(tmp_path / "v.jsonl", rows)
    problem = check_job_files(config(), stored(train), stored(val))
    assert (problem.code, problem.param) == ("invalid_validation_file", "validation_file")
    assert "file-v (v.jsonl)" in problem.message
    assert "line 4: label 'neutral' never appears in the training file" in problem.message


def test_one_label_is_not_enough_to_train_a_classifier(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(30)])
    problem = check_job_files(config(), stored(train), None)
    assert problem.code == "invalid_training_file"
    assert "1 distinct label(s) (pos)" in problem.message


def test_a_tiny_training_file_without_validation_holds_out_nothing(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(2))
    problem = check_job_files(config(validation_split=0.01), stored(train), None)
    assert problem.code == "invalid_training_file" and "upload a validation_file" in problem.message


def test_task_checks_at_job_time_name_file_and_line(tmp_path):
    """A file accepted at upload for another base model's task is checked against the job's own task."""
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(5))
    problem = check_job_files(config(), stored(chat), None)
    assert problem.code == "invalid_training_file" and problem.param == "training_file"
    assert problem.message.startswith("The training file file-chat (chat.jsonl) is invalid: line 1: missing column")
