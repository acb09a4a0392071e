"""`python -m prior embed` from outside, as a user runs it (subprocess).

Bad arguments: exit 2, one line on stderr naming the argument, its bound and the value,
nothing written. Success: the five output files with the contracted dtypes and shapes, a
complete result.json, the same numbers as the Python API, and no staging directory left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import prior

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_FILES = {"text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "candidates.npy", "result.json"}
RESULT_KEYS = {"seed", "steps", "cond_scale", "guidance", "candidates", "scores", "chosen", "truncated", "weights",
               "weights_sha256", "packed_weights", "load_seconds", "sample_seconds", "versions"}


def run_cli(*args: str, cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread, as fast and steady on a busy machine
    return subprocess.run([*prefix, sys.executable, "-m", "prior", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


# Root ignores file modes; without these capabilities it obeys them like any user.
AS_PLAIN_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                 "--inh-caps=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()


# (id, arguments replacing the defaults, words the one stderr line must hold: argument, bound, value)
BAD_ARGUMENTS = [
    ("empty_prompt", {"prompt": ""}, ("PROMPT", "non-empty", "''")),
    ("whitespace_prompt", {"prompt": " \t\n "}, ("PROMPT", "non-empty", repr(" \t\n "))),
    ("candidates_0", {"--candidates": "0"}, ("--candidates", "1..32", "0")),
    ("candidates_33", {"--candidates": "33"}, ("--candidates", "1..32", "33")),
    ("candidates_two", {"--candidates": "two"}, ("--candidates", "1..32", "two")),
    ("candidates_1.5", {"--candidates": "1.5"}, ("--candidates", "1..32", "1.5")),
    ("cond_scale_-1", {"--cond-scale": "-1"}, ("--cond-scale", "0..5", "-1")),
    ("cond_scale_6", {"--cond-scale": "6"}, ("--cond-scale", "0..5", "6")),
    ("cond_scale_nan", {"--cond-scale": "nan"}, ("--cond-scale", "0..5", "nan")),
    ("cond_scale_inf", {"--cond-scale": "inf"}, ("--cond-scale", "0..5", "inf")),
    ("cond_scale_word", {"--cond-scale": "high"}, ("--cond-scale", "0..5", "high")),
    ("steps_0", {"--steps": "0"}, ("--steps", "from 1 to the checkpoint's timesteps", "'0'")),
    ("steps_many", {"--steps": "many"}, ("--steps", "from 1 to the checkpoint's timesteps", "'many'")),
    ("steps_1001", {"--steps": "1001"}, ("--steps", "at most 1000 for this checkpoint", "1001")),
    ("seed_-1", {"--seed": "-1"}, ("--seed", "0..4294967295", "-1")),
    ("seed_2**32", {"--seed": str(2**32)}, ("--seed", "0..4294967295", str(2**32))),
    ("seed_x", {"--seed": "x"}, ("--seed", "0..4294967295", "x")),
    ("guidance", {"--guidance": "best"}, ("--guidance", "original", "standard", "best")),
    ("sampler", {"--sampler": "euler"}, ("--sampler", "ddpm", "ddim", "euler")),
    ("dtype", {"--dtype": "float64"}, ("--dtype", "float32", "bfloat16", "float64")),
    ("device", {"--device": "tpu"}, ("--device", "cpu", "cuda", "tpu")),
    ("sha256_short", {"--sha256": "abc"}, ("--sha256", "64", "abc")),
]


@pytest.mark.parametrize(("changes", "words"), [case[1:] for case in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_gives_exit_2_and_one_line(tmp_path, tiny_checkpoint, changes, words):
    arguments = {"prompt": "a cat", "--weights": str(tiny_checkpoint), "--steps": "2", "--out": str(tmp_path / "out")}
    arguments.update(changes)
    command = ["embed", arguments.pop("prompt")]
    for name, value in arguments.items():
        command += [name, value]  # "--seed -1" style: argparse takes a negative number as a value
    done = run_cli(*command, cwd=tmp_path)

    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {done.stderr!r}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_out_pointing_at_an_existing_file_gives_exit_2(tmp_path, tiny_checkpoint):
    target = tmp_path / "taken"
    target.write_text("keep me\n")
    done = run_cli("embed", "a cat", "--weights", str(tiny_checkpoint), "--steps", "2", "--out", str(target), cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and "--out" in lines[0] and str(target) in lines[0], done.stderr
    assert target.read_text() == "keep me\n"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_new_out_gets_the_umasks_mode(tmp_path, tiny_checkpoint):
    before = os.umask(0o022)  # inherited by the subprocess
    try:
        done = run_cli("embed", "a cat", "--weights", str(tiny_checkpoint), "--steps", "2", "--quiet",
                       "--out", str(tmp_path / "new"), cwd=tmp_path)
    finally:
        os.umask(before)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755


def test_an_existing_out_in_a_read_only_folder(tmp_path, tiny_checkpoint):
    """--out ~ is the usual case: the folder is writable, its parent is not. Staging beside it
    would fail after all the sampling; the files are staged inside it instead."""
    parent, out = tmp_path / "read-only", tmp_path / "read-only" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    out.chmod(0o777)
    parent.chmod(0o555)
    try:
        done = run_cli("embed", "a cat", "--weights", str(tiny_checkpoint), "--steps", "2", "--quiet",
                       "--out", str(out), cwd=tmp_path, prefix=AS_PLAIN_USER)
    finally:
        parent.chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("missing", ["prompt", "--out"])
def test_missing_required_argument_gives_exit_2(tmp_path, tiny_checkpoint, missing):
    command = ["embed", "--weights", str(tiny_checkpoint)]
    if missing != "prompt":
        command.insert(1, "a cat")
    else:
        command += ["--out", str(tmp_path / "out")]
    done = run_cli(*command, cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and missing.upper().lstrip("-") in lines[0].upper(), done.stderr
    assert list(tmp_path.iterdir()) == []


# -- success ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sha256(tiny_checkpoint) -> str:
    return hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def success(tmp_path_factory, tiny_checkpoint, tiny_sha256):
    """One successful run: 3 candidates, guided, a fixed seed, the file's SHA-256 given."""
    folder = tmp_path_factory.mktemp("success")
    out = folder / "nested" / "out"
    started = time.perf_counter()
    done = run_cli("embed", "a red cube on a table", "--weights", str(tiny_checkpoint), "--candidates", "3",
                   "--cond-scale", "2", "--steps", "10", "--seed", "7", "--sha256", tiny_sha256.upper(),
                   "--device", "cpu", "--dtype", "float32", "--quiet", "--out", str(out), cwd=folder)
    assert done.returncode == 0, done.stderr
    done.wall_seconds = time.perf_counter() - started
    return out, done


def test_success_writes_the_five_files_with_their_dtypes_and_shapes(success, tiny_checkpoint):
    out, done = success
    dim = 64  # tests.oracle.TINY.dim
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    expected = {"text_tokens.npy": ((1, 77), np.int64), "text_embedding.npy": ((1, dim), np.float32),
                "image_embedding.npy": ((1, dim), np.float32), "candidates.npy": ((3, dim), np.float32)}
    for name, (shape, dtype) in expected.items():
        array = np.load(out / name)
        assert array.shape == shape and array.dtype == dtype, name
        assert np.isfinite(array).all(), name
    assert str(out) in done.stdout


def test_success_result_json(success, tiny_checkpoint, tiny_sha256):
    out, done = success
    record = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(record), f"missing keys {RESULT_KEYS - set(record)}"
    assert (record["seed"], record["steps"], record["cond_scale"]) == (7, 10, 2.0)
    assert (record["guidance"], record["candidates"], record["truncated"]) == ("original", 3, False)
    assert record["weights"] == str(tiny_checkpoint)
    assert record["weights_sha256"] == tiny_sha256
    assert len(record["scores"]) == 3 and record["chosen"] == int(np.argmax(record["scores"]))
    # durations measured inside the run (not clock readings, not zero): parts of its wall time
    assert 0 < record["load_seconds"] and 0 < record["sample_seconds"]
    assert record["load_seconds"] + record["sample_seconds"] < done.wall_seconds
    assert record["packed_weights"] is True  # float32 on this CPU
    assert isinstance(record["versions"], dict) and {"torch", "python"} <= set(record["versions"])
    assert all(isinstance(v, str) and v for v in record["versions"].values())


def test_success_files_agree_with_each_other_and_the_api(success, tiny_checkpoint):
    out, _ = success
    record = json.loads((out / "result.json").read_text())
    image, candidates = np.load(out / "image_embedding.npy"), np.load(out / "candidates.npy")
    text = np.load(out / "text_embedding.npy")
    assert np.array_equal(image[0], candidates[record["chosen"]])
    cosines = candidates @ text[0] / np.linalg.norm(candidates, axis=1) / np.linalg.norm(text[0])
    np.testing.assert_allclose(record["scores"], cosines, rtol=0, atol=1e-5)

    api = prior.load(tiny_checkpoint, device="cpu", dtype="float32").embed(
        "a red cube on a table", candidates=3, cond_scale=2.0, steps=10, seed=7)
    assert np.array_equal(np.load(out / "text_tokens.npy"), api.tokens)
    np.testing.assert_allclose(text, api.text_embedding, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(candidates, api.candidates[0], rtol=1e-5, atol=1e-6)
    assert record["chosen"] == int(api.chosen[0])


def test_existing_out_dir_gets_the_files_and_no_staging_is_left(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    long_prompt = "a cat " * 80
    first = run_cli("embed", long_prompt, "--weights", str(tiny_checkpoint), "--steps", "3", "--seed", "1",
                    "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES | {"notes.txt"}
    assert (out / "notes.txt").read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "a staging directory was left behind"
    record = json.loads((out / "result.json").read_text())
    assert record["truncated"] is True and "truncated" in first.stdout
    assert record["weights_sha256"] is None, "no --sha256 given: a .pth is checked by its CRC-32s, not hashed"
    assert "sampling" in first.stderr, "no progress bar without --quiet"

    # a second run replaces the files in place
    image = np.load(out / "image_embedding.npy")
    second = run_cli("embed", "a dog", "--weights", str(tiny_checkpoint), "--steps", "3", "--seed", "2", "--quiet",
                     "--out", str(out), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "result.json").read_text())["seed"] == 2
    assert not np.array_equal(np.load(out / "image_embedding.npy"), image)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]



@pytest.mark.parametrize(("name", "steps", "expected"), [("short_schedule", None, 37), ("long_schedule", None, 64),
                                                          ("short_schedule", "37", 37), ("long_schedule", "1200", 1200)])
def test_steps_follow_the_checkpoints_schedule(schedule_checkpoints, tmp_path, name, steps, expected):
    """--steps defaults to 64, or all of a shorter schedule, and goes up to the checkpoint's timesteps."""
    out = tmp_path / "out"
    done = run_cli("embed", "a cat", "--weights", str(schedule_checkpoints[name]), "--seed", "3", "--quiet",
                   "--out", str(out), *(["--steps", steps] if steps else []), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["steps"] == expected


def test_steps_beyond_a_short_schedule_give_exit_2(schedule_checkpoints, tmp_path):
    done = run_cli("embed", "a cat", "--weights", str(schedule_checkpoints["short_schedule"]), "--steps", "38",
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["python -m prior embed: error: argument --steps: must be at most 37 for this "
                                        "checkpoint, got 38"]
    assert list(tmp_path.iterdir()) == []


def test_the_embed_script_works_from_any_folder(tiny_checkpoint, tmp_path):
    """scripts/embed.sh, the README's one command: relative --weights and --out mean the
    caller's folder, and with --weights given nothing is downloaded."""
    shutil.copy(tiny_checkpoint, tmp_path / "mine.pth")
    done = subprocess.run([str(ROOT / "scripts" / "embed.sh"), "a cat", "--weights", "mine.pth", "--steps", "2",
                           "--seed", "1", "--quiet", "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUT_FILES
    assert json.loads((tmp_path / "out" / "result.json").read_text())["weights"] == "mine.pth"
