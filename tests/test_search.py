"""`python -m prior search` on a synthetic clip-retrieval index: image.index + metadata/*.parquet."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prior
from prior.cli import main
from tests.oracle import TINY

PROMPT, SEED, STEPS = "a red cube on a wooden table", 11, 4
COUNT, IMAGE_ID, TEXT_ID = 40, 17, 29  # where the prompt's own embeddings are planted


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def write_index(folder: Path, vectors: np.ndarray, metadata_splits: tuple[int, ...] = (0, 20, COUNT)) -> Path:
    """An inner-product index over normalised vectors and its metadata in several files, as
    clip-retrieval's `clip index` leaves them."""
    folder.mkdir(parents=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(folder / "image.index"))
    (folder / "metadata").mkdir()
    for n, (start, stop) in enumerate(zip(metadata_splits, metadata_splits[1:], strict=False)):
        pq.write_table(pa.table({"caption": [f"item {i}" for i in range(start, stop)],
                                 "url": [f"https://example.com/{i}.jpg" for i in range(start, stop)],
                                 "width": [float("nan") if i == IMAGE_ID else 256.0 for i in range(start, stop)]}),
                       folder / "metadata" / f"metadata_{n}.parquet")
    return folder


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """What the prompt embeds to, computed through the Python API."""
    return prior.load(tiny_checkpoint).embed(PROMPT, candidates=2, steps=STEPS, seed=SEED)


@pytest.fixture(scope="module")
def vectors(expected) -> np.ndarray:
    vectors = unit(np.random.default_rng(0).standard_normal((COUNT, TINY.dim)))
    vectors[IMAGE_ID] = unit(expected.image_embedding[0])
    vectors[TEXT_ID] = unit(expected.text_embedding[0])
    return vectors


@pytest.fixture(scope="module")
def index_folder(vectors, tmp_path_factory) -> Path:
    return write_index(tmp_path_factory.mktemp("index") / "laion-like", vectors)


def search(*argv) -> int:
    return main(["search", *map(str, argv)])


def top(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    scores = vectors @ unit(query)
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order]


def test_json_finds_the_planted_embeddings(index_folder, vectors, expected, tiny_checkpoint, capsys):
    assert search(PROMPT, "--index", index_folder, "--k", "5", "--json", "--text-too", "--weights", tiny_checkpoint,
                  "--steps", STEPS, "--seed", SEED) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["seed"], report["metric"], report["index_count"], report["k"]) == (SEED, "inner_product", COUNT, 5)
    for name, planted, embedding in (("image_query", IMAGE_ID, expected.image_embedding[0]),
                                     ("text_query", TEXT_ID, expected.text_embedding[0])):
        hits = report[name]
        ids, scores = top(vectors, embedding, 5)
        assert [h["id"] for h in hits] == ids and ids[0] == planted
        np.testing.assert_allclose([h["score"] for h in hits], scores, rtol=1e-5, atol=1e-5)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert [h["metadata"]["caption"] for h in hits] == [f"item {i}" for i in ids]  # across both files
    assert report["image_query"][0]["metadata"] == {"caption": f"item {IMAGE_ID}", "width": None,
                                                   "url": f"https://example.com/{IMAGE_ID}.jpg"}


def test_default_steps(index_folder, tiny_checkpoint, capsys):
    """Without --steps: 64 steps, the same query as the API's embed(steps=64)."""
    assert search(PROMPT, "--index", index_folder, "--k", "1", "--json", "--weights", tiny_checkpoint, "--seed", SEED) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 64
    query = prior.load(tiny_checkpoint).embed(PROMPT, candidates=2, steps=64, seed=SEED).image_embedding[0]
    hit = report["image_query"][0]
    assert hit["score"] == pytest.approx(float(index_folder_vector(index_folder, hit["id"]) @ unit(query)), abs=1e-5)


def index_folder_vector(folder: Path, i: int) -> np.ndarray:
    return faiss.read_index(str(folder / "image.index")).reconstruct(i)


def test_table_and_k_beyond_the_index(index_folder, tiny_checkpoint, capsys):
    assert search(PROMPT, "--index", index_folder, "--k", "100", "--weights", tiny_checkpoint,
                  "--steps", STEPS, "--seed", SEED) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"query: {PROMPT!r} (seed {SEED}")
    assert "40 vectors, inner product" in lines[1]
    assert "prior image embedding" in lines[2] and "CLIP text embedding" not in lines[2]
    assert len(lines) == 3 + COUNT  # every vector once, no padding rows for the missing 60
    assert f"#{IMAGE_ID} " in lines[3] and f"item {IMAGE_ID}" in lines[3]


def test_a_memory_mapped_index_file_without_metadata(vectors, tiny_checkpoint, tmp_path, capsys):
    index = faiss.IndexFlatIP(TINY.dim)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "vectors.index"))
    assert search(PROMPT, "--index", tmp_path / "vectors.index", "--mmap", "--k", "1", "--json",
                  "--weights", tiny_checkpoint, "--steps", STEPS, "--seed", SEED) == 0
    hit, = json.loads(capsys.readouterr().out)["image_query"]
    assert (hit["id"], hit["metadata"]) == (IMAGE_ID, {})


@pytest.mark.parametrize("case", ["missing folder", "no image.index", "wrong dimension", "not a faiss index",
                                  "metadata of another index", "k out of range"])
def test_bad_index(case, vectors, tiny_checkpoint, tmp_path, capsys):
    folder, k = tmp_path / "index", "3"
    if case == "no image.index":
        folder.mkdir()
        (folder / "text.index").write_bytes(b"")
    elif case == "wrong dimension":
        write_index(folder, unit(np.random.default_rng(1).standard_normal((COUNT, 32))))
    elif case == "not a faiss index":
        write_index(folder, vectors)
        (folder / "image.index").write_bytes(b"this is not an index")
    elif case == "metadata of another index":
        write_index(folder, vectors, metadata_splits=(0, 20, COUNT + 5))
    elif case == "k out of range":
        write_index(folder, vectors)
        k = "0"
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code = search(PROMPT, "--index", folder, "--k", k, "--weights", tiny_checkpoint, "--steps", STEPS)
    except SystemExit as e:  # argparse's own checks exit directly
        code = e.code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    expected_code, expected_text = {
        "missing folder": (2, "argument --index: no such folder"),
        "no image.index": (2, "must hold image.index"),
        "wrong dimension": (1, "holds 32-dimensional embeddings, but this prior makes 64-dimensional ones"),
        "not a faiss index": (1, "image.index: not a readable FAISS index"),
        "metadata of another index": (1, f"holds {COUNT + 5} metadata rows for {COUNT} vectors"),
        "k out of range": (2, "argument --k: must be an integer in 1..10000, got 0"),
    }[case]
    assert code == expected_code and expected_text in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # nothing touched
