"""The product as users meet it: cog's real HTTP server (coglet) serving predict.py, started
exactly as a user without Docker would, `python -m prior serve`, on a free 127.0.0.1 port,
with tiny random checkpoints. One server per fixture (module scope): startup costs seconds."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import prior
import prior.cli

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 180  # importing torch and cog on a busy 2-core machine takes a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m prior serve` in its own process group, so stop() ends coglet and its worker too."""

    def __init__(self, weights: Path | None, log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "prior", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--weights", str(weights)] if weights is not None else []
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}  # `-m prior` from any folder
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def predict(self, inputs: dict | None = None, raw: bytes | None = None, wait_ready: bool = True) -> tuple[int, str]:
        """POST /predictions. coglet frees its one slot a moment *after* answering, so a request sent
        right after a response can meet 409 "busy" (CI saw it): by default wait for READY first, as
        a polite client does. wait_ready=False sends at once (to a busy or failed server)."""
        if wait_ready:
            assert self.is_ready(), f"server never became READY again: {self.health()}"
        return self.request("POST", "/predictions", raw if raw is not None else json.dumps({"input": inputs}).encode())

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health-check", timeout=10)[1])

    def is_ready(self, within: float = 10) -> bool:
        """READY now or soon: the slot is released a moment after a prediction's response."""
        deadline = time.monotonic() + within
        while self.health()["status"] != "READY":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def wait_for_setup(self) -> dict:
        """Poll until setup has finished, one way or the other."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                health = self.health()
                if health["status"] not in ("STARTING", "UNKNOWN"):
                    return health
            except (OSError, ValueError):  # not listening yet
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not set up after {STARTUP_SECONDS} s:\n{self.log.read_text()[-3000:]}")

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# Bad weights files: each gets its own server (see the `servers` fixture).

def _nan_checkpoint(good: Path, path: Path) -> Path:
    state = torch.load(good, weights_only=True)
    name = next(k for k, v in state.items() if k.startswith("net.") and v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, path)
    return path


def _truncated_checkpoint(good: Path, path: Path) -> Path:
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def _wrong_layout_checkpoint(good: Path, path: Path) -> Path:
    state = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("net.")}, path)  # a CLIP without its prior
    return path


BAD_FILES = {"corrupt": _nan_checkpoint, "truncated": _truncated_checkpoint, "wrong_layout": _wrong_layout_checkpoint}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """All of this module's servers, started at once so their startups overlap: one with good
    weights ("good") and one per bad file in BAD_FILES. name -> (weights path, Server)."""
    root = tmp_path_factory.mktemp("servers")
    files = {"good": tiny_checkpoint, **{name: make(tiny_checkpoint, root / f"{name}.pth") for name, make in BAD_FILES.items()}}
    started = {}
    try:
        for name, path in files.items():
            started[name] = (path, Server(path, root / f"{name}.log"))
        yield started
    finally:
        for _, running in started.values():
            running.terminate()
        for _, running in started.values():
            running.stop()


@pytest.fixture(scope="module")
def server(servers):
    running = servers["good"][1]
    health = running.wait_for_setup()
    assert health["status"] == "READY", health
    return running


def _array(data_url: str) -> np.ndarray:
    header, _, payload = data_url.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header
    return np.load(io.BytesIO(base64.b64decode(payload)), allow_pickle=False)


def _succeeded(status: int, body: str) -> dict:
    assert status == 200, body
    response = json.loads(body)
    assert response["status"] == "succeeded", response.get("error")
    return response["output"]


def test_prediction_equals_the_cli(server, tiny_checkpoint, tmp_path):
    settings = {"prompt": "a red cube on a wooden table", "candidates": 3, "cond_scale": 2.5, "steps": 12, "seed": 1234}
    output = _succeeded(*server.predict(settings))

    arrays = {name: _array(output[name]) for name in ("text_tokens", "text_embedding", "image_embedding", "candidates")}
    dim = arrays["image_embedding"].shape[1]
    assert (arrays["text_tokens"].dtype, arrays["text_tokens"].shape) == (np.int64, (1, 77))
    assert (arrays["text_embedding"].dtype, arrays["text_embedding"].shape) == (np.float32, (1, dim))
    assert (arrays["image_embedding"].dtype, arrays["image_embedding"].shape) == (np.float32, (1, dim))
    assert (arrays["candidates"].dtype, arrays["candidates"].shape) == (np.float32, (3, dim))
    assert output["seed"] == 1234 and len(output["scores"]) == 3 and 0 <= output["chosen"] < 3
    np.testing.assert_array_equal(arrays["image_embedding"][0], arrays["candidates"][output["chosen"]])

    cli = tmp_path / "cli"  # the CLI's own entry point, in this process: `python -m prior embed ...`
    assert prior.cli.main(["embed", settings["prompt"], "--weights", str(tiny_checkpoint), "--candidates", "3",
                           "--cond-scale", "2.5", "--steps", "12", "--seed", "1234", "--quiet", "--out", str(cli)]) == 0
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, np.load(cli / f"{name}.npy"), err_msg=name)
    record = json.loads((cli / "result.json").read_text())
    assert output["chosen"] == record["chosen"]
    np.testing.assert_array_equal(np.float32(output["scores"]), np.float32(record["scores"]))


def test_blank_seed_is_drawn_reported_and_reproducible(server):
    first = _succeeded(*server.predict({"prompt": "a lighthouse at dusk", "steps": 4}))
    assert 0 <= first["seed"] < 2**32
    again = _succeeded(*server.predict({"prompt": "a lighthouse at dusk", "steps": 4, "seed": first["seed"]}))
    np.testing.assert_array_equal(_array(first["image_embedding"]), _array(again["image_embedding"]))


def test_whole_number_floats_are_integers(server):
    """cog lets 4.0 through for an integer input (JSON clients write them): same as 4."""
    settings = {"prompt": "a lighthouse at dusk", "steps": 4, "candidates": 2, "seed": 42}
    as_floats = _succeeded(*server.predict({k: float(v) if k != "prompt" else v for k, v in settings.items()}))
    as_ints = _succeeded(*server.predict(settings))
    assert as_floats["seed"] == 42 and isinstance(as_floats["seed"], int)
    np.testing.assert_array_equal(_array(as_floats["candidates"]), _array(as_ints["candidates"]))


BAD_INPUTS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "  \t\n "}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "\u3000\u2028\u1680"}, "prompt"),  # whitespace to Python and the engine, not to every regex
    ({"prompt": "\x85\x1c\xa0\u2003\u2029"}, "prompt"),
    ({"prompt": "x", "candidates": 0}, "candidates"),
    ({"prompt": "x", "candidates": 33}, "candidates"),
    ({"prompt": "x", "candidates": "two"}, "candidates"),
    ({"prompt": "x", "candidates": 2.5}, "candidates"),
    ({"prompt": "x", "cond_scale": -1}, "cond_scale"),
    ({"prompt": "x", "cond_scale": 6}, "cond_scale"),
    ({"prompt": "x", "cond_scale": "NaN"}, "cond_scale"),  # JSON has no NaN: a string is the only way to send one
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 1001}, "steps"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**32}, "seed"),
    ({"prompt": "x", "guidance": "loud"}, "guidance"),
]


@pytest.mark.parametrize(("inputs", "field"), BAD_INPUTS, ids=[json.dumps(i) for i, _ in BAD_INPUTS])
def test_bad_input_is_422_naming_the_field(server, inputs, field):
    status, body = server.predict(inputs)
    assert status == 422, body
    problems = json.loads(body)["detail"]
    assert [p["loc"] for p in problems] == [["body", "input", field]], problems
    assert server.health()["status"] == "READY"


@pytest.mark.parametrize("raw", [b"not json", b'{"input": {"prompt": "x", "cond_scale": NaN}}',
                                 json.dumps({"input": {"prompt": "x", "cond_scale": math.inf}}).encode()],
                         ids=["text", "NaN", "Infinity"])
def test_body_that_is_not_json_is_400(server, raw):
    status, body = server.predict(raw=raw)
    assert status == 400, body
    assert "JSON" in body
    assert server.health()["status"] == "READY"


def test_second_prediction_while_busy_gets_409(server):
    """coglet gives a sync predict() one slot, so a request arriving while a prediction runs
    is refused with 409 rather than queued: clients retry (Replicate's queue does this)."""
    slow = {"prompt": "a slow one", "steps": 1000, "candidates": 32, "cond_scale": 2.0, "seed": 5}
    first: list[tuple[int, str]] = []
    worker = threading.Thread(target=lambda: first.append(server.predict(slow)))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while server.health()["status"] != "BUSY":
            assert time.monotonic() < deadline, "the first prediction never started"
            time.sleep(0.02)
        status, body = server.predict({"prompt": "an impatient one", "steps": 2}, wait_ready=False)
        assert status == 409, body
        assert "busy" in body.lower()
    finally:
        worker.join(timeout=300)
    output = _succeeded(*first[0])
    assert output["seed"] == 5 and _array(output["candidates"]).shape[0] == 32
    assert server.is_ready()


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    """Fuzz every operation in /openapi.json, valid and invalid inputs, from the schema alone."""
    command = [str(Path(sys.executable).parent / "st"), "run", f"{server.url}/openapi.json",
               "--checks", "not_a_server_error", "--phases", "coverage,fuzzing", "--max-examples", "30", "--seed", "1",
               "--workers", "1", "--request-timeout", "120", "--generation-database", "none", "--no-color"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "5xx" not in done.stdout
    assert server.is_ready()


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_weights_fail_setup_with_a_clear_line(servers, name):
    path, running = servers[name]
    health = running.wait_for_setup()
    assert health["status"] == "SETUP_FAILED", health
    assert health["setup"]["status"] == "failed"
    with pytest.raises(prior.WeightsError) as expected:  # the engine's own one-line message: file and problem
        prior.load(path)
    assert str(expected.value).startswith(f"{path}: ")
    assert str(expected.value) in health["setup"]["logs"]
    status, body = running.predict({"prompt": "x"}, wait_ready=False)
    assert status == 503, body
    assert running.health()["status"] == "SETUP_FAILED"


def test_serve_becomes_the_server(tiny_checkpoint, tmp_path):
    """`prior serve` execs cog's server: one process, so a signal sent to it (here SIGTERM to
    that pid alone) stops the server. Started from another folder with a relative
    $PRIOR_WEIGHTS, which means that folder's file. At shutdown the outputs folder goes too."""
    shutil.copy(tiny_checkpoint, tmp_path / "mine.pth")
    (tmp_path / "tmp").mkdir()
    running = Server(None, tmp_path / "server.log", cwd=tmp_path,
                     env={"PRIOR_WEIGHTS": "mine.pth", "TMPDIR": str(tmp_path / "tmp")})
    try:
        assert running.wait_for_setup()["status"] == "READY", running.log.read_text()[-3000:]
        assert Path(f"/proc/{running.process.pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-m", b"cog.server.http"]
        _succeeded(*running.predict({"prompt": "a cat", "steps": 2}))
        assert len(list((tmp_path / "tmp").glob("prior-outputs-*/prediction-*"))) == 1
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
    finally:
        running.stop()
    assert f"loaded {tmp_path / 'mine.pth'}" in running.log.read_text()
    assert not list((tmp_path / "tmp").glob("prior-outputs-*"))


def test_serve_on_a_busy_port_gives_exit_2_and_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "prior", "serve", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"python -m prior serve: error: argument --port: must be free on 127.0.0.1, "
                                        f"got {port} (Address already in use)"]


def test_the_readmes_python_example_works(server):
    """README.md's "From Python" block, run as written against this server."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("### From Python\n```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:5000" in code
    namespace: dict = {}
    assert server.is_ready()
    exec(compile(code.replace("http://127.0.0.1:5000", server.url), "README.md", "exec"), namespace)
    dim = namespace["image_embedding"].shape[1]
    assert namespace["image_embedding"].shape == namespace["text_embedding"].shape == (1, dim)
    assert namespace["tokens"].shape == (1, 77) and namespace["candidates"].shape == (4, dim)
    assert namespace["out"]["seed"] == 42


def test_serve_on_an_address_of_another_machine_gives_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "prior", "serve", "--host", "192.0.2.1", "--port", "5000"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # 192.0.2.1: TEST-NET-1, never local
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("python -m prior serve: error: argument --host: must be an address of this machine, "
                                  "got '192.0.2.1' (")
    assert len(done.stderr.splitlines()) == 1
