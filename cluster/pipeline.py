"""``rayfine run``: validate -> tune or train -> evaluate -> serve, then one sample request.

The top layer only orchestrates: it starts Ray once, then calls training and serving (imported lazily),
which meet at the exported model folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cluster.ray_start import start_ray, stop_local_ray
from cluster.serve_command import (
    ServeTarget,
    check_port_free,
    deploy_and_check,
    stopping_cleanly,
    wait_for_stop,
)
from core.config import RunConfig
from core.errors import UserError
from core.ray_connect import is_local
from core.run_folder import RunFolder


def sample_request(task: str, sample: dict) -> tuple[str, dict]:
    """The endpoint and body of a request that shows what the served model does."""
    if task == "sequence_classification":
        return "/v1/classify", {"input": sample.get("text") or "This was great!"}
    if task == "token_classification":
        tokens = sample.get("tokens") or ["Ada", "Lovelace", "lived", "in", "London"]
        return "/v1/ner", {"input": " ".join(tokens)}
    if task == "question_answering":
        return "/v1/qa", {"question": sample.get("question", "Who wrote it?"),
                          "context": sample.get("context", "It was written by Ada.")}
    messages = sample.get("messages") or [{"role": "user", "content": sample.get("prompt", "Hello!")}]
    prompt = [m for m in messages if m.get("role") != "assistant"][:2] or messages[:1]
    return "/v1/chat/completions", {"messages": prompt, "max_tokens": 32, "temperature": 0}


def first_record(cfg: RunConfig) -> dict:
    """The first validation (else train) record, read directly: one line, not the dataset."""
    from training.data import expand_inputs, iter_raw_records

    for spec in (cfg.data.validation, cfg.data.train):
        files = expand_inputs(spec, cfg.data.format, "data") if spec else []
        for path, fmt in files[:1]:
            for _, record, problem in iter_raw_records(path, fmt):
                if record is not None and problem is None:
                    return record
    return {}


def call_endpoint(url: str, path: str, body: dict, api_keys_env: str) -> dict:
    import httpx

    headers = {}
    keys = os.environ.get(api_keys_env, "")
    if keys:
        headers["Authorization"] = f"Bearer {keys.split(',')[0].strip()}"
    response = httpx.post(url + path, json=body, headers=headers, timeout=120)
    return {"status": response.status_code, "body": response.json()}


def run_all(cfg: RunConfig, address: str | None, detach: bool) -> int:
    from serving.deploy import endpoints_for, shutdown
    from training.driver import train

    started = time.time()
    check_port_free(cfg.serve, address)  # before training, not after it
    if cfg.tune.enabled:
        from training.tune import build_param_space, local_workers, tune_command

        build_param_space(cfg.tune.search_space)  # an empty search space is an error before Ray starts
        where = start_ray(address, num_workers=local_workers(cfg), serve_proxy=cfg.serve.proxy)
    else:
        from training.preflight import start_checks

        checks = start_checks(cfg, count=False)  # small local data is checked while Ray starts
        where = start_ray(address, num_workers=cfg.scaling.workers(), serve_proxy=cfg.serve.proxy)
    print(f"rayfine run: {cfg.task}, model {cfg.model.name_or_path}, on {where}", flush=True)
    print("== 1/4 validate + train ==", flush=True)
    if cfg.tune.enabled:
        model_dir = Path(tune_command(cfg, local=is_local(address)).model_dir)
    else:
        model_dir = train(cfg, checks).model_dir
    print("\n== 2/4 evaluate ==", flush=True)
    evaluation = json.loads(RunFolder(model_dir.parent).eval.read_text())
    for split, metrics in evaluation.items():
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"  {split}: {shown}")
    print("\n== 3/4 serve ==", flush=True)
    with stopping_cleanly() as stop:
        url = deploy_and_check(ServeTarget(cfg.serve, model_dir=model_dir,
                                           trust_remote_code=cfg.model.trust_remote_code), address=address)
        for path in endpoints_for(cfg.task):
            print(f"  {url}{path}")
        print("\n== 4/4 sample request ==", flush=True)
        path, body = sample_request(cfg.task, first_record(cfg))
        answer = call_endpoint(url, path, body, cfg.serve.api_keys_env)
        print(f"  POST {path} {json.dumps(body)}")
        print(f"  -> {answer['status']} {json.dumps(answer['body'])}")
        if answer["status"] != 200:
            shutdown()
            raise UserError(f"the served model answered {answer['status']} to the sample request")
        print(f"\nDone in {time.time() - started:.0f}s. Model: {model_dir}  Serving at: {url}")
        if detach:
            if is_local(address):
                print("(--detach on a local Ray instance: the server stops as this command exits; "
                      f"`rayfine serve {model_dir}` serves it again)")
                stop_local_ray()
            return 0
        wait_for_stop(stop, "Ctrl-C to stop serving")
    return stop.code
