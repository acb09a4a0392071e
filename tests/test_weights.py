"""`python -m prior.weights`: download (resumable, verified, moved into place only when whole),
verify and convert, against a stand-in for the Hugging Face Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prior import weights
from prior.weights import HF_FILENAME, HF_REPO, HF_REVISION, STAGING_NAME, WeightsFileError

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves one file the way the Hub's /resolve/ endpoint does (HEAD for metadata, GET with
    Range), and can misbehave: cut the next download halfway, then refuse further ones."""

    def __init__(self, content: bytes, revisions: tuple[str, ...] = (HF_REVISION,)):
        self.content = content
        self.revisions = revisions
        self.etag = hashlib.sha256(content).hexdigest()
        self.cut_next_download = False
        self.refuse_downloads = False
        self.ranges: list[str | None] = []  # the Range header of each GET
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _known(self) -> bool:
                if self.path in {f"/{HF_REPO}/resolve/{rev}/{HF_FILENAME}" for rev in hub.revisions}:
                    return True
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def _metadata(self, length: int, status: int = 200) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hub.etag}"')
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")

            def do_HEAD(self):
                if self._known():
                    self._metadata(len(hub.content))
                    self.end_headers()

            def do_GET(self):
                if not self._known():
                    return
                hub.ranges.append(self.headers.get("Range"))
                if hub.refuse_downloads:
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                body = hub.content[start:]
                self._metadata(len(body), 206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(hub.content) - 1}/{len(hub.content)}")
                self.end_headers()
                if hub.cut_next_download:  # promise the whole body, send half, hang up
                    hub.cut_next_download, hub.refuse_downloads = False, True
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    with FakeHub(os.urandom(300_000)) as server:
        yield server


def test_download_resumes_after_an_interrupted_run_and_verifies(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it receives in chunks of this size (10 MB): shrink it so a
    # small file is partly on disk when the connection drops, as a big one would be
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    expected = hashlib.sha256(hub.content).hexdigest()
    hub.cut_next_download = True  # the first run gets half the file, then the hub refuses
    with pytest.raises(WeightsFileError, match="cannot download"):
        weights.download(tmp_path, expected_sha256=expected, endpoint=hub.url)
    assert not (tmp_path / HF_FILENAME).exists()  # nothing half-written in place
    assert (tmp_path / STAGING_NAME).is_dir()  # partial data kept for the next run

    hub.refuse_downloads = False
    path = weights.download(tmp_path, expected_sha256=expected, endpoint=hub.url)
    assert path == tmp_path / HF_FILENAME
    assert path.read_bytes() == hub.content
    assert not (tmp_path / STAGING_NAME).exists()
    resumed_from = [int(r.removeprefix("bytes=").split("-")[0]) for r in hub.ranges if r]
    assert resumed_from and 0 < resumed_from[-1] <= len(hub.content) // 2  # the second run asked only for what was missing


def test_download_keeps_a_verified_file_without_fetching(hub, tmp_path):
    (tmp_path / HF_FILENAME).write_bytes(hub.content)
    weights.download(tmp_path, expected_sha256=hashlib.sha256(hub.content).hexdigest(), endpoint=hub.url)
    assert hub.ranges == []


def test_download_with_the_wrong_checksum_leaves_nothing(hub, tmp_path):
    with pytest.raises(WeightsFileError, match="SHA-256 is .*, expected 0{64}"):
        weights.download(tmp_path, expected_sha256="0" * 64, endpoint=hub.url)
    assert list(tmp_path.iterdir()) == []


def test_download_falls_back_to_main_when_the_pinned_short_hash_is_not_resolved(tmp_path):
    content = os.urandom(50_000)
    with FakeHub(content, revisions=("main",)) as main_only:
        path = weights.download(tmp_path, expected_sha256=hashlib.sha256(content).hexdigest(), endpoint=main_only.url)
    assert path.read_bytes() == content


def test_download_of_an_unknown_revision_names_it(hub, tmp_path):
    with pytest.raises(WeightsFileError, match="cannot download .*/resolve/0000000/"):
        weights.download(tmp_path, revision="0000000", endpoint=hub.url)
    assert list(tmp_path.iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_weights(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prior.weights", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_unreachable_hub_gives_one_line_and_exit_1(tmp_path):
    port = _free_port()  # nothing listens there: connection refused
    done = _run_weights("download", "--dest", str(tmp_path), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert f"cannot download http://127.0.0.1:{port}/{HF_REPO}/resolve/{HF_REVISION}/{HF_FILENAME}" in errors[0]
    assert "Connection refused" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_offline_mode_gives_a_clear_message(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    assert weights.main(["download", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: cannot download" in err and "offline mode is enabled" in err
    assert not (tmp_path / HF_FILENAME).exists()


def test_verify(tmp_path, capsys):
    good = tmp_path / "good.pth"
    good.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    assert weights.main(["verify", str(good), "--sha256", digest]) == 0
    assert f"{good}: OK (SHA-256 {digest})" in capsys.readouterr().out

    assert weights.main(["verify", str(good)]) == 1  # default: the published file's checksum
    assert capsys.readouterr().err == f"error: {good}: SHA-256 is {digest}, expected {weights.PRIOR_EMA_FP16_SHA256}\n"

    assert weights.main(["verify", str(tmp_path / "missing.pth")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.pth'}: file not found\n"


def test_convert_writes_a_loadable_safetensors_copy(tiny_checkpoint, tmp_path, capsys):
    import prior

    converted = tmp_path / "tiny.safetensors"
    assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 0
    assert capsys.readouterr().out == f"wrote {converted}\n"
    original, copy = prior.load(tiny_checkpoint), prior.load(converted)
    assert copy.config == original.config
    a = original.embed("a cat", steps=3, seed=1).image_embedding
    b = copy.embed("a cat", steps=3, seed=1).image_embedding
    assert (a == b).all()


def test_convert_of_a_bad_file_is_one_line(tmp_path, capsys):
    assert weights.main(["convert", str(tmp_path / "missing.pth")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.pth'}: file not found\n"
    assert list(tmp_path.iterdir()) == []
