"""`prior serve`: cog's own HTTP server for the cog predictor, without Docker, kept in service.

    clients ──HTTP──> prior serve (this module: checks, forwards, supervises)
                        └──HTTP on 127.0.0.1──> coglet (cog's server) ──> worker (prior/predictor.py)

coglet, from the `cog` wheel, is the server a `cog build` image runs, so users get the same API:
input validation, /openapi.json, /health-check, POST /predictions. It runs here as a child
process on a private loopback port; this process sits in front of it and adds what coglet
0.23.1 lacks to stay in service:
- **Prediction ids** are checked before they reach coglet (letters, digits, '.', '_', '-', at
  most 100, starting with a letter or digit): coglet makes a folder named after the id, and an id
  with a NUL byte, a path or 300 characters failed there and kept its slot busy for good.
- **Supervision.** If coglet or its worker dies (a crash, the OOM killer, a SIGKILL), coglet
  would report UNHEALTHY and refuse every request; here it is restarted, and a valid request is
  served again once the model has loaded (seconds). Meanwhile requests get 503 with Retry-After.
  SETUP_FAILED (a bad weights file) is not restarted: the health check shows its one-line reason.
- **No leftovers.** coglet's per-prediction folders (/tmp/coglet/predictions/ID) are removed
  when a prediction has been answered, and the predictor's output folders live in a private
  temporary folder removed at exit and after a crash (one left by a server that was SIGKILLed
  is removed by the next `prior serve`).
- **Bounded requests**: the request line and headers within 64 KiB and 10 s, a body of at most
  1 MiB (413 above), one request per connection (`Connection: close`).
What `cog build` would otherwise arrange is done here too: .cog/openapi_schema.json is refreshed
from the predictor (coglet validates inputs only when it exists; it reads it from its working
folder: a checkout's root, or for an installed package `server/` in the weights folder),
COG_PREDICT_TYPE_STUB (the predictor's absolute path), PORT and COG_MAX_CONCURRENCY are set
(coglet ignores cog.yaml), this virtualenv's bin comes first on PATH (coglet starts its worker
as plain `python`), and a relative --weights is made absolute.
SIGTERM or Ctrl-C stop it: running predictions finish (up to STOP_SECONDS), then it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from urllib.parse import unquote

from . import contract
from .contract import WEIGHTS_ENV, ArgumentError
from .schema import PREDICTOR_FILE, PROJECT_ROOT, ensure_current

PREDICTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
COGLET_PREDICTIONS = Path("/tmp/coglet/predictions")  # where coglet 0.23.1 makes a folder per prediction
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to this, then refused with 413
HEAD_SECONDS = 10.0
HEALTH_SECONDS = 0.5  # how often coglet's health is polled
STOP_SECONDS = 30.0  # how long running predictions may take to finish at shutdown
DEAD = (None, "UNHEALTHY", "DEFUNCT")  # coglet's health when it or its worker is gone (None: no answer)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


def server_environment(port: int, weights: str | Path | None = None, max_concurrency: int = contract.MAX_CONCURRENCY,
                       tmpdir: Path | None = None) -> dict[str, str]:
    """The environment coglet needs to serve the predictor on `port`."""
    env = dict(os.environ)
    env["COG_PREDICT_TYPE_STUB"] = f"{PREDICTOR_FILE}:Predictor"
    env["PORT"] = str(port)
    env["COG_MAX_CONCURRENCY"] = str(max_concurrency)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
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


def serve(host: str = "127.0.0.1", port: int = 5000, weights: str | Path | None = None,
          max_concurrency: int = contract.MAX_CONCURRENCY) -> None:
    """Run the server until SIGTERM or Ctrl-C."""
    check_port_free(host, port)
    schema = server_root() / ".cog" / "openapi_schema.json"
    if ensure_current(schema):
        print(f"wrote {schema}", file=sys.stderr)
    remove_stale_folders()
    supervisor = Supervisor(host, port, weights, max_concurrency)
    asyncio.run(supervisor.run())


def server_root() -> Path:
    """coglet's working folder, where it reads .cog/openapi_schema.json: a checkout's root, else
    (an installed package) `server/` in the weights folder."""
    if (PROJECT_ROOT / "cog.yaml").is_file():
        return PROJECT_ROOT
    return contract.weights_dir() / "server"


# -- the folders a server leaves ----------------------------------------------------------------------

TEMP_PREFIX = "prior-serve-"


def remove_stale_folders() -> None:
    """Remove the temporary folders of `prior serve` processes that no longer run (SIGKILLed)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name.removeprefix(TEMP_PREFIX).split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CogletFolders:
    """coglet's folder per prediction: removed once its prediction is answered. A prediction
    answered asynchronously (202) is removed once `keep` newer ones have been, by when it
    has long finished (at most max_concurrency run at once); all at exit."""

    def __init__(self, keep: int):
        self.keep = keep
        self.later: deque[str] = deque()

    def done(self, prediction_id: str) -> None:
        shutil.rmtree(COGLET_PREDICTIONS / prediction_id, ignore_errors=True)

    def running(self, prediction_id: str) -> None:
        self.later.append(prediction_id)
        while len(self.later) > self.keep:
            self.done(self.later.popleft())

    def remove_all(self) -> None:
        while self.later:
            self.done(self.later.popleft())


# -- the supervisor and proxy ---------------------------------------------------------------------------


class Supervisor:
    """Runs coglet as a child, restarts it when it dies, and forwards checked requests to it."""

    def __init__(self, host: str, port: int, weights: str | Path | None, max_concurrency: int):
        self.host, self.port, self.max_concurrency = host, port, max_concurrency
        self.weights = weights
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
        self.coglet_port = _free_port()
        self.child: subprocess.Popen | None = None
        self.ready_for_requests = False  # coglet answers HTTP (whatever its health says)
        self.folders = CogletFolders(keep=4 * max_concurrency)
        self.stopping = asyncio.Event()
        self.wake_watch = asyncio.Event()  # check coglet's health now, not at the next poll

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        server = await asyncio.start_server(self.handle, self.host, self.port, limit=MAX_HEAD, reuse_address=True)
        print(f"prior serve: listening on http://{self.host}:{self.port} (max {self.max_concurrency} concurrent "
              "predictions)", file=sys.stderr, flush=True)
        self.start_child()
        watch = asyncio.create_task(self.watch())
        try:
            await self.stopping.wait()
        finally:
            server.close()
            watch.cancel()
            await loop.run_in_executor(None, self.stop_child)
            self.folders.remove_all()
            shutil.rmtree(self.tmp, ignore_errors=True)
            print("prior serve: stopped", file=sys.stderr, flush=True)

    # -- the child ---------------------------------------------------------------------------------

    def start_child(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # what a dead child left
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = server_environment(self.coglet_port, self.weights, self.max_concurrency, self.tmp)
        # its own process group, so that stopping it stops its worker too; and it gets SIGTERM
        # should this process die without stopping it (its worker exits when coglet does)
        self.child = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=server_root(),
                                      env=env, start_new_session=True, preexec_fn=_stop_with_parent)
        self.ready_for_requests = False

    def stop_child(self, grace: float = STOP_SECONDS) -> None:
        """SIGTERM to coglet (it finishes running predictions, then exits), SIGKILL to its group after `grace`."""
        child, self.child = self.child, None
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the worker too, if coglet left it behind
        child.wait()

    async def watch(self) -> None:
        """Restart coglet when it or its worker is dead; leave SETUP_FAILED alone."""
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake_watch.wait(), HEALTH_SECONDS)
            self.wake_watch.clear()
            status = await self.coglet_health()
            self.ready_for_requests = status is not None
            dead = self.child is None or self.child.poll() is not None or status in ("UNHEALTHY", "DEFUNCT")
            if dead and not self.stopping.is_set():
                print(f"prior serve: the model server {'exited' if status is None else 'reports ' + status}; "
                      "restarting it", file=sys.stderr, flush=True)
                self.ready_for_requests = False
                await loop.run_in_executor(None, self.stop_child, 5.0)
                self.start_child()

    async def coglet_health(self) -> str | None:
        """coglet's health status, or None when it does not answer."""
        try:
            status, _, body = await asyncio.wait_for(
                self.forward(b"GET /health-check HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""), 5)
            return json.loads(body).get("status") if status == 200 else None
        except (TimeoutError, OSError, ValueError, AttributeError):
            return None

    # -- one client connection --------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handle_request(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def handle_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
        except asyncio.LimitOverrunError:
            return await respond(writer, 431, {"detail": f"request headers: at most {MAX_HEAD} bytes"})
        except TimeoutError:
            return await respond(writer, 408, {"detail": f"request headers: not received within {HEAD_SECONDS:g} s"})
        request_line, headers = parse_head(head)
        method, _, rest = request_line.partition(" ")
        target = rest.rpartition(" ")[0]
        path = target.split("?", 1)[0]
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await respond(writer, 411, {"detail": "request body: send it with a Content-Length"})
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return await respond(writer, 400, {"detail": f"Content-Length: must be a number of bytes, got {length!r}"})
        if int(length) > MAX_BODY:
            # read (and drop) what the client is sending first, so that it gets to read the answer
            # rather than a broken pipe; a body past DRAIN_BYTES is cut off instead
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
                left = min(int(length), DRAIN_BYTES)
                async with asyncio.timeout(HEAD_SECONDS):
                    while left > 0:
                        left -= len(await reader.readexactly(min(left, 1 << 20)))
            return await respond(writer, 413, {"detail": f"request body: at most {MAX_BODY} bytes, got {int(length)}"})
        try:
            body = await asyncio.wait_for(reader.readexactly(int(length)), HEAD_SECONDS)
        except TimeoutError:
            return await respond(writer, 408, {"detail": f"request body: not received within {HEAD_SECONDS:g} s"})

        prediction_id, problem = prediction_id_of(method, path, body)
        if problem is not None:
            return await respond(writer, 422, {"detail": [{"loc": problem, "type": "value_error", "msg": (
                "must be 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit")}]})
        if not self.ready_for_requests or self.child is None:
            if path == "/health-check":
                return await respond(writer, 200, {"status": "STARTING"})
            return await respond(writer, 503, {"detail": "the model server is starting; retry shortly"},
                                 extra=b"Retry-After: 5\r\n")

        forwarded_head = f"{request_line}\r\n".encode() + b"".join(
            f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()
            if name not in HOP_BY_HOP and name != "host") + b"Host: 127.0.0.1\r\n"
        upstream = asyncio.create_task(self.forward(forwarded_head, body))
        gone = asyncio.create_task(reader.read(1))  # b"" when the client disconnects
        done, _ = await asyncio.wait({upstream, gone}, return_when=asyncio.FIRST_COMPLETED)
        if upstream not in done and gone.result() == b"":  # the client left: close coglet's connection too
            upstream.cancel()
            with contextlib.suppress(BaseException):
                await upstream
            return
        gone.cancel()
        await asyncio.wait({upstream})
        try:
            status, response_head, response_body = upstream.result()
        except (OSError, asyncio.IncompleteReadError):
            return await respond(writer, 503, {"detail": "the model server is restarting; retry shortly"},
                                 extra=b"Retry-After: 5\r\n")
        if status == 200 and answer_status(response_body) == "failed" and await self.coglet_health() in DEAD:
            # the worker died under this prediction: say so as a retryable error, and restart it now
            self.wake_watch.set()
            return await respond(writer, 503, {"detail": "the model server crashed and is restarting; retry shortly"},
                                 extra=b"Retry-After: 5\r\n")
        writer.write(response_head + response_body)
        await writer.drain()
        if method in ("POST", "PUT") and path.startswith("/predictions") and not path.endswith("/cancel"):
            answered = prediction_id or answer_id(response_body)
            if answered and PREDICTION_ID.fullmatch(answered):
                (self.folders.running if status == 202 else self.folders.done)(answered)

    async def forward(self, head: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        """Send one request to coglet; return its status, head (with Connection: close) and body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.coglet_port, limit=MAX_HEAD)
        try:
            writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
            response_line, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if "content-length" in headers:
                response_body = await reader.readexactly(int(headers["content-length"]))
            else:
                response_body = await reader.read()
            status = int(response_line.split(" ")[1])
            headers = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
            headers["content-length"] = str(len(response_body))
            response_head = f"{response_line}\r\n".encode() + b"".join(
                f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()) + b"Connection: close\r\n\r\n"
            return status, response_head, response_body
        finally:
            writer.close()


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (names lower-cased) of an HTTP/1.1 message head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def prediction_id_of(method: str, path: str, body: bytes) -> tuple[str | None, list[str] | None]:
    """The prediction id a request names (in the path of PUT /predictions/ID and
    POST /predictions/ID/cancel, or the body's "id" of POST /predictions), and where it is
    wrong (a 422 `loc`), if it is."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] == "predictions" and parts[2]:
        prediction_id = unquote(parts[2])
        bad = not PREDICTION_ID.fullmatch(prediction_id) or len(parts) > (4 if method == "POST" else 3)
        return prediction_id, (["path", "prediction_id"] if bad else None)
    if method == "POST" and path.rstrip("/") == "/predictions":
        try:
            prediction_id = json.loads(body).get("id")
        except (ValueError, AttributeError, RecursionError):
            return None, None  # coglet answers 400 or 422 for that body itself
        if prediction_id is not None and not (isinstance(prediction_id, str) and PREDICTION_ID.fullmatch(prediction_id)):
            return None, ["body", "id"]
        return prediction_id, None
    return None, None


def answer_id(body: bytes) -> str | None:
    return _answer_field(body, "id")


def answer_status(body: bytes) -> str | None:
    return _answer_field(body, "status")


def _answer_field(body: bytes, name: str) -> str | None:
    """A string field of a prediction's JSON answer, if it has one."""
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def respond(writer: asyncio.StreamWriter, status: int, payload: dict, extra: bytes = b"") -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
              422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                 .encode() + extra + b"Connection: close\r\n\r\n" + body)
    await writer.drain()


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

