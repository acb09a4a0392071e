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
- the working directory is the project root, where predict.py and .cog/ are.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .schema import PREDICTOR_REF, PROJECT_ROOT, SCHEMA_PATH, ensure_current


def server_environment(port: int, weights: str | Path | None = None) -> dict[str, str]:
    """The environment coglet needs to serve predict.py on `port`."""
    env = dict(os.environ)
    env["COG_PREDICT_TYPE_STUB"] = PREDICTOR_REF
    env["PORT"] = str(port)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if weights is not None:
        env["PRIOR_WEIGHTS"] = str(Path(weights).resolve())  # predict.py reads it; the cwd changes below
    return env


def serve(host: str = "127.0.0.1", port: int = 5000, weights: str | Path | None = None) -> int:
    """Run the server until it exits or this process is told to stop. Returns its exit code."""
    if ensure_current(SCHEMA_PATH):
        print(f"wrote {SCHEMA_PATH.relative_to(PROJECT_ROOT)} from {PREDICTOR_REF}", file=sys.stderr)
    command = [sys.executable, "-m", "cog.server.http", "--host", host]
    server = subprocess.Popen(command, cwd=PROJECT_ROOT, env=server_environment(port, weights))

    def stop(signum, frame):  # pass SIGTERM/SIGINT on, so the server shuts its worker down too
        server.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return server.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
