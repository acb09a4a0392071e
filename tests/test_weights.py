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


def test_offline_download_removes_the_folder_it_created(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    dest = tmp_path / "new" / "weights"
    assert weights.main(["download", "--dest", str(dest)]) == 1
    assert "offline mode is enabled" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither weights/ nor new/ is left


def test_download_keeps_a_folder_that_was_already_there(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert weights.main(["download", "--dest", str(tmp_path)]) == 1
    assert tmp_path.is_dir()


def _convert(checkpoint: Path, converted: Path) -> Path:
    assert weights.main(["convert", str(checkpoint), str(converted)]) == 0
    return converted


def _flip_a_byte_in_place(path: Path) -> None:
    """Same size, inode and mtime: only hashing the content can tell."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_verify_checks_a_converted_file_against_its_sidecar(tiny_checkpoint, tmp_path, capsys):
    import prior

    converted = _convert(tiny_checkpoint, tmp_path / "tiny.safetensors")
    digest = hashlib.sha256(converted.read_bytes()).hexdigest()
    capsys.readouterr()
    assert weights.main(["verify", str(converted)]) == 0
    assert capsys.readouterr().out == (f"{converted}: OK (SHA-256 {digest}); "
                                       "layout: dalle2-pytorch 0.11.5 network, converted from a state dict\n")

    prior.load(converted, device="cpu")  # leaves a .verified stamp, which verify must not trust
    _flip_a_byte_in_place(converted)
    assert weights.main(["verify", str(converted)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {converted}: SHA-256 is ")
    assert f"expected {digest} (from tiny.safetensors.sha256): corrupted" in err


def test_verify_of_a_converted_file_without_a_sidecar_says_so(tiny_checkpoint, tmp_path, capsys):
    converted = _convert(tiny_checkpoint, tmp_path / "tiny.safetensors")
    digest = hashlib.sha256(converted.read_bytes()).hexdigest()
    sidecar = converted.with_name("tiny.safetensors.sha256")
    sidecar.write_text("not a hash\n")
    capsys.readouterr()
    assert weights.main(["verify", str(converted)]) == 1
    assert capsys.readouterr().err == f"error: {sidecar}: does not hold a SHA-256 (64 hexadecimal digits)\n"

    sidecar.unlink()
    assert weights.main(["verify", str(converted)]) == 1
    assert capsys.readouterr().err == (f"error: {converted}: no tiny.safetensors.sha256 sidecar to check it against "
                                       "(convert writes one; or give --sha256 HEX)\n")
    assert weights.main(["verify", str(converted), "--sha256", digest.upper()]) == 0  # an explicit hash needs none


@pytest.mark.parametrize("value", ["xyz", "abc", "0" * 63, "g" * 64, ""])
def test_verify_refuses_a_malformed_sha256_with_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exited:
        weights.main(["verify", str(tmp_path / "any.pth"), "--sha256", value])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (f"python -m prior.weights verify: error: argument --sha256: "
                                       f"must be 64 hexadecimal digits, got {value!r}\n")


def test_convert_creates_the_destination_folder(tiny_checkpoint, tmp_path, capsys):
    converted = tmp_path / "no dir" / "deeper" / "x.safetensors"
    assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 0
    assert capsys.readouterr().out == f"wrote {converted}\n"
    assert weights.main(["verify", str(converted)]) == 0


def test_convert_to_an_impossible_folder_is_one_line(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "a file").write_text("")
    assert weights.main(["convert", str(tiny_checkpoint), str(tmp_path / "a file" / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'a file'}: cannot create the folder (") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a file"]


def _fail_while_hashing_the_partial(monkeypatch, fail) -> list[bool]:
    """Make convert fail once the .partial file is written; returns whether it was there."""
    from prior import checkpoint

    seen, real = [], checkpoint.sha256_of

    def sha256_of(path, *args):
        if str(path).endswith(".safetensors.partial"):
            seen.append(Path(path).is_file())
            fail()
        return real(path, *args)

    monkeypatch.setattr(checkpoint, "sha256_of", sha256_of)
    return seen


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_convert_interrupted_by_ctrl_c_leaves_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch, signum):
    import signal

    signum = getattr(signal, signum)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a terminal's Ctrl-C reaches
    try:
        seen = _fail_while_hashing_the_partial(monkeypatch, lambda: signal.raise_signal(signum))
        assert weights.main(["convert", str(tiny_checkpoint), str(tmp_path / "new" / "x.safetensors")]) == 128 + signum
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() put the default back
    assert seen == [True]
    assert capsys.readouterr().err == "interrupted; nothing was written\n"
    assert list(tmp_path.iterdir()) == []  # no .partial, no sidecar, not even the folder


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError(28, "No space left on device")])
def test_convert_that_fails_leaves_nothing(tiny_checkpoint, tmp_path, capsys, monkeypatch, error):
    def fail():
        raise error

    seen = _fail_while_hashing_the_partial(monkeypatch, fail)
    converted = tmp_path / "x.safetensors"
    if isinstance(error, OSError):
        assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 1
        assert capsys.readouterr().err == f"error: {converted}: cannot write the converted file (No space left on device)\n"
    else:
        with pytest.raises(RuntimeError, match="boom"):
            weights.main(["convert", str(tiny_checkpoint), str(converted)])
    assert seen == [True]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["hello\n", "<html><body>404 Not Found</body></html>\n",
                                  "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\n"])
def test_a_file_that_is_not_a_torch_checkpoint_says_so(tmp_path, capsys, text):
    """torch's unpickler read "he" as the opcode BINGET of memo entry 101 and failed with KeyError: 101."""
    path = tmp_path / "x.pth"
    path.write_text(text)
    assert weights.main(["convert", str(path)]) == 1
    first_line = text.splitlines()[0][:40]
    assert capsys.readouterr().err == (f"error: {path}: not a PyTorch checkpoint (neither a zip archive nor a legacy "
                                       f"torch file); it starts with {first_line!r}\n")


def test_a_legacy_format_checkpoint_still_loads(tiny_checkpoint, tmp_path):
    import torch

    import prior

    legacy = tmp_path / "legacy.pth"
    torch.save(torch.load(tiny_checkpoint, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert not legacy.read_bytes().startswith(b"PK")
    assert prior.load(legacy, device="cpu").config == prior.load(tiny_checkpoint, device="cpu").config
