"""Reading and validating records, without Ray: the same functions run inside the Ray Data readers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import load_config
from core.errors import UserError
from training.data import expand_inputs, iter_raw_records, read_shard_rows, split_of
from training.tasks.base import LabelSpace, TaskAdapter


def cfg_for(train, **data):
    return load_config(raw={"model": {"name_or_path": "m"}, "data": {"train": str(train), **data}})


def rows_of(path, fmt="jsonl", **data):
    cfg = cfg_for(path, **data)
    out = []
    for chunk in read_shard_rows(str(path), fmt, cfg, carve=0.0, keep=None):
        keys = list(chunk)
        out += [dict(zip(keys, vals)) for vals in zip(*chunk.values())]
    return out


def errors_of(path, fmt="jsonl", **data):
    return [(r["_line"], r["_error"]) for r in rows_of(path, fmt, **data) if r["_error"]]


def test_expand_file_glob_folder_and_list(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "c.parquet"):
        (tmp_path / "shards" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "shards" / name).write_text("")
    (tmp_path / "shards" / "_SUCCESS").write_text("")
    folder = expand_inputs(str(tmp_path / "shards"), "auto", "data.train")
    assert [f for _, f in folder] == ["jsonl", "jsonl", "parquet"]
    assert len(expand_inputs(str(tmp_path / "shards" / "*.jsonl"), "auto", "data.train")) == 2
    both = expand_inputs([str(tmp_path / "shards" / "a.jsonl"), str(tmp_path / "shards" / "c.parquet")],
                         "auto", "data.train")
    assert [f for _, f in both] == ["jsonl", "parquet"]


def test_missing_file_names_the_key_and_path(tmp_path):
    with pytest.raises(UserError) as err:
        expand_inputs(str(tmp_path / "nope.jsonl"), "auto", "data.validation")
    assert "data.validation: no data file matches" in err.value.render()
    assert "nope.jsonl" in err.value.render()


def test_unknown_extension_asks_for_format(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UserError, match="set data.format"):
        expand_inputs(str(tmp_path / "data.txt"), "auto", "data.train")


def test_malformed_json_and_non_objects_have_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n\n{"text": "broken", \n[1, 2]\n')
    problems = [(n, p) for n, _, p in iter_raw_records(str(path), "jsonl") if p]
    assert problems[0][0] == 3 and problems[0][1].startswith("malformed JSON")
    assert problems[1] == (4, "expected a JSON object, got list")


def test_record_level_problems(tmp_path):
    path = tmp_path / "t.jsonl"
    records = [{"text": "fine", "label": "a"},
               {"body": "x", "label": "a"},
               {"text": "   ", "label": "b"},
               {"text": 42, "label": "b"},
               {"text": "no label"},
               {"text": "float label", "label": 0.5},
               {"text": "int label", "label": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    errors = dict(errors_of(path))
    assert errors[2] == "missing column 'text' (data.text_column); columns are body, label"
    assert errors[3] == "'text' is empty"
    assert errors[4] == "'text' must be a string, got int"
    assert errors[5] == "missing column 'label' (data.label_column); columns are text"
    assert "must be a string or an integer" in errors[6]
    assert 1 not in errors and 7 not in errors
    ok = [r for r in rows_of(path) if not r["_error"]]
    assert [r["label"] for r in ok] == ["a", "3"]


def test_csv_lines_count_the_header(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello,a\n,b\n")
    assert errors_of(path, "csv") == [(3, "'text' is empty")]


def test_parquet_rows_and_unreadable_shard(tmp_path):
    good = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), good)
    rows = rows_of(good, "parquet")
    assert [(r["_line"], r["label"]) for r in rows] == [(1, "0"), (2, "1")]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    [(line, problem)] = errors_of(bad, "parquet")
    assert line == 0 and problem.startswith("cannot read this file")


def test_an_empty_file_or_shard_is_named(tmp_path):
    empty = tmp_path / "part-3.jsonl"
    empty.write_text("\n\n")
    assert errors_of(empty) == [(0, "no records (an empty file or shard): remove it from the data, or fill it")]
    shard = tmp_path / "part-4.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), shard)
    assert [line for line, _ in errors_of(shard, "parquet")] == [0]
    # When train is carved into train and validation, the file is read twice: said once.
    cfg = cfg_for(empty)
    said = [r for keep in ("train", "validation") for chunk in read_shard_rows(str(empty), "jsonl", cfg, 0.1, keep)
            for r in chunk["_error"]]
    assert len(said) == 1


def test_text_pair_column_is_required_when_set(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    assert errors_of(path, text_pair_column="hypothesis") == [
        (1, "missing column 'hypothesis' (data.text_pair_column); columns are label, text")]


def test_validation_carve_is_deterministic_and_near_the_fraction():
    picks = [split_of("data/train.jsonl", n, seed=1, fraction=0.2) for n in range(1, 5001)]
    assert picks == [split_of("other/dir/train.jsonl", n, seed=1, fraction=0.2) for n in range(1, 5001)]
    share = picks.count("validation") / len(picks)
    assert 0.18 < share < 0.22
    assert picks != [split_of("data/train.jsonl", n, seed=2, fraction=0.2) for n in range(1, 5001)]
    assert split_of("x", 1, seed=1, fraction=0.0) == "train"


def test_label_space_sorts_ints_numerically():
    counts = {"10": 1, "2": 1, "1": 1}
    space = TaskAdapter.build_label_space(counts)
    assert space.names == ["1", "2", "10"] and space.label2id["10"] == 2
    assert LabelSpace.from_counts({"pos": 1, "neg": 2}, numeric=False).names == ["neg", "pos"]


def test_a_held_split_deals_equal_disjoint_shares_and_reads_them_like_a_shard():
    """What a worker reads of a small split held in the object store (training.data.HeldSplit): rank r of w gets
    rows r, r + w, ..., floor(N / w) of them (streaming_split(equal=True)'s counts); evaluation splits are whole;
    a shuffled epoch is a permutation drawn from its seed; ragged columns (token ids) keep their rows."""
    import numpy as np

    from training.data import HeldSplit, _concat

    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.arange(n) for n in (1, 2, 3)]
    ids = _concat([ragged, np.stack([np.arange(4), np.arange(4)])])  # a ragged batch, then a rectangular one
    assert ids.dtype == object and [len(x) for x in ids] == [1, 2, 3, 4, 4]
    tokens = np.empty(11, dtype=object)
    for i in range(11):
        tokens[i] = np.arange(i % 4 + 1)
    columns = {"row": np.arange(11), "input_ids": tokens}
    shares = [HeldSplit(columns, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    rows = [int(r) for s in shares for b in s.iter_batches(batch_size=2) for r in b["row"]]
    assert sorted(rows) == list(range(9)) and [int(row["row"]) for row in shares[1].take_all()] == [1, 4, 7]

    whole = HeldSplit(columns)
    plain = [int(r) for b in whole.iter_batches(batch_size=4) for r in b["row"]]
    assert plain == list(range(11))
    epoch = [[int(r) for b in whole.iter_batches(batch_size=4, local_shuffle_buffer_size=8, local_shuffle_seed=s)
              for r in b["row"]] for s in (1, 1, 2)]
    assert epoch[0] == epoch[1] != epoch[2] and sorted(epoch[0]) == plain != epoch[0]
    batch = next(whole.iter_batches(batch_size=3, local_shuffle_buffer_size=8, local_shuffle_seed=1))
    for row, tokens in zip(batch["row"], batch["input_ids"]):
        assert tokens.tolist() == list(range(int(row) % 4 + 1))
