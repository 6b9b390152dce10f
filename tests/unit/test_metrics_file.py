"""metrics.jsonl after a crash cut its last line short: the next record is not lost, readers skip the stub."""

from __future__ import annotations

import json

from training.driver import append_record
from training.plots import load_metrics, write_plots


def test_a_cut_line_stays_alone_and_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_record(path, {"step": 4, "loss": 0.7, "lr": 1e-4})
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # the process died mid-write
    append_record(path, {"step": 8, "loss": 0.5, "lr": 5e-5})  # the resumed run's report
    append_record(path, {"step": 8, "final": True, "eval_loss": 0.4})
    lines = path.read_text().splitlines()
    assert lines[1] == '{"step": 8, "lo' and json.loads(lines[2]) == {"step": 8, "loss": 0.5, "lr": 5e-5}
    records = load_metrics(path)
    assert sorted((r["step"], r.get("loss") or 0, bool(r.get("final"))) for r in records) == [
        (4, 0.7, False), (8, 0, True), (8, 0.5, False)]
    written = write_plots(path, tmp_path / "plots")  # the export's plots are not blocked by the stub
    assert written and all(p.stat().st_size > 0 for p in written)
