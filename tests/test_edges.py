"""Defects a new user hit at the edges (CLI, weights, batch, search, API, README), one test each.

Every failure is one line naming the argument or the file, with exit 2 for a bad argument and 1
for a bad file, and leaves the disk as it was, or complete; an interruption says which.
The commands run in this process (prior.cli.main), except where a script or a hang is the point.
"""

from __future__ import annotations

import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prior
from prior import contract, weights
from prior.cli import main
from tests.oracle import TINY

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--seed", "1", "--quiet"]
SEARCH = ["--steps", "2", "--seed", "1"]


def cli(*argv) -> int:
    """`prior ARGV` in this process; argparse's own refusals exit, and their code is returned."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that writes to the current folder by mistake writes here


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# 1. convert never overwrites its source, and writes only what loaders read


@pytest.mark.parametrize("dst", ["same", "x.bin", "x"])
def test_convert_refuses_its_source_or_a_name_nothing_reads(tiny_checkpoint, tmp_path, capsys, dst):
    source = tmp_path / "same.pth"
    source.write_bytes(tiny_checkpoint.read_bytes())
    target = source if dst == "same" else tmp_path / dst
    assert weights.main(["convert", str(source), str(target)]) == 2
    assert "argument DST:" in one_line(capsys)
    assert source.read_bytes() == tiny_checkpoint.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.pth"]


def test_convert_refuses_a_safetensors_source_as_its_own_destination(tiny_checkpoint, tmp_path, capsys):
    converted = tmp_path / "x.safetensors"
    assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert weights.main(["convert", str(converted), str(tmp_path / "." / "x.safetensors")]) == 2
    assert "argument DST: must differ from SRC" in one_line(capsys)
    assert snapshot(tmp_path) == before


# 2. an empty --out is not the current folder


@pytest.mark.parametrize("command", ["embed", "batch"])
def test_empty_out_is_refused(tiny_checkpoint, tmp_path, capsys, command):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    first = ["a cat"] if command == "embed" else ["prompts.txt"]
    assert cli(command, *first, "--weights", tiny_checkpoint, *FAST, "--out", "") == 2
    assert "argument --out: must be a folder path, got ''" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


# 3. an existing --out with an entry in the way: all or nothing, one line


def test_an_entry_in_the_way_changes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "result.json").mkdir(parents=True)
    (out / "image_embedding.npy").write_bytes(b"old")
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", out) == 1
    line = one_line(capsys)
    assert line.startswith(f"error: {out}: ") and "'result.json'" in line
    assert sorted(p.name for p in out.iterdir()) == ["image_embedding.npy", "result.json"]  # no .partial
    assert (out / "image_embedding.npy").read_bytes() == b"old"


# 4. scripts/embed.sh checks its arguments before it downloads anything


@pytest.fixture
def embed_script(tmp_path) -> tuple[Path, dict[str, str]]:
    """scripts/embed.sh in a copy of the repository's layout whose set-up step is done (this
    interpreter stands in for .venv), and an environment with no network and no weights."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "embed.sh").write_bytes((ROOT / "scripts" / "embed.sh").read_bytes())
    (root / "scripts" / "setup.sh").write_text("#!/bin/sh\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for script in ("scripts/embed.sh", "scripts/setup.sh", ".venv/bin/python"):
        (root / script).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": "http://127.0.0.1:1",
           contract.WEIGHTS_ENV: str(tmp_path / "cache" / contract.WEIGHTS_NAME)}
    return root / "scripts" / "embed.sh", env


@pytest.mark.parametrize(("arguments", "code", "says"), [
    (["--help"], 0, "usage:"),
    ([], 2, "the following arguments are required"),
    (["a cat", "--out", "o", "--weightz", "x.pth"], 2, "unrecognized arguments: --weightz"),
    (["a cat", "--out", "o", "--steps", "0"], 2, "argument --steps"),
])
def test_embed_script_downloads_nothing_for_bad_arguments(embed_script, tmp_path, arguments, code, says):
    script, env = embed_script
    done = subprocess.run([str(script), *arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert says in done.stdout + done.stderr
    assert "download" not in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_embed_script_without_network_says_how_to_get_the_weights(embed_script, tmp_path):
    script, env = embed_script
    done = subprocess.run([str(script), "a cat", "--out", "o"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download http://127.0.0.1:1/") and "pass --weights FILE" in last
    assert str(tmp_path / "cache" / contract.WEIGHTS_NAME) in last
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


# 5. an address where no Ray cluster listens fails in seconds


def test_ray_address_with_nothing_there_fails_fast(tiny_checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prior", "batch", "prompts.txt", "--weights", str(tiny_checkpoint),
                           "--out", "out", "--ray", "127.0.0.1:1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.monotonic() - started < 30
    assert done.returncode == 2
    assert done.stderr.startswith("python -m prior batch: error: argument --ray: cannot reach a Ray cluster at '127.0.0.1:1'")
    assert done.stderr.count("\n") == 1, done.stderr


# 6. shards without the manifest that says which run wrote them


def test_shards_without_a_manifest_are_refused(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    run = ["batch", "prompts.txt", "--weights", tiny_checkpoint, "--steps", "2", "--shard-size", "1", "--quiet",
           "--out", "out"]
    assert cli(*run) == 0
    (tmp_path / "out" / "batch.json").unlink()
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    assert cli(*run) == 2  # no --seed: a new one would be drawn, unlike the finished shards'
    assert "argument --out:" in (line := one_line(capsys)) and "no batch.json" in line
    assert snapshot(tmp_path / "out") == before


# 7. an interruption's message matches the disk; a sidecar always describes its file


@pytest.fixture
def interrupt_after_first_rename(monkeypatch):
    """Send `signum` to this process right after the first rename into place (os.replace or
    os.rename), where the writers hold signals back until all renames are done."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # what a terminal's Ctrl-C reaches
    armed = []

    def arm(signum):
        armed.append(signum)

    for name in ("replace", "rename"):
        real = getattr(os, name)

        def renamed(src, dst, *args, real=real, **kwargs):
            real(src, dst, *args, **kwargs)
            if armed:
                signal.raise_signal(armed.pop())

        monkeypatch.setattr(os, name, renamed)
    yield arm
    signal.signal(signal.SIGINT, previous)


def test_convert_interrupted_at_the_renames_keeps_file_and_sidecar_together(
        tiny_checkpoint, tmp_path, capsys, interrupt_after_first_rename):
    converted = tmp_path / "x.safetensors"
    interrupt_after_first_rename(signal.SIGTERM)
    assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "interrupted; the converted file and its sidecar were written\n"
    assert weights.main(["verify", str(converted)]) == 0
    assert prior.load(converted).weights_sha256 == contract.sha256_of(converted)


def test_embed_interrupted_at_the_renames_says_the_outputs_are_there(
        tiny_checkpoint, tmp_path, capsys, interrupt_after_first_rename):
    out = tmp_path / "out"
    interrupt_after_first_rename(signal.SIGINT)
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", out) == 128 + signal.SIGINT
    assert capsys.readouterr().err == f"interrupted; {out}/ holds the complete new outputs\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([*contract.RESULT_FILES, "result.json"])


# 8. one line naming the file or the argument, never a traceback


def test_a_sidecar_of_binary_bytes_names_the_sidecar(tiny_checkpoint, tmp_path, capsys):
    converted = tmp_path / "x.safetensors"
    assert weights.main(["convert", str(tiny_checkpoint), str(converted)]) == 0
    contract.sidecar_path(converted).write_bytes(bytes(range(255, -1, -1)) * 4)
    capsys.readouterr()
    assert cli("embed", "a cat", "--weights", converted, *FAST, "--out", "out") == 1
    assert one_line(capsys) == f"error: {converted}.sha256: does not hold a SHA-256 (64 hexadecimal digits)"
    assert weights.main(["verify", str(converted)]) == 1
    assert one_line(capsys) == f"error: {converted}.sha256: does not hold a SHA-256 (64 hexadecimal digits)"


def test_convert_to_an_empty_destination_is_a_bad_argument(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit) as exited:
        weights.main(["convert", str(tiny_checkpoint), ""])
    assert exited.value.code == 2
    assert one_line(capsys) == "python -m prior.weights convert: error: argument DST: must be a file path, got ''"


TIME_EMBED = "net.to_time_embeds.0.weight"


@pytest.mark.parametrize(("storage", "says"), [
    (lambda t: t.to_sparse(), "is stored sparse_coo, expected dense"),
    (lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn, expected float16, float32 or bfloat16"),
    (lambda t: t.to(torch.int16), "is int16, expected float16, float32 or bfloat16"),
], ids=["sparse", "fp8", "int"])
def test_a_tensor_stored_wrongly_is_named_as_in_the_file(tiny_checkpoint, tmp_path, capsys, storage, says):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state[TIME_EMBED] = storage(state[TIME_EMBED])
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    assert cli("embed", "a cat", "--weights", path, *FAST, "--out", "out") == 1
    assert one_line(capsys) == f"error: {path}: tensor {TIME_EMBED!r} {says}"
    assert not (tmp_path / "out").exists()


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_in_embed_is_one_line_naming_the_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(np, "save", no_space)
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", "out") == 1
    assert one_line(capsys) == "error: out: cannot write (No space left on device)"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_batch_is_one_line_naming_the_file(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    monkeypatch.setattr(np, "save", no_space)
    assert cli("batch", "prompts.txt", "--weights", tiny_checkpoint, *FAST, "--out", "out") == 1
    assert one_line(capsys) == "error: out/img_emb/img_emb_0.npy: cannot write (No space left on device)"
    assert not list((tmp_path / "out").rglob("*.npy")) and not list((tmp_path / "out").rglob("*.partial"))


@pytest.mark.parametrize("target", ["nowhere", "loop"])
def test_a_dangling_or_looping_out_link_is_a_bad_argument(tiny_checkpoint, tmp_path, capsys, target):
    (tmp_path / "link").symlink_to(tmp_path / ("link" if target == "loop" else target))
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", "link") == 2
    assert one_line(capsys) == ("prior embed: error: argument --out: must be a folder, got 'link' "
                                "(a symbolic link to nothing, or a loop)")


def test_a_manifest_that_is_not_an_object_is_named(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "batch.json").write_text("[1,2]")
    assert cli("batch", "prompts.txt", "--weights", tiny_checkpoint, *FAST, "--out", "out") == 2
    assert one_line(capsys).startswith("prior batch: error: argument --out: 'out/batch.json' is not a batch manifest "
                                       "(holds a list, not an object)")


def test_an_untrained_ivf_index_is_named(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "index").mkdir()
    faiss.write_index(faiss.IndexIVFFlat(faiss.IndexFlatIP(TINY.dim), TINY.dim, 4), str(tmp_path / "index" / "image.index"))
    assert cli("search", "a cat", "--index", "index", "--weights", tiny_checkpoint, *SEARCH) == 1
    assert one_line(capsys).startswith("error: index/image.index: ")


# 9. numbers as typed: plain ASCII decimal, shown shortened, -0 is 0


@pytest.mark.parametrize("value", ["1_0", "\u0661", " 2", "2 ", "+\u0662", "9" * 5000])
def test_only_plain_decimal_numbers(tiny_checkpoint, capsys, value):
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", "out", "--candidates", value) == 2
    line = one_line(capsys)
    assert line.startswith("prior embed: error: argument --candidates: must be an integer in 1..32, got ")
    assert len(line) < 200
    assert (repr(value) in line) if len(value) < 10 else "(5,000 characters)" in line


def test_minus_zero_is_recorded_as_zero(tiny_checkpoint, tmp_path):
    assert cli("embed", "a cat", "--weights", tiny_checkpoint, *FAST, "--out", "out", "--cond-scale", "-0") == 0
    assert '"cond_scale": 0.0,' in (tmp_path / "out" / "result.json").read_text()
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert cli("batch", "prompts.txt", "--weights", tiny_checkpoint, *FAST, "--out", "run", "--cond-scale", "-0") == 0
    assert '"cond_scale": 0.0,' in (tmp_path / "run" / "batch.json").read_text()


# 10. the Python API checks its arguments before any work


@pytest.mark.parametrize("dtype", [torch.int8, np.float32, torch.float64, "int8"])
def test_load_refuses_a_dtype_it_cannot_run(tiny_checkpoint, dtype, monkeypatch):
    monkeypatch.setattr(contract, "sha256_of", lambda *a: pytest.fail("hashed before checking the arguments"))
    with pytest.raises(ValueError, match=r"^dtype: must be one of float32, float16, bfloat16, got ") as raised:
        prior.load(tiny_checkpoint, dtype=dtype)
    assert raised.value.field == "dtype"


def test_load_refuses_a_malformed_hash_before_hashing(tiny_checkpoint, monkeypatch):
    from prior import checkpoint

    for module in (contract, checkpoint):
        monkeypatch.setattr(module, "sha256_of", lambda *a: pytest.fail("hashed before checking the arguments"))
    with pytest.raises(ValueError, match=r"^expected_sha256: must be 64 hexadecimal digits, got 'abc'$"):
        prior.load(tiny_checkpoint, expected_sha256="abc")


def test_cond_scale_takes_any_real_number_and_nothing_else(tiny_checkpoint):
    model = prior.load(tiny_checkpoint)
    half = model.embed("a cat", cond_scale=Fraction(3, 2), steps=2, seed=1)
    assert half.cond_scale == 1.5 and type(half.cond_scale) is float
    np.testing.assert_array_equal(half.image_embedding, model.embed("a cat", cond_scale=1.5, steps=2, seed=1).image_embedding)
    assert math.copysign(1, model.embed("a cat", cond_scale=-0.0, steps=2, seed=1).cond_scale) == 1
    for bad in ("1.5", 1.5j, True, float("nan"), None):
        with pytest.raises(ValueError, match=r"^cond_scale: must be a finite number in 0\.\.5, got "):
            model.embed("a cat", cond_scale=bad, steps=2, seed=1)


# 11. search shows metadata safely, and an empty index is an error


def _index(folder: Path, vectors: np.ndarray, captions: list[str]) -> None:
    folder.mkdir()
    index = faiss.IndexFlatIP(TINY.dim)
    index.add(vectors)
    faiss.write_index(index, str(folder / "image.index"))
    (folder / "metadata").mkdir()
    pq.write_table(pa.table({"caption": captions}), folder / "metadata" / "metadata_0.parquet")


def test_search_escapes_control_characters(tiny_checkpoint, tmp_path, capsys):
    vectors = np.eye(3, TINY.dim, dtype=np.float32)
    _index(tmp_path / "index", vectors, ["\x1b[31mred\x1b[0m", "bell\x07", "right-to-left \u202eevil"])
    assert cli("search", "a cat", "--index", "index", "--weights", tiny_checkpoint, *SEARCH, "--k", "3") == 0
    out = capsys.readouterr().out
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", out), repr(out)
    assert "\\x1b[31mred\\x1b[0m" in out and "bell\\x07" in out and "right-to-left \\u202eevil" in out


def test_search_of_an_empty_index_is_an_error(tiny_checkpoint, tmp_path, capsys):
    _index(tmp_path / "index", np.zeros((0, TINY.dim), np.float32), [])
    assert cli("search", "a cat", "--index", "index", "--weights", tiny_checkpoint, *SEARCH) == 1
    assert one_line(capsys) == "error: index/image.index: holds no vectors (an empty index)"
    assert capsys.readouterr().out == ""


# 12. what the README says is what the commands do

README = (ROOT / "README.md").read_text()


def test_readme_convert_dtypes_are_accepted(tiny_checkpoint, tmp_path):
    named = set(re.findall(r"convert[^`\n]*--dtype (\w+)", README))
    assert named, "the README shows convert --dtype"
    assert named <= set(weights.CONVERT_DTYPES)
    assert weights.main(["convert", str(tiny_checkpoint), str(tmp_path / "x.safetensors"), "--dtype", "bfloat16"]) == 0
    assert prior.load(tmp_path / "x.safetensors").embed("a cat", steps=2, seed=1).image_embedding.shape == (1, TINY.dim)


def test_readme_says_what_a_ray_client_address_needs():
    for paragraph in README.split("\n\n"):
        if "ray://" in paragraph:
            assert "ray[client]" in paragraph, paragraph


def test_readme_says_where_outputs_are_staged():
    assert "staged beside it" not in README
    assert "inside an existing" in README  # contract.write_folder stages in DIR itself when it exists


def test_embed_script_with_weights_downloads_nothing(embed_script, tiny_checkpoint, tmp_path):
    """The README's claim: with --weights (or an abbreviation argparse accepts) nothing is fetched."""
    assert "downloads nothing when you pass `--weights PATH`" in README
    script, env = embed_script
    done = subprocess.run([str(script), "a cat", "--weigh", str(tiny_checkpoint), "--out", "o", *FAST], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "cache").exists()
    assert stat.S_ISDIR((tmp_path / "o").stat().st_mode)
