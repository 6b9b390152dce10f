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
