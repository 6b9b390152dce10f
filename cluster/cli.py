"""The ``rayfine`` command line.

Each verb is a thin wrapper: parse arguments, load the typed config, start or join Ray (``start_ray``, the
only place that does), then call into ``training`` or ``serving`` (imported lazily, so ``rayfine --help``
stays light). The libraries log; ``cluster.console`` prints their lines. Exit codes: 0 ok, 1 user error
(message, no traceback), 2 usage, anything else is a bug.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from cluster.console import install_console
from cluster.ray_start import start_ray, stop_local_ray
from core import __version__, collector
from core.config import load_config
from core.errors import UserError
from core.ray_connect import is_local


def _add_common(p: argparse.ArgumentParser, config: bool = True, address_help: str | None = None) -> None:
    if config:
        p.add_argument("config", help="run config YAML (see ray_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.epochs=3 (repeatable)")
    p.add_argument("--address", default=None,
                   help=address_help or "Ray cluster address (default: RAY_ADDRESS, else start a local instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayfine", description="Fine-tune transformer models on Ray and serve them.")
    parser.add_argument("--version", action="version", version=f"rayfine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="pre-flight: check the config and data, print a report")
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="one training run; exports the model")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search (tune: section); exports the best trial's model")
    _add_common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics of an exported model, or of a running deployment, on labelled data")
    _add_common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="exported model folder (RUN/model)")
    which.add_argument("--endpoint", metavar="URL",
                       help="a running deployment's base URL (what rayfine serve printed): the metrics of its answers")
    p.add_argument("--api-key", default=None,
                   help="with --endpoint, when the deployment needs one (default: RAYFINE_API_KEY)")
    p.add_argument("--data", default=None, help="labelled data (default: the config's test, else validation data)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="deploy a model folder (or a run config's model, or several models) on Ray "
                                     "Serve")
    p.add_argument("target", nargs="+",
                   help="exported model folder (RUN/model) or a run config YAML; several model folders serve them "
                        "all from one app, each under its model id (loaded on demand); a models.json registry "
                        "(what rayfine api writes) serves its models")
    p.add_argument("--name", default="rayfine", help="the Serve application's name (default: rayfine)")
    _add_common(p, config=False)
    p.add_argument("--detach", action="store_true", help="return once the app is up instead of blocking")
    p.add_argument("--config-out", default=None, metavar="FILE",
                   help="write the equivalent Ray Serve config (serve deploy / RayService) and exit")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="validate -> tune or train -> evaluate -> serve, then a sample request")
    _add_common(p)
    p.add_argument("--detach", action="store_true",
                   help="return after the sample request instead of serving until Ctrl-C")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("submit", help="submit train/tune/run as a Ray job to a cluster (Ray Jobs API)")
    _add_common(p, address_help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
    p.add_argument("--command", default="train", choices=["train", "tune", "run"],
                   help="what the job runs (default: train)")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs until it ends; the exit code is the job's outcome")
    p.add_argument("--storage", default=None, metavar="DIR",
                   help="folder on the cluster for the run folder (default: the config's output.dir when it "
                        "is absolute, else RAYFINE_STORAGE, else ~/rayfine/runs on the cluster)")
    p.add_argument("--data-on-cluster", action="store_true",
                   help="the data paths exist on the cluster (a shared volume): use them as they are instead "
                        "of sending copies with the job")
    p.set_defaults(func=cmd_submit)

    for verb, text, func in (("status", "a submitted job's status", cmd_status),
                             ("stop", "stop a submitted job", cmd_stop)):
        p = sub.add_parser(verb, help=text)
        p.add_argument("job_id", help="the job id that rayfine submit printed")
        p.add_argument("--address", default=None,
                       help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
        p.set_defaults(func=func)

    p = sub.add_parser("api", help="the OpenAI-compatible fine-tuning jobs server")
    p.add_argument("configs", nargs="+", metavar="[NAME=]CONFIG",
                   help="base run configs users can fine-tune (model name: NAME, else the file's stem)")
    p.add_argument("--address", default=None,
                   help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
    p.add_argument("--data-dir", default="~/.rayfine/api", help="SQLite state and uploaded files")
    p.add_argument("--db-path", default=None, metavar="FILE",
                   help="the SQLite state file (default: DATA_DIR/api.sqlite3); local disk rather than a network "
                        "volume")
    p.add_argument("--storage", default=None, metavar="DIR",
                   help="run folders, on storage the cluster shares (default: DATA_DIR/runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-env", default="RAYFINE_API_KEYS",
                   help="env var with comma-separated API keys; unset = no authentication")
    p.add_argument("--max-upload-mb", type=int, default=512, help="largest file upload accepted")
    p.add_argument("--max-active-jobs", type=int, default=8, metavar="N",
                   help="active jobs per API key (validating, queued or running); 0 = no cap")
    p.add_argument("--driver-cpus", type=float, default=1.0, metavar="CPUS",
                   help="CPUs each job's driver reserves on the cluster, so drivers queue for CPUs instead of "
                        "piling up on the head node (0 = none)")
    p.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback --host without API keys (refused otherwise)")
    p.add_argument("--serve-url", default=None, metavar="URL",
                   help="the cluster's Ray Serve HTTP ingress, where the fine-tuned models are served (default: "
                        "http://HOST-OF---address:serve.port)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="a serve: key of the models app, e.g. --set serve.max_models_per_replica=16 (repeatable)")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="track every job's run in this MLflow store (a server http://..., or sqlite:///FILE on "
                        "storage the cluster shares): experiment rayfine-api, one run per job, tagged with the "
                        "job's fine-tuned model")
    p.add_argument("--wandb-mode", default="online", choices=["online", "offline"],
                   help="W&B mode of jobs created with integrations: [{type: wandb, ...}] (online needs "
                        "WANDB_API_KEY on the cluster; offline keeps the W&B run in the job's run folder)")
    p.add_argument("--no-models", dest="serve_models", action="store_false",
                   help="jobs only: do not deploy the models app nor answer inference requests")
    p.set_defaults(func=cmd_api)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from training.preflight import run_preflight, start_checks

    cfg = load_config(args.config, args.overrides)
    checks = start_checks(cfg)  # small local data is checked while Ray starts
    where = start_ray(args.address, num_workers=cfg.scaling.workers(), serve_proxy=cfg.serve.proxy)
    print(f"Validating {cfg.output.name} on {where} ...", flush=True)
    run_preflight(cfg, checks)
    if cfg.task == "causal_lm":
        from serving.engine import plan_for_model

        plan = plan_for_model(cfg.model.name_or_path, cfg.serve, cfg.model.trust_remote_code)
        memory = "each replica's free GPU memory caps the cache" if cfg.serve.gpus_per_replica else "on this machine"
        print(f"Serving (generation): {plan.describe()} ({memory})", flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.driver import train
    from training.preflight import start_checks

    cfg = load_config(args.config, args.overrides)
    checks = start_checks(cfg, count=False)  # small local data is checked while Ray starts
    where = start_ray(args.address, num_workers=cfg.scaling.workers(), serve_proxy=cfg.serve.proxy)
    print(f"rayfine train: {cfg.task}, model {cfg.model.name_or_path}, on {where}", flush=True)
    train(cfg, checks)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from training.tune import build_param_space, local_workers, tune_command

    cfg = load_config(args.config, args.overrides)
    build_param_space(cfg.tune.search_space)  # an empty search space is an error before Ray starts
    where = start_ray(args.address, num_workers=local_workers(cfg), serve_proxy=cfg.serve.proxy)
    print(f"rayfine tune: {cfg.task}, model {cfg.model.name_or_path}, on {where}", flush=True)
    tune_command(cfg, local=is_local(args.address))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.data import EvaluationData
    from training.evaluate import evaluate_command

    cfg = load_config(args.config, args.overrides)
    if args.endpoint:
        from cluster.evaluate_endpoint import endpoint_command, open_endpoint

        endpoint = open_endpoint(cfg, args.endpoint, args.api_key)  # a wrong URL or task fails before Ray starts
    if not EvaluationData(cfg, args.data).in_process:  # small local data is read and scored without Ray
        start_ray(args.address)
    if args.endpoint:
        endpoint_command(cfg, endpoint, data=args.data, output=args.output)
    else:
        evaluate_command(cfg, Path(args.model), data=args.data, output=args.output)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.serve_command import serve_command

    return serve_command(args.target, args.overrides, args.address, args.detach, args.config_out, args.name)


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.pipeline import run_all

    cfg = load_config(args.config, args.overrides)
    return run_all(cfg, args.address, args.detach)


def cmd_submit(args: argparse.Namespace) -> int:
    from cluster.jobs import submit_command

    cfg = load_config(args.config, args.overrides)
    return submit_command(cfg, args.config, args.overrides, args.address, args.command, args.wait, args.storage,
                          args.data_on_cluster)


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.jobs import status_command

    return status_command(args.address, args.job_id)


def cmd_stop(args: argparse.Namespace) -> int:
    from cluster.jobs import stop_command

    return stop_command(args.address, args.job_id)


def cmd_api(args: argparse.Namespace) -> int:
    from cluster.api.server import api_command

    return api_command(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_console()
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_local_ray()  # a local instance this command started ends with it, its processes stopped at once


def console() -> None:
    """The ``rayfine`` executable: ``main``, then an exit that does not collect every object torch, transformers
    and Ray created (the interpreter's exit spends about 1 s on that at the end of a training command; the
    objects are freed with the process). ``gc.freeze`` only exempts them from the cycle collector: files still
    close and exit hooks still run. The cycle collector is paused while the command starts up
    (``core.collector``)."""
    collector.pause()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
