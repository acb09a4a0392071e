"""The product as users meet it: cog's real HTTP server (coglet) serving prior/predictor.py, started
exactly as a user without Docker would, `python -m prior serve`, on a free 127.0.0.1 port,
with tiny random checkpoints. One server per fixture (module scope): startup costs seconds."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import prior
import prior.cli
from prior import contract

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 180  # importing torch and cog on a busy 2-core machine takes a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from /proc/PID/stat (its 4th field is the parent's pid)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    return children


def _children(pid: int) -> list[int]:
    return _children_by_parent().get(pid, [])


class Server:
    """`python -m prior serve` in its own process group, so stop() ends coglet and its worker too."""

    def __init__(self, weights: Path | None, log: Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "prior", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        command += ["--weights", str(weights)] if weights is not None else []
        environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}  # `-m prior` from any folder
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120,
                headers: dict[str, str] | None = None) -> tuple[int, str]:
        headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def predict(self, inputs: dict | None = None, raw: bytes | None = None, wait_ready: bool = False) -> tuple[int, str]:
        """POST /predictions, at once: the server takes up to --max-concurrency at a time.
        wait_ready=True waits for READY first (all slots free)."""
        if wait_ready:
            assert self.is_ready(), f"server never became READY again: {self.health()}"
        return self.request("POST", "/predictions", raw if raw is not None else json.dumps({"input": inputs}).encode())

    def processes(self) -> list[int]:
        """prior serve and its descendants (coglet, its worker)."""
        children = _children_by_parent()
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def worker(self) -> int:
        """The pid of coglet's Python worker (coglet is prior serve's child, the worker coglet's)."""
        (coglet,) = _children(self.process.pid)
        (worker,) = _children(coglet)
        return worker

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
    assert output["weights_layout"] == prior.load(tiny_checkpoint, device="cpu").layout
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


SLOW = {"prompt": "a slow one", "steps": 300, "candidates": 8, "cond_scale": 2.0}  # a second or more on a tiny model
LONG = {"prompt": "a long one", "steps": 1000, "candidates": 32, "cond_scale": 2.0}  # seconds on a tiny model, on any machine


def _solo(tiny_checkpoint, inputs: dict) -> prior.EmbedResult:
    model = prior.load(tiny_checkpoint, device="cpu")
    return model.embed(inputs["prompt"], candidates=inputs.get("candidates", 2), cond_scale=inputs.get("cond_scale", 1.0),
                       steps=inputs.get("steps", 64), seed=inputs["seed"], guidance=inputs.get("guidance", "original"))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _concurrently(calls: list) -> list:
    results: list = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


def test_sixteen_concurrent_clients_are_served_at_once_each_as_if_alone(server, tiny_checkpoint):
    """16 clients at once, mixed settings: every one answered 200 on the first try, each output
    equal to a solo Prior.embed call with the same arguments (1e-5 relative), sampled together."""
    requests = [{"prompt": f"prompt number {i}, " + "a lighthouse " * (i % 4), "seed": 100 + i, "steps": 8,
                 "candidates": (2, 4)[i % 2], "cond_scale": (1.0, 2.5)[(i // 2) % 2],
                 "guidance": ("original", "standard")[(i // 4) % 2]} for i in range(16)]
    answers = _concurrently([lambda r=r: server.predict(r) for r in requests])
    model = prior.load(tiny_checkpoint, device="cpu")
    for inputs, (status, body) in zip(requests, answers, strict=True):
        output = _succeeded(status, body)
        alone = model.embed(inputs["prompt"], candidates=inputs["candidates"], cond_scale=inputs["cond_scale"],
                            steps=8, seed=inputs["seed"], guidance=inputs["guidance"])
        assert output["seed"] == inputs["seed"] and output["chosen"] == int(alone.chosen[0])
        assert _relative(_array(output["candidates"]), alone.candidates[0]) < 1e-5
        assert _relative(_array(output["image_embedding"]), alone.image_embedding) < 1e-5
    batches = [int(n) for n in re.findall(r"sampled a batch of (\d+) ", server.log.read_text())]
    assert max(batches) > 1, batches  # shared passes, not one request after another


@pytest.fixture(scope="module")
def narrow_server(tiny_checkpoint, tmp_path_factory):
    """A server that takes two predictions at a time."""
    running = Server(tiny_checkpoint, tmp_path_factory.mktemp("narrow") / "server.log", args=("--max-concurrency", "2"))
    try:
        assert running.wait_for_setup()["status"] == "READY"
        yield running
    finally:
        running.stop()


def test_a_request_above_max_concurrency_gets_409(narrow_server):
    """cog answers 409 when every slot is taken; clients retry (Replicate's queue does this)."""
    slow = [lambda i=i: narrow_server.predict({**LONG, "seed": i}) for i in range(2)]
    results: list = []
    worker = threading.Thread(target=lambda: results.extend(_concurrently(slow)))
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while narrow_server.health()["status"] != "BUSY":  # both slots taken
            assert worker.is_alive() and time.monotonic() < deadline, "the two predictions never filled the slots"
            time.sleep(0.02)
        status, body = narrow_server.predict({"prompt": "an impatient one", "steps": 2})
        assert status == 409, body
        assert "busy" in body.lower()
    finally:
        worker.join(timeout=600)
    for status, body in results:
        assert _succeeded(status, body)["seed"] in (0, 1)
    assert narrow_server.is_ready()


def _cancel_one_of_a_batch(server: Server, attempt: int) -> tuple[list, bool]:
    """A first prediction holds the batcher while two more arrive, so those two queue and start
    as one batch; then one of them is cancelled. Returns the three answers, and whether the two
    really were one batch (on a busy machine the first may end before both have arrived)."""
    cancel_id, keep_id = f"cancel-me-{attempt}", f"keep-me-{attempt}"
    log_before = len(server.log.read_text())
    blocker = threading.Thread(target=lambda: answers.append(server.predict({**LONG, "seed": 5})))
    answers: list = []
    blocker.start()
    while "sampling a batch of 1 " not in server.log.read_text()[log_before:]:
        time.sleep(0.02)
    pair = _concurrently_started([
        lambda: server.request("PUT", f"/predictions/{cancel_id}", json.dumps({"input": {**LONG, "seed": 6}}).encode()),
        lambda: server.request("PUT", f"/predictions/{keep_id}", json.dumps({"input": {**LONG, "seed": 7}}).encode())])
    try:
        deadline = time.monotonic() + 300
        while True:  # the first has finished and the next batch has started
            _, finished, after = server.log.read_text()[log_before:].partition("sampled a batch of 1 ")
            if finished and "sampling a batch of " in after:
                break
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.02)
        together = "sampling a batch of 2 " in server.log.read_text()[log_before:]
        status, body = server.request("POST", f"/predictions/{cancel_id}/cancel")
        assert status == 200, body
    finally:
        blocker.join(timeout=600)
        results = pair()
    return results, together


def _concurrently_started(calls: list):
    """Start the calls on threads now; the returned function joins them and gives their results."""
    results: list = [None] * len(calls)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, calls[i]())) for i in range(len(calls))]
    for t in threads:
        t.start()

    def join() -> list:
        for t in threads:
            t.join(timeout=600)
        return results

    return join


def test_cancelling_one_prediction_of_a_batch_lets_the_other_finish(server, tiny_checkpoint):
    for attempt in range(3):
        ((cancel_status, cancelled), (keep_status, kept_body)), together = _cancel_one_of_a_batch(server, attempt)
        if together:
            break
    assert together, "the two predictions never started as one batch"
    assert cancel_status == 200 and json.loads(cancelled)["status"] == "canceled", cancelled[:300]
    output = _succeeded(keep_status, kept_body)
    assert _relative(_array(output["candidates"]), _solo(tiny_checkpoint, {**LONG, "seed": 7}).candidates[0]) < 1e-5


def test_a_client_that_disconnects_mid_prediction_takes_nothing_with_it(server):
    """The proxy closes coglet's connection as the client did; whatever cog then does with that
    prediction, the server goes on serving and frees the slot."""
    body = json.dumps({"input": {**SLOW, "seed": 9}}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(b"POST /predictions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    _succeeded(*server.predict({"prompt": "after a hang-up", "steps": 2, "seed": 1}))
    assert server.is_ready(within=120)



BAD_IDS = ["a\u0000b", "x" * 300, "/etc/prior-test-absolute", "../../prior-test-escape", "..", ".hidden", "a/b", ""]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=["nul", "300-chars", "absolute", "dot-dot", "dotdot", "dot", "slash",
                                                 "empty"])
def test_a_bad_prediction_id_is_refused_and_takes_no_slot(server, bad_id):
    body = json.dumps({"id": bad_id, "input": {"prompt": "x", "steps": 2}}).encode()
    status, answer = server.request("POST", "/predictions", body)
    assert status == 422, answer
    assert json.loads(answer)["detail"][0]["loc"] == ["body", "id"]
    if bad_id:  # in the path too (percent-encoded, as a client library sends it)
        path = "/predictions/" + urllib.parse.quote(bad_id, safe="")
        status, answer = server.request("PUT", path, json.dumps({"input": {"prompt": "x", "steps": 2}}).encode())
        assert status == 422, answer
        assert json.loads(answer)["detail"][0]["loc"] == ["path", "prediction_id"]
    assert not Path("/etc/prior-test-absolute").exists() and not Path("/tmp/prior-test-escape").exists()
    assert server.is_ready()
    _succeeded(*server.predict({"prompt": "still serving", "steps": 2, "seed": 1}))


def test_good_prediction_ids_work(server):
    for good in ("abc", "pred_18eeadb5b0370662", "A-1.b_2", "9" * 100):
        status, body = server.request("PUT", f"/predictions/{good}", json.dumps({"input": {"prompt": "x", "steps": 2}}).encode())
        assert status == 200 and json.loads(body)["id"] == good, body[:300]


def test_the_prompt_is_bounded_and_an_oversized_body_refused(server):
    status, body = server.predict({"prompt": "a" * contract.PROMPT_MAX_CHARS + "b", "steps": 2})
    assert status == 422, body[:300]
    assert [p["loc"] for p in json.loads(body)["detail"]] == [["body", "input", "prompt"]]
    _succeeded(*server.predict({"prompt": "cat " * (contract.PROMPT_MAX_CHARS // 4), "steps": 2}))
    status, body = server.predict({"prompt": "x" * 2_000_000, "steps": 2})
    assert status == 413, body[:300]
    assert "request body: at most 1048576 bytes" in body
    assert server.is_ready()


def test_a_killed_worker_is_replaced_and_serving_resumes(server):
    """SIGKILL of coglet's worker (as the OOM killer would): coglet alone would stay UNHEALTHY
    and refuse everything; prior serve restarts it, and a valid request is served within 60 s."""
    old = server.worker()
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        status, body = server.predict({"prompt": "after the crash", "steps": 2, "seed": 3})
        if status == 200:
            break
        assert status == 503 and time.monotonic() < deadline, (status, body[:300])
        time.sleep(0.5)
    _succeeded(status, body)
    assert server.worker() != old
    assert "restarting it" in server.log.read_text()


def test_folders_stay_bounded_over_two_thousand_predictions_and_go_at_shutdown(tiny_checkpoint, tmp_path):
    """coglet's folder per prediction and the predictor's output folders do not accumulate, and
    nothing of the server's is left once it has stopped."""
    (tmp_path / "tmp").mkdir()
    running = Server(tiny_checkpoint, tmp_path / "server.log", env={"TMPDIR": str(tmp_path / "tmp")})
    run = os.urandom(4).hex()  # ids of this run only: coglet's folder is shared by every server on the host
    ids = [f"bounded-{run}-{i}" for i in range(2000)]
    try:
        assert running.wait_for_setup()["status"] == "READY"

        def some(chunk):
            for prediction_id in chunk:
                body = json.dumps({"input": {"prompt": "a cat", "steps": 1, "candidates": 1, "seed": 0}}).encode()
                status, answer = running.request("PUT", f"/predictions/{prediction_id}", body)
                assert status == 200, answer[:300]

        _concurrently([lambda c=ids[k::16]: some(c) for k in range(16)])
        assert not [i for i in ids if (Path("/tmp/coglet/predictions") / i).exists()]
        outputs = list((tmp_path / "tmp").glob("prior-serve-*/prior-outputs-*/prediction-*"))
        assert 0 < len(outputs) <= predict_keep()
    finally:
        running.terminate()
        assert running.process.wait(timeout=60) == 0
    assert not list((tmp_path / "tmp").iterdir())
    assert not [pid for pid in running.processes() if pid != running.process.pid]


def predict_keep() -> int:
    from prior.predictor import OutputFolders

    return OutputFolders.KEEP


def test_the_server_samples_on_every_core(full_checkpoint, tmp_path):
    """Inside the server the CPU path uses more than one thread: the worker's CPU time over the
    wall time of a full-size prediction (best of three) is near the core count, not 1."""
    cores = min(os.cpu_count() or 1, torch.get_num_threads())
    if cores < 2:
        pytest.skip("one core here")
    running = Server(full_checkpoint, tmp_path / "server.log")
    try:
        assert running.wait_for_setup()["status"] == "READY", running.log.read_text()[-2000:]
        worker = running.worker()
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        best = 0.0
        for seed in range(3):
            cpu, wall = cpu_seconds(), time.perf_counter()
            _succeeded(*running.predict({"prompt": "a red cube", "steps": 16, "candidates": 8, "seed": seed}))
            best = max(best, (cpu_seconds() - cpu) / (time.perf_counter() - wall))
    finally:
        running.stop()
    assert best > 0.85 * cores, f"the server's worker used {best:.2f} of {cores} cores"


def test_remove_stale_folders_takes_only_those_of_dead_servers(tmp_path, monkeypatch):
    from prior import serve

    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{serve.TEMP_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{serve.TEMP_PREFIX}{os.getpid()}-def"
    other = tmp_path / "unrelated-1-2"
    for folder in (stale, live, other):
        (folder / "prior-outputs-x").mkdir(parents=True)
    serve.remove_stale_folders()
    assert not stale.exists() and live.exists() and other.exists()


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
    assert f"{path.name}: {expected.value.problem}" in health["setup"]["logs"]  # the file's name: no host paths
    assert str(path.parent) not in json.dumps(health)
    status, body = running.predict({"prompt": "x"}, wait_ready=False)
    assert status == 503, body
    assert running.health()["status"] == "SETUP_FAILED"


def test_serve_stops_cleanly_on_sigterm(tiny_checkpoint, tmp_path):
    """SIGTERM to the `prior serve` pid alone stops it, coglet and the worker, exit 0, and removes
    its temporary folder. Started from another folder with a relative $PRIOR_WEIGHTS, which means
    that folder's file; the log names the file, not the host's folders."""
    shutil.copy(tiny_checkpoint, tmp_path / "mine.pth")
    (tmp_path / "tmp").mkdir()
    running = Server(None, tmp_path / "server.log", cwd=tmp_path,
                     env={"PRIOR_WEIGHTS": "mine.pth", "TMPDIR": str(tmp_path / "tmp")})
    try:
        assert running.wait_for_setup()["status"] == "READY", running.log.read_text()[-3000:]
        _succeeded(*running.predict({"prompt": "a cat", "steps": 2}))
        assert len(list((tmp_path / "tmp").glob("prior-serve-*/prior-outputs-*/prediction-*"))) == 1
        family = running.processes()
        assert len(family) == 3  # prior serve, coglet, its worker
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=60) == 0
    finally:
        running.stop()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in family if Path(f"/proc/{pid}").exists()]
    assert "loaded mine.pth on cpu" in running.log.read_text()
    assert not list((tmp_path / "tmp").iterdir())


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
