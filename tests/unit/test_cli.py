import subprocess
import sys

from tests.conftest import REPO


def run(*args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_is_light_and_lists_the_verbs():
    code = ("import sys; from cluster.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'deepspeed', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    helptext = run("--help").stdout
    for verb in ("validate", "train", "evaluate"):
        assert verb in helptext


def test_config_errors_exit_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndata: {train: x.jsonl}\ntraining: {epochs: zero, lr: 1}\n")
    proc = run("validate", str(bad))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "training.epochs:" in proc.stderr and "training.lr: unknown key" in proc.stderr


def test_usage_errors_exit_2():
    assert run("train").returncode == 2
    assert run("frobnicate").returncode == 2


def fake_model_folder(path, model_id=None):
    """What ``rayfine serve`` reads before any weights load: config.json, rayfine.json, a weights file."""
    import json

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (path / "model.safetensors").write_bytes(b"")
    if model_id:
        (path / "rayfine.json").write_text(json.dumps({"task": "causal_lm", "model_id": model_id}))
    return path


def test_serving_several_folders_names_each_problem(tmp_path):
    from cluster.serve_command import resolve_targets

    a = fake_model_folder(tmp_path / "a" / "model", "ft:base::ftjob-1")
    b = fake_model_folder(tmp_path / "b" / "model")
    target = resolve_targets([str(tmp_path / "a"), str(b)], ["serve.max_models_per_replica=2"])
    assert target.model_dir is None and target.cfg.max_models_per_replica == 2
    assert target.models == {"ft:base::ftjob-1": a.resolve(), "model": b.resolve()}  # a run folder means its model/

    twin = fake_model_folder(tmp_path / "twin", "ft:base::ftjob-1")
    proc = run("serve", str(a), str(twin))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{twin}: its model id 'ft:base::ftjob-1' is also the id of {a.resolve()}" in proc.stderr
    proc = run("serve", str(a), str(tmp_path / "missing"))
    assert proc.returncode == 1 and f"{tmp_path / 'missing'}: not a model folder" in proc.stderr
    proc = run("serve", str(a), str(b), "--config-out", str(tmp_path / "x.yaml"))
    assert proc.returncode == 1 and "--config-out writes the Serve config of one model folder" in proc.stderr
    bad = tmp_path / "models.json"
    bad.write_text('{"models": [1]}')
    proc = run("serve", str(bad))
    assert proc.returncode == 1 and f"{bad}: not a model registry" in proc.stderr


def test_serving_a_causal_lm_with_a_cache_too_small_fails_before_ray(tiny_models, capsys):
    """The generation engine's plan is checked before Ray is asked for: the bad key is named, not a connection
    error from the (unreachable) cluster address."""
    from cluster.cli import main

    code = main(["serve", str(tiny_models["causal_lm"]), "--set", "serve.kv_cache_tokens=10",
                 "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1 and "serve.kv_cache_tokens: 10 cannot hold one sequence" in err and "Traceback" not in err, err

    # Past that check, a Jobs API address where Ray's own is needed is named with the forms that work.
    proc = run("serve", str(tiny_models["causal_lm"]), "--address", "http://127.0.0.1:9")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--address http://127.0.0.1:9 (or RAY_ADDRESS): Ray cannot join it" in proc.stderr
    assert "HOST:6379" in proc.stderr
