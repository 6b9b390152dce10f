"""scaling.num_workers: auto, where no Ray is needed to decide: explicit counts and resumed runs."""

from __future__ import annotations

from core.config import dump_config, load_config
from core.run_folder import RunFolder
from training.scaling import choose_workers, resolve_workers, resumed_worker_count


def config(tmp_path, workers):
    return load_config(raw={"model": {"name_or_path": "m"}, "data": {"train": str(tmp_path / "t.jsonl")},
                            "scaling": {"num_workers": workers},
                            "output": {"dir": str(tmp_path / "runs"), "name": "run"}})


def test_an_explicit_count_is_kept(tmp_path):
    cfg = config(tmp_path, 3)
    assert resolve_workers(cfg) == (cfg, choose_workers(cfg))
    assert choose_workers(cfg).count == 3 and not choose_workers(cfg).spread


def test_a_resumed_run_keeps_the_count_it_started_with(tmp_path):
    folder = RunFolder(tmp_path / "runs" / "run")
    folder.checkpoints.mkdir(parents=True)
    folder.config.write_text(dump_config(config(tmp_path, 2)))  # as the first command resolved it
    cfg, workers = resolve_workers(config(tmp_path, "auto"))
    assert cfg.scaling.num_workers == 2 and "resumed" in workers.reason
    folder.model.mkdir()  # a finished run is not resumed (the next one gets a folder of its own)
    assert resumed_worker_count(config(tmp_path, "auto")) is None
