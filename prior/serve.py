"""`python -m prior serve`: cog's own HTTP server for predict.py, without Docker.

This runs the same server a `cog build` image runs (`python -m cog.server.http`, the coglet
runtime from the `cog` wheel), so users without Docker get the exact same API: the same
input validation, /openapi.json, /health-check and POST /predictions. What `cog build`
would otherwise arrange is done here:
- .cog/openapi_schema.json is regenerated from predict.py when stale (coglet validates
  inputs only when that file exists; see prior/schema.py);
- COG_PREDICT_TYPE_STUB names the predictor and PORT the port (coglet ignores cog.yaml);
- this virtualenv's bin comes first on PATH, because coglet starts its worker as plain
  `python`;
- the working directory is the project root, where predict.py and .cog/ are;
- a relative --weights or $PRIOR_WEIGHTS is made absolute first, for that reason.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from .contract import WEIGHTS_ENV, ArgumentError
from .schema import PREDICTOR_REF, PROJECT_ROOT, SCHEMA_PATH, ensure_current


def server_environment(port: int, weights: str | Path | None = None) -> dict[str, str]:
    """The environment coglet needs to serve predict.py on `port`."""
    env = dict(os.environ)
    env["COG_PREDICT_TYPE_STUB"] = PREDICTOR_REF
    env["PORT"] = str(port)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if weights is None:
        weights = env.get(WEIGHTS_ENV) or None
    if weights is not None:  # made absolute here, where the user's relative path means something:
        env[WEIGHTS_ENV] = str(Path(weights).resolve())  # the server runs in the project root
    return env


def check_port_free(host: str, port: int) -> None:
    """Fail with one line now, rather than with a traceback from the server when it binds."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ArgumentError("host", f"must be an address of this machine, got {host!r} ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ArgumentError("port", f"must be free on {host}, got {port} ({e.strerror})") from None
            raise ArgumentError("host", f"must be an address of this machine, got {host!r} ({e.strerror})") from None


def serve(host: str = "127.0.0.1", port: int = 5000, weights: str | Path | None = None) -> None:
    """Become cog's server (exec: no wrapper process), which runs until it is stopped.
    Signals reach it directly, so SIGTERM/SIGINT shut it down cleanly, worker included."""
    check_port_free(host, port)
    env = server_environment(port, weights)
    if ensure_current(SCHEMA_PATH):
        print(f"wrote {SCHEMA_PATH.relative_to(PROJECT_ROOT)} from {PREDICTOR_REF}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(PROJECT_ROOT)
    os.execve(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", host], env)
