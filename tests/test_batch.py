"""`python -m prior batch`: the layout embedding-reader reads, the row-seed contract, independence
from batch size and input format, resumption after a killed run, Ray == one process, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prior
from prior.batch import cpu_threads_per_worker, read_prompts
from prior.checkpoint import sha256_of
from prior.cli import main

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cube on a table", "", "a photo of a cat", "   ", "an oil painting of a lighthouse",
           "émoji 🚀 rocket, tab\there", "a very long prompt " * 30, "x", "the last one"]
NON_BLANK = [p for p in PROMPTS if p.strip()]  # 7 rows: shards of 3, 3, 1
SETTINGS = ["--steps", "4", "--candidates", "2", "--seed", "7", "--shard-size", "3", "--quiet"]


def batch(*argv: str | Path) -> int:
    return main(["batch", *map(str, argv)])


def run_files(out: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def read_run(out: Path) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    img = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    text = np.concatenate([np.load(p) for p in sorted((out / "text_emb").glob("*.npy"))])
    meta = pa.concat_tables([pq.read_table(p) for p in sorted((out / "metadata").glob("*.parquet"))])
    return img, text, meta


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and steadier on a busy machine. Every run here,
    in this process, in a subprocess (OMP_NUM_THREADS, see _env) or on a Ray CPU worker with
    one core, then sums in the same order, so their files can be compared bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, prompt_file, tmp_path_factory) -> Path:
    """The run the others are compared with: text input, batch size 2."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", out, "--batch-size", "2", *SETTINGS) == 0
    return out


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return prior.load(tiny_checkpoint)


def test_layout_is_what_embedding_reader_reads(reference):
    from embedding_reader import EmbeddingReader

    assert sorted(p.name for p in (reference / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (reference / "text_emb").iterdir()) == [f"text_emb_{i}.npy" for i in range(3)]
    assert sorted(p.name for p in (reference / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    img, text, meta = read_run(reference)

    reader = EmbeddingReader(str(reference / "img_emb"), file_format="npy")
    assert (reader.count, reader.dimension) == (7, 64)
    batches = list(reader(batch_size=100, show_progress=False))
    assert len(batches) == 1 and np.array_equal(batches[0][0], img)

    reader = EmbeddingReader(str(reference / "text_emb"), file_format="parquet_npy",
                             metadata_folder=str(reference / "metadata"), meta_columns=["row", "prompt"])
    (embeddings, rows), = list(reader(batch_size=100, show_progress=False))
    assert np.array_equal(embeddings, text)
    assert rows["row"].tolist() == list(range(7)) and rows["prompt"].tolist() == NON_BLANK


def test_rows_follow_the_seed_contract(reference, model):
    img, text, meta = read_run(reference)
    assert img.dtype == text.dtype == np.float32 and img.shape == text.shape == (7, 64)
    assert meta.column("row").to_pylist() == list(range(7))
    assert meta.column("source_row").to_pylist() == [0, 2, 4, 5, 6, 7, 8]  # blank lines 1 and 3 skipped
    assert meta.column("prompt").to_pylist() == NON_BLANK
    assert meta.column("seed").to_pylist() == [7 + r for r in range(7)]
    assert meta.column("truncated").to_pylist() == [False] * 4 + [True, False, False]
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    for row in (0, 4, 6):  # one per shard: row r is embed(prompt_r, seed=run seed + r)
        alone = model.embed(NON_BLANK[row], candidates=2, steps=4, seed=7 + row)
        np.testing.assert_allclose(img[row], alone.image_embedding[0], rtol=1e-5, atol=1e-6)
        raw = text[row] * meta.column("text_norm")[row].as_py()
        np.testing.assert_allclose(raw, alone.text_embedding[0], rtol=1e-5, atol=1e-5)
        assert meta.column("chosen")[row].as_py() == int(alone.chosen[0])
        cosine = img[row] @ text[row] / np.linalg.norm(img[row])
        assert meta.column("score")[row].as_py() == pytest.approx(cosine, abs=1e-5)


def test_table_inputs_give_the_same_prompts(prompt_file, tmp_path):
    pq.write_table(pa.table({"id": list(range(len(PROMPTS))), "caption": [p or None for p in PROMPTS]}),
                   tmp_path / "prompts.parquet")
    csv_prompts = ["a red cube on a table", "", "a photo of a cat", "   ", "an oil painting of a lighthouse",
                   "émoji 🚀 rocket, tab\there", "x", "123"]
    (tmp_path / "prompts.csv").write_text("n,text\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(csv_prompts)))
    from_text = read_prompts(prompt_file)
    from_parquet = read_prompts(tmp_path / "prompts.parquet")  # the default column: caption
    assert (from_parquet.texts, from_parquet.source_rows) == (from_text.texts, from_text.source_rows)
    assert from_parquet.sha256() == from_text.sha256()
    from_csv = read_prompts(tmp_path / "prompts.csv", column="text")
    assert from_csv.texts == [p for p in csv_prompts if p.strip()] and from_csv.source_rows == [0, 2, 4, 5, 6, 7]


def test_batch_size_and_input_format_do_not_change_rows(reference, tiny_checkpoint, tmp_path):
    table = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"text": [p or None for p in PROMPTS]}), table)
    out = tmp_path / "out"
    assert batch(table, "--column", "text", "--weights", tiny_checkpoint, "--out", out, "--batch-size", "5",
                 *SETTINGS) == 0
    img, text, meta = read_run(out)
    ref_img, ref_text, ref_meta = read_run(reference)
    # Different batch shapes take different BLAS paths: equal up to float rounding, not bit for bit.
    np.testing.assert_allclose(img, ref_img, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(text, ref_text, rtol=1e-5, atol=1e-6)
    for column in ("row", "source_row", "prompt", "seed", "chosen", "truncated"):
        assert meta.column(column).to_pylist() == ref_meta.column(column).to_pylist(), column


def test_float16_embeddings(reference, prompt_file, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", out, "--batch-size", "2", "--emb-dtype", "float16",
                 *SETTINGS) == 0
    img, text, _ = read_run(out)
    ref_img, ref_text, _ = read_run(reference)
    assert img.dtype == text.dtype == np.float16
    assert np.array_equal(img, ref_img.astype(np.float16)) and np.array_equal(text, ref_text.astype(np.float16))


def test_rerun_skips_finished_shards_and_refuses_other_settings(reference, prompt_file, tiny_checkpoint, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    files = run_files(reference)
    # no --seed: the seed recorded in batch.json is reused
    settings = [a for a in SETTINGS if a not in ("--seed", "7")]
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", reference, *settings) == 0
    assert "3 finished shard(s) skipped" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and p.name != "batch.json"} == {
        p: t for p, t in before.items() if p.name != "batch.json"}

    capsys.readouterr()
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", reference, *SETTINGS, "--steps", "5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "other settings" in err and "steps: 4 there, 5 now" in err
    assert run_files(reference) == files


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "prior", "batch", *map(str, argv)]


def test_resume_after_a_killed_run(prompt_file, tiny_checkpoint, tmp_path, capsys):
    """Kill a real run once its first shard is written, leave a half-written shard behind as a
    crash between renames would, and resume: the result equals an uninterrupted run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}, a small painting" for i in range(5)) + "\n")
    settings = ["--weights", tiny_checkpoint, "--steps", "32", "--seed", "3", "--shard-size", "1", "--batch-size", "1"]
    killed = tmp_path / "killed"
    first = killed / "metadata" / "metadata_0.parquet"
    proc = subprocess.Popen(_cli(prompts, "--out", killed, *settings, "--quiet"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    finished = sorted(p.name for p in (killed / "metadata").glob("*.parquet"))
    assert 1 <= len(finished) < 5, finished
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.rglob("*_0.*")}
    # a crash between renames: the last shard's embeddings in place (truncated), its metadata not yet
    (killed / "img_emb" / "img_emb_4.npy").write_bytes(b"\x93NUMPY half")
    (killed / "text_emb" / ".text_emb_4.npy.partial").write_bytes(b"junk")

    capsys.readouterr()
    assert batch(prompts, "--out", killed, *settings, "--quiet") == 0
    assert f"{len(finished)} finished shard(s) skipped" in capsys.readouterr().out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in killed.rglob("*_0.*")} == kept
    assert not list(killed.rglob("*.partial"))

    whole = tmp_path / "whole"
    assert batch(prompts, "--out", whole, *settings, "--quiet") == 0
    assert run_files(killed) == run_files(whole)


@pytest.fixture(scope="module")
def ray_run(tiny_checkpoint, prompt_file, tmp_path_factory) -> Path:
    """One Ray run for the module (Ray takes seconds to start): 2 CPU workers on a local instance."""
    out = tmp_path_factory.mktemp("ray") / "out"
    env = {k: v for k, v in _env(RAY_USAGE_STATS_ENABLED="0").items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(_cli(prompt_file, "--weights", tiny_checkpoint, "--out", out, "--batch-size", "2",
                               *SETTINGS, "--ray", "local", "--workers", "2"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray: 2 worker(s)" in proc.stderr
    return out


def test_ray_run_writes_the_same_files(ray_run, prompt_file, tiny_checkpoint, tmp_path):
    # Ray's CPU workers get one core each here (2 workers, 2 cores), like this process (one_thread).
    out = tmp_path / "single"
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", out, "--batch-size", "2", *SETTINGS) == 0
    ray_files, single_files = run_files(ray_run), run_files(out)
    assert sorted(ray_files) == sorted(single_files)
    for name in single_files:
        assert ray_files[name] == single_files[name], name


@pytest.mark.parametrize(("node_cpus", "workers", "threads"), [
    ([2], 2, 1), ([2], 1, 2), ([8, 8], 1, 8), ([8, 8], 2, 8), ([8, 8], 3, 4), ([8, 4], 3, 4), ([2], 3, 0), ([], 1, 0)])
def test_cpu_workers_fit_on_the_nodes(node_cpus, workers, threads):
    assert cpu_threads_per_worker(node_cpus, workers) == threads


# ---- errors: one line, the right exit code, nothing written ----------------------------------


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "blank lines only", "not utf-8", "a folder", "corrupt parquet",
                                  "missing column", "number column", "column of a text file"])
def test_bad_input(case, tiny_checkpoint, tmp_path, capsys):
    path, extra = tmp_path / "prompts.txt", []
    if case == "empty":
        path.write_text("")
    elif case == "blank lines only":
        path.write_text("\n  \n\t\n")
    elif case == "not utf-8":
        path.write_bytes(b"fine\nlatin-1 caf\xe9\n")
    elif case == "a folder":
        path.mkdir()
    elif case == "corrupt parquet":
        path = tmp_path / "prompts.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
    elif case == "missing column":
        path = _parquet(tmp_path / "prompts.parquet", caption=["a", "b"], url=["u", "v"])
        extra = ["--column", "text"]
    elif case == "number column":
        path, extra = _parquet(tmp_path / "prompts.parquet", caption=[1, 2]), []
    elif case == "column of a text file":
        path.write_text("a prompt\n")
        extra = ["--column", "caption"]
    out = tmp_path / "out"
    assert batch(path, "--weights", tiny_checkpoint, "--out", out, *SETTINGS, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    expected = {"missing": "no such file", "empty": "holds no prompts", "blank lines only": "holds no prompts",
                "not utf-8": "UTF-8 text", "a folder": "must be a file", "corrupt parquet": "not a readable parquet",
                "missing column": "columns: 'caption', 'url'", "number column": "must name a text column",
                "column of a text file": "only for .parquet or .csv"}[case]
    flag = "--column" if case in ("missing column", "number column", "column of a text file") else "INPUT"
    assert f"argument {flag}: " in err and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["out is a file", "out under a file"])
def test_unwritable_out(case, prompt_file, tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = blocker if case == "out is a file" else blocker / "out"
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", out, *SETTINGS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "argument --out" in err, err
    assert blocker.read_text() == "keep me"


def test_bad_weights(prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(prompt_file, "--weights", tmp_path / "missing.pth", "--out", out, *SETTINGS) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'missing.pth'}: file not found"
    assert not out.exists()


def test_default_steps(prompt_file, tiny_checkpoint, model, tmp_path):
    """Without --steps a run takes 64 (the embed command's default) and equals the API's output."""
    out = tmp_path / "out"
    assert batch(prompt_file, "--weights", tiny_checkpoint, "--out", out, "--seed", "7", "--quiet") == 0
    assert json.loads((out / "batch.json").read_text())["steps"] == 64
    img, _, _ = read_run(out)
    alone = model.embed(NON_BLANK[0], candidates=2, steps=64, seed=7)
    np.testing.assert_allclose(img[0], alone.image_embedding[0], rtol=1e-5, atol=1e-6)


def test_manifest_records_the_run(reference, tiny_checkpoint):
    record = json.loads((reference / "batch.json").read_text())
    assert {k: record[k] for k in ("rows", "seed", "steps", "candidates", "shard_size", "emb_dtype", "dim")} == {
        "rows": 7, "seed": 7, "steps": 4, "candidates": 2, "shard_size": 3, "emb_dtype": "float32", "dim": 64}
    assert record["weights_sha256"] == sha256_of(tiny_checkpoint)
