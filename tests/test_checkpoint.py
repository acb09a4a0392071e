"""Bad weights files, each through the CLI: `python -m prior embed "a cat" --weights BAD --out DIR`.

Every one must end with exit code 1 and exactly one line on stderr that names the file and
says what is wrong, and must leave DIR uncreated. A pickle whose `__reduce__` would run code
must not run it. The files are made from a real tiny checkpoint, broken one way each.
More kinds of bad file are checked through `prior.load`, whose WeightsError is the line the
CLI prints.

The CLI runs are independent, so they run a few at a time (each spends most of its time
importing torch); each test then checks its own run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import prior
from tests.oracle import OracleShape, make_checkpoint

WRONG_SHA256 = "0" * 64
GAMMA_KEY = "net.causal_transformer.layers.0.0.norm.gamma"  # dalle2-pytorch 0.16 renamed these to .weight
FF_OUT_KEY = "net.causal_transformer.layers.1.1.5.weight"


class WritesAMarker:
    """Pickles as a call to open(marker, "w"): loading it with plain pickle would create the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Case:
    make: Callable[[Path, Path, dict], Path]  # (folder, tiny checkpoint, its state) -> the bad file
    says: tuple[str, ...]  # the message holds one of these (case-insensitive)
    extra: tuple[str, ...] = ()  # more CLI arguments


def _edited(edit: Callable[[dict], None]) -> Callable[[Path, Path, dict], Path]:
    """A maker that saves the tiny checkpoint's state after `edit` changed a copy of it."""

    def make(folder: Path, source: Path, state: dict) -> Path:
        copy = dict(state)
        edit(copy)
        path = folder / "edited.pth"
        torch.save(copy, path)
        return path

    return make


def _with_value(key: str, value: float) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        tensor = state[key].clone()
        tensor.view(-1)[tensor.numel() // 2] = value
        state[key] = tensor

    return edit


def _bytes(content: Callable[[bytes], bytes]) -> Callable[[Path, Path, dict], Path]:
    def make(folder: Path, source: Path, state: dict) -> Path:
        path = folder / "bytes.pth"
        path.write_bytes(content(source.read_bytes()))
        return path

    return make


def _overwrite_middle(data: bytes, filler: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + filler + data[middle + len(filler):]


def _missing(folder: Path, source: Path, state: dict) -> Path:
    return folder / "no-such-file.pth"


def _directory(folder: Path, source: Path, state: dict) -> Path:
    (folder / "a-directory.pth").mkdir()
    return folder / "a-directory.pth"


def _text_width_differs(folder: Path, source: Path, state: dict) -> Path:
    """CLIP text width 128 beside a prior of width 64: 0.11.5 itself cannot run this file."""
    shape = OracleShape(dim=64, depth=1, dim_head=16, heads=4, text_width=128, text_layers=1,
                        vision_width=64, vision_layers=1, image_size=28)
    return make_checkpoint(folder / "width.pth", shape, seed=3)


def _plain_pickle(obj) -> Callable[[Path, Path, dict], Path]:
    def make(folder: Path, source: Path, state: dict) -> Path:
        path = folder / "plain.pkl"
        path.write_bytes(pickle.dumps(obj(folder)))
        return path

    return make


def _torch_saved(obj) -> Callable[[Path, Path, dict], Path]:
    def make(folder: Path, source: Path, state: dict) -> Path:
        path = folder / "saved.pth"
        torch.save(obj(folder), path)
        return path

    return make


def _safetensors(edit: Callable[[bytes], bytes], keep_sidecar: bool) -> Callable[[Path, Path, dict], Path]:
    """The tiny checkpoint converted to .safetensors, then its bytes edited."""

    def make(folder: Path, source: Path, state: dict) -> Path:
        from prior.checkpoint import convert_to_safetensors

        path = convert_to_safetensors(source, folder / "converted.safetensors")
        path.write_bytes(edit(path.read_bytes()))
        if not keep_sidecar:
            path.with_name(path.name + ".sha256").unlink()
        return path

    return make


# Each through the CLI (every CLI run costs seconds of imports, so these are the main kinds).
CASES = {
    "missing": Case(_missing, ("not found", "no such file", "does not exist")),
    "empty": Case(_bytes(lambda data: b""), ("empty",)),
    "truncated": Case(_bytes(lambda data: data[: len(data) // 2]), ("truncated",)),
    "corrupted_random_bytes": Case(_bytes(lambda data: _overwrite_middle(data, random.Random(0).randbytes(4096))),
                                   ("corrupt", "nan", "checksum", "crc")),
    # bytes that decode to finite float16 values: only a checksum can tell
    "corrupted_finite_bytes": Case(_bytes(lambda data: _overwrite_middle(data, b"\x11" * 4096)),
                                   ("corrupt", "checksum", "crc")),
    "nan_in_prior": Case(_edited(_with_value("net.causal_transformer.layers.0.0.to_q.weight", float("nan"))), ("nan",)),
    "wrong_sha256": Case(_bytes(lambda data: data), ("sha-256", "sha256"), ("--sha256", WRONG_SHA256)),
    "renamed_like_0_16": Case(_edited(lambda s: s.update({GAMMA_KEY[:-5] + "weight": s.pop(GAMMA_KEY)})),
                              ("norm.weight", "norm.gamma")),
    "missing_prior_tensor": Case(_edited(lambda s: s.pop(FF_OUT_KEY)), ("missing",)),
    "wrong_shape": Case(_edited(lambda s: s.update({FF_OUT_KEY: s[FF_OUT_KEY][:, :-1].clone()})), ("shape",)),
    "text_width_differs_from_prior": Case(_text_width_differs, ("width", "shape")),
    "text_file": Case(lambda folder, source, state: _write_text(folder, "this is not a checkpoint\n"), ("not a",)),
    "dict_with_a_non_tensor": Case(_edited(lambda s: s.update({"net.config": 3})), ("not a state_dict", "tensor")),
    "malicious_reduce_torch_save": Case(_torch_saved(lambda folder: {"net.x": WritesAMarker(folder / "MARKER")}),
                                        ("refused", "code", "not a")),
    "malicious_reduce_plain_pickle": Case(_plain_pickle(lambda folder: {"net.x": WritesAMarker(folder / "MARKER")}),
                                          ("refused", "code", "not a")),
}

# More kinds, through prior.load (the CLI prints the same WeightsError message).
LOAD_CASES = {
    "directory": Case(_directory, ("not a regular file", "directory")),
    "inf_in_clip": Case(_edited(_with_value("clip.clip.transformer.resblocks.0.attn.in_proj_weight", float("inf"))),
                        ("inf",)),
    "nan_in_schedule": Case(_edited(_with_value("noise_scheduler.posterior_mean_coef1", float("nan"))), ("nan",)),
    "missing_clip_tensor": Case(_edited(lambda s: s.pop("clip.clip.ln_final.weight")), ("missing",)),
    "missing_schedule_tensor": Case(_edited(lambda s: s.pop("noise_scheduler.posterior_mean_coef2")), ("missing",)),
    # buffers the sampler does not read: the original's strict load_state_dict still demands them
    "missing_unread_schedule_tensor": Case(_edited(lambda s: s.pop("noise_scheduler.p2_loss_weight")),
                                           ("missing", "p2_loss_weight")),
    "nan_in_unread_schedule_tensor": Case(_edited(_with_value("noise_scheduler.sqrt_alphas_cumprod", float("nan"))),
                                          ("nan", "sqrt_alphas_cumprod")),
    "extra_schedule_tensor": Case(_edited(lambda s: s.update({"noise_scheduler.gammas": torch.zeros(1000)})),
                                  ("unexpected", "noise_scheduler.gammas")),
    "extra_top_level_tensor": Case(_edited(lambda s: s.update({"extra.weight": torch.zeros(3)})),
                                   ("unexpected", "extra.weight")),
    "extra_tensor_like_0_16": Case(_edited(lambda s: s.update({"net.null_text_embed": torch.zeros(1, 1, 64)})),
                                   ("net.null_text_embed",)),
    "html_error_page": Case(lambda folder, source, state: _write_text(folder, "<html><body>404 Not Found</body></html>\n"),
                            ("not a",)),
    "git_lfs_pointer": Case(lambda folder, source, state: _write_text(
        folder, "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 1354231876\n"),
        ("not a",)),
    "list_of_tensors": Case(_torch_saved(lambda folder: [torch.zeros(3)]), ("not a state_dict",)),
    "no_prior_tensors": Case(_torch_saved(lambda folder: {"model.weight": torch.zeros(3)}), ("net.",)),
    "plain_pickle_of_a_dict": Case(_plain_pickle(lambda folder: {"net.x": [1, 2, 3]}), ("not a",)),
    "safetensors_corrupted_with_sidecar": Case(_safetensors(lambda d: _overwrite_middle(d, b"\x11" * 64), True),
                                               ("sha-256", "corrupt")),
    "safetensors_truncated": Case(_safetensors(lambda d: d[: len(d) // 2], False), ("truncated", "corrupt")),
}


def _write_text(folder: Path, text: str) -> Path:
    path = folder / "text.pth"
    path.write_text(text)
    return path


@dataclass
class Run:
    weights: Path
    out: Path
    folder: Path
    returncode: int
    stdout: str
    stderr: str


def _run_cli(folder: Path, weights: Path, extra: tuple[str, ...]) -> Run:
    out = folder / "out"
    command = [sys.executable, "-m", "prior", "embed", "a cat", "--weights", str(weights), "--steps", "2",
               "--quiet", "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=folder)
    return Run(weights, out, folder, done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint) -> dict[str, Run]:
    """Every case's bad file, each in its own folder, run through the CLI a few at a time."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    jobs = {}
    for name, case in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        jobs[name] = (folder, case.make(folder, tiny_checkpoint, state), case.extra)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run_cli, *job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_weights_file_gives_exit_1_and_one_line(runs, name):
    run, case = runs[name], CASES[name]
    lines = run.stderr.splitlines()
    assert run.returncode == 1, f"exit {run.returncode}; stdout {run.stdout!r}; stderr {run.stderr!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {run.stderr!r}"
    assert str(run.weights) in lines[0], f"the line does not name the file: {lines[0]!r}"
    assert any(word in lines[0].lower() for word in case.says), f"the line does not say {case.says}: {lines[0]!r}"
    assert not run.out.exists(), "the output directory was created"
    assert not [p for p in run.folder.iterdir() if p.name.startswith(".out")], "a staging directory was left behind"


@pytest.mark.parametrize("name", list(LOAD_CASES))
def test_bad_weights_file_raises_weights_error(tmp_path, tiny_checkpoint, name):
    case = LOAD_CASES[name]
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    path = case.make(tmp_path, tiny_checkpoint, state)
    with pytest.raises(prior.WeightsError) as caught:
        prior.load(path, device="cpu")
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert any(word in message.lower() for word in case.says), f"the message does not say {case.says}: {message!r}"


def test_malicious_pickles_did_not_run(runs):
    for name in ("malicious_reduce_torch_save", "malicious_reduce_plain_pickle"):
        assert not (runs[name].folder / "MARKER").exists(), f"{name}: the pickled call ran"


def test_the_marker_pickle_would_run_if_unpickled_unsafely(tmp_path):
    """The malicious cases prove something only if their payload really works."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(WritesAMarker(marker))).close()
    assert marker.exists()


def test_the_source_checkpoint_itself_loads(tiny_checkpoint):
    """The bad files are broken copies of a good one: the good one loads, and with its SHA-256."""
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    model = prior.load(tiny_checkpoint, device="cpu", expected_sha256=digest)
    assert model.weights_sha256 == digest
