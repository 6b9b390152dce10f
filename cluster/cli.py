"""The ``rayfine`` command line.

Each verb is a thin wrapper: parse arguments, load the typed config, call into ``training`` or ``serving``
(imported lazily, so ``rayfine --help`` and ``rayfine validate`` stay light). Exit codes: 0 ok, 1 user error
(message, no traceback), 2 usage, anything else is a bug.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster import __version__
from cluster.errors import UserError


def _add_common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", help="run config YAML (see ray_config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.epochs=3 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else start a local instance)")


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

    p = sub.add_parser("evaluate", help="metrics of an exported model on labelled data")
    _add_common(p)
    p.add_argument("--model", required=True, help="exported model folder (RUN/model)")
    p.add_argument("--data", default=None, help="labelled data (default: the config's validation data)")
    p.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="deploy a model folder (or a run config's model) on Ray Serve")
    p.add_argument("target", help="exported model folder (RUN/model) or a run config YAML")
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
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from training.preflight import run_preflight

    cfg = load_config(args.config, args.overrides)
    run_preflight(cfg, address=args.address)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from training.driver import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, address=args.address)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from training.tune import tune_command

    tune_command(load_config(args.config, args.overrides), address=args.address)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from training.evaluate import evaluate_command

    cfg = load_config(args.config, args.overrides)
    evaluate_command(cfg, Path(args.model), data=args.data, output=args.output, address=args.address)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.deploy import serve_command

    return serve_command(args.target, args.overrides, args.address, args.detach, args.config_out)


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.config import load_config
    from cluster.pipeline import run_all

    cfg = load_config(args.config, args.overrides)
    return run_all(cfg, args.address, args.detach)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
