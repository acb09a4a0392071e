"""`python -m prior eval` on synthetic pairs where the answer is known: the prior's own outputs as
the "true" image embeddings, the same shuffled, a small case computed by hand, the bootstrap's
coverage, the report files, bad input, resumption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prior
import prior.pipeline
from prior import contract, evaluate
from prior.cli import main
from prior.evaluate import KS, METRICS, Resamples, baseline_metrics, prediction_metrics, read_pairs, unrelated_order

CAPTIONS = [f"a photo of thing number {i}, {'red' if i % 2 else 'blue'}" for i in range(24)]
BLANK_ROW = 3  # the files hold a blank caption here, which eval skips
SEED, STEPS = 5, 3
RUN = ["--seed", str(SEED), "--quiet", "--resamples", "200", "--sampler", "ddpm"]  # the sampler `own` used


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return prior.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def own(model) -> np.ndarray:
    """The prior's own outputs for the captions: row r with seed SEED + r, as eval samples them."""
    return model.embed(CAPTIONS, steps=STEPS, seed=SEED, sampler="ddpm").image_embedding


def with_blank(captions: list[str | None], images: np.ndarray) -> tuple[list[str | None], np.ndarray]:
    """The pairs with a blank caption (and some embedding) inserted at BLANK_ROW."""
    filler = np.random.default_rng(9).standard_normal((1, images.shape[1])).astype(images.dtype)
    return captions[:BLANK_ROW] + ["   "] + captions[BLANK_ROW:], np.concatenate([images[:BLANK_ROW], filler,
                                                                                images[BLANK_ROW:]])


def write_clip_retrieval(folder: Path, captions: list, images: np.ndarray, splits: tuple[int, ...] = (0, 10)) -> Path:
    """img_emb/img_emb_{i}.npy + metadata/metadata_{i}.parquet, as clip-retrieval's `clip inference` writes them."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    bounds = [*splits, len(captions)]
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", images[start:stop])
        pq.write_table(pa.table({"image_path": [f"{r:05d}.jpg" for r in range(start, stop)],
                                 "caption": pa.array(captions[start:stop], pa.string())}),
                       folder / "metadata" / f"metadata_{i}.parquet")
    return folder


def evaluate_cli(pairs: Path, out: Path, weights: Path, *extra: str) -> int:
    return main(["eval", str(pairs), "--weights", str(weights), "--out", str(out), *RUN, *extra])


def by_setting(report: dict) -> dict[tuple, dict]:
    return {(e["sampler"], e["steps"], e["cond_scale"]): e["metrics"] for e in report["settings"]}


@pytest.fixture(scope="module")
def aligned(own, tiny_checkpoint, tmp_path_factory) -> Path:
    """A sweep over the prior's own outputs: steps, cond_scale and every sampler of the contract."""
    root = tmp_path_factory.mktemp("aligned")
    pairs = write_clip_retrieval(root / "pairs", *with_blank(CAPTIONS, own))
    grid = ["--settings", f"steps=2,{STEPS}", "cond_scale=1,2", f"sampler={','.join(contract.SAMPLERS)}"]
    assert evaluate_cli(pairs, root / "out", tiny_checkpoint, "--batch-size", "7", "--chunk-size", "10", *grid) == 0
    return root / "out"


def test_own_outputs_give_similarity_one_and_recall_one(aligned, own):
    report = json.loads((aligned / "report.json").read_text())
    assert (report["rows"], report["pairs_rows"], report["blank_captions_skipped"]) == (24, 25, 1)
    assert len(report["settings"]) == 2 * 2 * len(contract.SAMPLERS)
    same = by_setting(report)[("ddpm", STEPS, 1.0)]  # the settings the "true" embeddings were made with
    for name in ("similarity_original", "variance_ratio"):
        assert same[name]["value"] == pytest.approx(1, abs=1e-5)
        assert same[name]["low"] == pytest.approx(1, abs=1e-5) and same[name]["high"] == pytest.approx(1, abs=1e-5)
    assert all(same[f"recall_at_{k}"]["value"] == 1 for k in KS) and same["median_rank"]["value"] == 1
    assert same["text_minus_baseline"]["value"] == pytest.approx(0, abs=1e-5)
    assert same["similarity_text"]["value"] == pytest.approx(report["baseline"]["baseline"]["value"], abs=1e-5)
    order = unrelated_order(24, SEED)
    unrelated = np.mean(evaluate.cosines(own, own[order]))
    assert same["similarity_unrelated"]["value"] == pytest.approx(unrelated, abs=1e-5)
    assert same["original_minus_unrelated"]["value"] == pytest.approx(1 - unrelated, abs=1e-5)
    assert same["norm"]["value"] == pytest.approx(np.linalg.norm(own, axis=1).mean(), rel=1e-5)
    # other settings sample other embeddings: the metric sees the difference
    assert by_setting(report)[("ddpm", 2, 1.0)]["similarity_original"]["value"] < 0.999
    assert by_setting(report)[("ddpm", STEPS, 2.0)]["similarity_original"]["value"] < 0.999


def test_shuffled_pairs_give_the_unrelated_figures(aligned, own, tiny_checkpoint, tmp_path):
    """Captions paired with the images eval uses as unrelated: similarity with the original is
    what the aligned run measured as similarity with an unrelated image, and retrieval fails."""
    order = unrelated_order(24, SEED)
    pairs = write_clip_retrieval(tmp_path / "pairs", *with_blank(CAPTIONS, own[order]))
    assert evaluate_cli(pairs, tmp_path / "out", tiny_checkpoint, "--steps", str(STEPS)) == 0
    shuffled = json.loads((tmp_path / "out" / "report.json").read_text())["settings"][0]["metrics"]
    before = by_setting(json.loads((aligned / "report.json").read_text()))[("ddpm", STEPS, 1.0)]
    assert shuffled["similarity_original"]["value"] == pytest.approx(before["similarity_unrelated"]["value"], abs=1e-6)
    assert shuffled["recall_at_1"]["value"] == 0 and shuffled["median_rank"]["value"] > 1
    assert shuffled["similarity_original"]["value"] < 0.99  # the tiny random prior's outputs are all alike


def test_hand_computed_case():
    """Four pairs in four dimensions; every figure below was worked out by hand."""
    s5 = math.sqrt(5)
    images = np.eye(4, dtype=np.float32)
    predictions = np.array([[2, 0, 0, 0], [0, 1, 2, 0], [3, 0, 0, 4], [0, 0, 0, -1]], dtype=np.float32)
    texts = np.array([[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    order = np.array([1, 2, 3, 0])
    resamples = Resamples(4, 500, seed=0)
    got = {k: v["value"] for k, v in prediction_metrics(predictions, texts, images, order, resamples).items()}
    original, to_text, baseline, unrelated = (1 + 1 / s5 + 0 - 1) / 4, (2 / s5 + 1 / s5 + 0 - 1) / 4, \
        (2 / s5 + 3) / 4, (0 + 2 / s5 + 4 / 5 + 0) / 4
    expected = {
        "similarity_original": original, "similarity_text": to_text, "text_minus_baseline": to_text - baseline,
        "similarity_unrelated": unrelated, "original_minus_unrelated": original - unrelated,
        "recall_at_1": 1 / 4, "recall_at_5": 1, "recall_at_10": 1,  # ranks 1, 2, 3, 4
        "median_rank": 2.5, "norm": (2 + s5 + 5 + 1) / 4,
        # per-dimension variances of the normalised predictions 0.18, 0.0375, 0.15, 0.4075; of the identity's rows 0.1875
        "variance_ratio": (0.775 / 4) / 0.1875,
    }
    assert got.keys() == expected.keys() == METRICS.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    base = {k: v["value"] for k, v in baseline_metrics(texts, images, resamples).items()}
    assert base == pytest.approx({"baseline": baseline, "text_recall_at_1": 1, "text_recall_at_5": 1,
                                  "text_recall_at_10": 1, "text_median_rank": 1, "image_variance": 0.1875}, abs=1e-6)


def test_recall_from_faiss_agrees_with_the_ranks():
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((300, 16)).astype(np.float32)
    queries = gallery + 1.5 * rng.standard_normal((300, 16)).astype(np.float32)
    ranks, hits = evaluate.ranks(queries, gallery, block=1000), evaluate.top_k_hits(queries, gallery)
    scores = evaluate.unit(queries).astype(np.float64) @ evaluate.unit(gallery).T.astype(np.float64)
    brute = 1 + np.sum(scores > np.diag(scores)[:, None], axis=1)
    assert np.array_equal(ranks, brute) and 0.1 < np.mean(ranks == 1) < 0.9
    for k in KS:
        assert np.array_equal(hits[k], ranks <= k), k


def test_bootstrap_interval_covers_the_known_value():
    """Over many data sets drawn from a known distribution, the 95% intervals of the mean and the
    median hold the true value about 95% of the time; the variance's interval holds the variance."""
    rng = np.random.default_rng(0)
    covered = []
    for i in range(200):
        values = rng.normal(0.3, 0.1, size=60)
        resamples = Resamples(60, 400, seed=i)
        covered.append([resamples.mean(values)["low"] <= 0.3 <= resamples.mean(values)["high"],
                        resamples.median(values)["low"] <= 0.3 <= resamples.median(values)["high"]])
    rate = np.mean(covered, axis=0)
    assert np.all((0.88 <= rate) & (rate <= 0.99)), rate
    x = rng.normal(0, 0.5, size=(400, 8))
    value, replicates = Resamples(400, 400, seed=1).variances(x)
    assert value == pytest.approx(x.var(axis=0).mean(), rel=1e-5)
    low, high = np.percentile(replicates, [2.5, 97.5])
    assert low <= 0.25 <= high and high - low < 0.05


def test_resamples_in_blocks_give_each_statistic_of_each_resample(monkeypatch):
    """Bounded memory: resamples come in blocks; every statistic is that of the resampled rows."""
    monkeypatch.setattr(Resamples, "BLOCK", 50 * 7)  # blocks of 7 resamples of 50 pairs, the last one shorter
    resamples = Resamples(50, 300, seed=3)
    assert [len(rows) for rows in resamples.blocks()] == [7] * 42 + [6]
    rows = np.concatenate(list(resamples.blocks()))
    assert np.array_equal(rows, np.concatenate(list(resamples.blocks())))  # drawn again, the same
    assert len(np.unique(rows, axis=0)) == 300  # and no block repeats another
    values, x = np.random.default_rng(4).normal(size=50), np.random.default_rng(5).normal(size=(50, 4))
    tail = np.percentile(values[rows].mean(axis=1), [2.5, 97.5])
    assert [resamples.mean(values)[k] for k in ("low", "high")] == pytest.approx(tail, abs=1e-12)
    tail = np.percentile(np.median(values[rows], axis=1), [2.5, 97.5])
    assert [resamples.median(values)[k] for k in ("low", "high")] == pytest.approx(tail, abs=1e-12)
    assert resamples.variances(x)[1] == pytest.approx([x[r].var(axis=0).mean() for r in rows], rel=1e-5)


def test_report_table_and_plots_are_written_and_readable(aligned):
    import matplotlib.image

    report = json.loads((aligned / "report.json").read_text())
    assert set(report["baseline"]) == set(evaluate.BASELINE)
    for entry in report["settings"]:
        assert set(entry["metrics"]) == set(METRICS)
        for interval in entry["metrics"].values():
            assert interval["low"] <= interval["high"] and all(math.isfinite(v) for v in interval.values())
        assert entry["metrics"]["similarity_original"]["low"] <= entry["metrics"]["similarity_original"]["value"] \
            <= entry["metrics"]["similarity_original"]["high"]
    table = [line.strip("|").split(" | ") for line in (aligned / "report.md").read_text().splitlines()]
    header = next(cells for cells in table if cells[0].strip() == "sampler")
    rows = [dict(zip([h.strip() for h in header], [c.strip() for c in cells], strict=True)) for cells in table
            if cells[0].strip() in contract.SAMPLERS]
    assert len(rows) == len(report["settings"])
    for row, entry in zip(rows, report["settings"], strict=True):
        assert (row["sampler"], int(row["steps"]), float(row["cond_scale"])) == \
            (entry["sampler"], entry["steps"], entry["cond_scale"])
        for metric, (label, _) in METRICS.items():
            value, interval = row[label].split(" (")
            low, high = interval.rstrip(")").split("–")
            digits = 1 if metric == "median_rank" else 3
            for shown, exact in zip((value, low, high), (entry["metrics"][metric][k] for k in ("value", "low", "high")),
                                    strict=True):
                assert float(shown) == pytest.approx(exact, abs=0.6 * 10**-digits), (metric, row)
    for metric in METRICS:
        image = matplotlib.image.imread(aligned / "plots" / f"{metric}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a picture, not a blank page
    assert not list(aligned.rglob("*.partial"))


def test_one_parquet_gives_the_same_report_as_the_clip_retrieval_folder(aligned, own, tiny_checkpoint, tmp_path):
    captions, images = with_blank(CAPTIONS, own)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"caption": captions, "embedding": pa.array(list(images), pa.list_(pa.float32()))}), path)
    assert evaluate_cli(path, tmp_path / "out", tiny_checkpoint, "--steps", str(STEPS)) == 0
    got = json.loads((tmp_path / "out" / "report.json").read_text())
    want = by_setting(json.loads((aligned / "report.json").read_text()))[("ddpm", STEPS, 1.0)]
    got = got["settings"][0]["metrics"]
    assert got.keys() == want.keys()
    for name, interval in want.items():
        assert got[name] == pytest.approx(interval, abs=1e-5), name


def test_limit_draws_a_seeded_sample(own, tmp_path):
    pairs = write_clip_retrieval(tmp_path / "pairs", *with_blank(CAPTIONS, own))
    first, again, other = (read_pairs(pairs, limit=10, seed=s) for s in (1, 1, 2))
    assert len(first.captions) == 10 and np.array_equal(first.source_rows, again.source_rows)
    assert not np.array_equal(first.source_rows, other.source_rows)
    assert np.all(np.diff(first.source_rows) > 0) and BLANK_ROW not in first.source_rows
    full = read_pairs(pairs)
    position = {row: i for i, row in enumerate(full.source_rows)}
    assert np.array_equal(first.images, full.images[[position[r] for r in first.source_rows]])


def test_setting_names_tell_every_setting_apart():
    settings = {evaluate.Setting(sampler, steps, scale, n, guidance) for sampler in contract.SAMPLERS
                for steps in (10, 100) for scale in (1.0, 1.0000001, 1.5) for n in (1, 2) for guidance in contract.GUIDANCE}
    assert len({s.name for s in settings}) == len(settings)


def test_grid_takes_the_contract_samplers(monkeypatch):
    monkeypatch.setattr(contract, "SAMPLERS", (*contract.SAMPLERS, "a-new-sampler"))
    assert evaluate.grid_item("sampler=a-new-sampler,ddpm") == ("sampler", ("a-new-sampler", "ddpm"))
    assert evaluate.grid_item("cond-scale=2,1,2") == ("cond_scale", (2.0, 1.0))
    with pytest.raises(Exception, match=f"must be one of {', '.join(contract.SAMPLERS)}, got 'other'"):
        evaluate.grid_item("sampler=other")


BAD_INPUT = {
    "no caption column": "argument --column: must be a column of",
    "no embedding column": "argument --embedding-column: must be a column of",
    "embedding dimension": "embeddings must be 64-dimensional like this prior's, got 32",
    "row counts": "holds 14 rows but",
    "file counts": "as many img_emb/*.npy as metadata/*.parquet files, got 2 and 1",
    "file numbers": "in sorted order, but their numbers differ",
    "NaN embedding": "got NaN or infinite values in row 7",
    "empty set": "at least 2 pairs with a non-blank caption, got 0",
    "no such folder": "argument PAIRS: no such folder or file",
    "bad setting": "argument --settings: cond_scale: must be a finite number in 0..5, got '9'",
    "unknown sampler": "argument --settings: sampler: must be one of",
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2_before_sampling(case, own, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(prior.pipeline.Prior, "embed", no_sampling)
    captions, images = with_blank(CAPTIONS, own)
    pairs, extra = tmp_path / "pairs", []
    if case == "no caption column":
        extra = ["--column", "text"]
    elif case == "no embedding column":
        pairs = tmp_path / "pairs.parquet"
        pq.write_table(pa.table({"caption": captions, "emb": pa.array(list(images), pa.list_(pa.float32()))}), pairs)
    elif case == "embedding dimension":
        images = np.random.default_rng(0).standard_normal((len(captions), 32)).astype(np.float32)
    elif case == "NaN embedding":
        images = images.copy()
        images[7, 5] = np.nan
    elif case == "empty set":
        captions = [None if i % 2 else "" for i in range(len(captions))]
    elif case == "bad setting":
        extra = ["--settings", "cond_scale=1,9"]
    elif case == "unknown sampler":
        extra = ["--settings", "sampler=ddpm,euler-ancestral-nonexistent"]
    if case == "row counts":
        write_clip_retrieval(pairs, captions, images)
        np.save(pairs / "img_emb" / "img_emb_1.npy", images[10:24])
    elif case == "file counts":
        write_clip_retrieval(pairs, captions, images)
        (pairs / "metadata" / "metadata_1.parquet").unlink()
    elif case == "file numbers":
        write_clip_retrieval(pairs, captions, images, splits=(0, 10, 20))
        (pairs / "metadata" / "metadata_1.parquet").rename(pairs / "metadata" / "metadata_3.parquet")
        (pairs / "img_emb" / "img_emb_1.npy").rename(pairs / "img_emb" / "img_emb_3.npy")
        (pairs / "metadata" / "metadata_2.parquet").rename(pairs / "metadata" / "metadata_1.parquet")
    elif case not in ("no embedding column", "no such folder"):
        write_clip_retrieval(pairs, captions, images)
    before = sorted(tmp_path.rglob("*"))
    try:
        code = evaluate_cli(pairs, tmp_path / "out", tiny_checkpoint, *extra)
    except SystemExit as e:  # argparse's own checks exit directly
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and BAD_INPUT[case] in err, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_resume_redoes_only_unfinished_chunks(own, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    pairs = write_clip_retrieval(tmp_path / "pairs", *with_blank(CAPTIONS, own))
    options = ["--settings", "steps=2,3", "--chunk-size", "5", "--batch-size", "5"]
    assert evaluate_cli(pairs, tmp_path / "whole", tiny_checkpoint, *options) == 0

    calls = []
    embed = prior.pipeline.Prior.embed

    def counted(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 7:  # Ctrl-C during the 7th chunk of 10 (5 per setting)
            raise KeyboardInterrupt
        return embed(self, prompts, *args, **kwargs)

    monkeypatch.setattr(prior.pipeline.Prior, "embed", counted)
    out = tmp_path / "resumed"
    assert evaluate_cli(pairs, out, tiny_checkpoint, *options) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(list((out / "chunks").rglob("chunk_*.npz"))) == 6 and not (out / "report.json").exists()
    assert not list(out.rglob("*.partial"))

    assert evaluate_cli(pairs, out, tiny_checkpoint, "--seed", "6", *options) == 2  # another run's folder
    assert "holds a run with other data or settings (seed: 5 there, 6 now)" in capsys.readouterr().err

    calls.clear()
    assert evaluate_cli(pairs, out, tiny_checkpoint, *options) == 0
    assert calls == [5, 5, 5, 4]  # the 7th to 10th chunks only: rows 5-9, 10-14, 15-19, 20-23 of the second setting
    assert (out / "report.json").read_bytes() == (tmp_path / "whole" / "report.json").read_bytes()

    calls.clear()  # a grid that adds a setting computes only that one
    assert evaluate_cli(pairs, out, tiny_checkpoint, "--settings", "steps=2,3,4", "--chunk-size", "5") == 0
    assert calls == [5, 5, 5, 5, 4] and len(json.loads((out / "report.json").read_text())["settings"]) == 3
