"""`python -m prior eval`: how close the prior's image embeddings come to real images' embeddings.

PAIRS holds captions with the CLIP ViT-L/14 embeddings of their images, either as
clip-retrieval's `clip inference` writes them for an image dataset,

    PAIRS/img_emb/img_emb_{i}.npy         (rows, D) image embeddings
    PAIRS/metadata/metadata_{i}.parquet   one line per row, with a caption column

(files paired in sorted-name order), or as one .parquet file with a caption column and an
embedding column (a list of D floats per row). Rows with a blank caption are skipped.

Each setting of the grid (`--settings steps=16,64 cond_scale=1,2 sampler=ddpm,ddim`) embeds
every caption, row r with seed (seed + r) mod 2**32 in every setting, so settings differ only
in how they sample. The metrics are those the LAION prior's trainers watched (lucidrains/
DALLE2-pytorch, prior.md), plus retrieval and spread; see METRICS. Each is a mean (or median)
over pairs, with a 95% percentile bootstrap interval over pairs, the same resamples for every
setting.

OUT holds, as `prior batch` does, finished chunks a rerun skips (resume):

    OUT/eval.json                               the run's data, weights and seed; a rerun must match
    OUT/chunks/{setting}/chunk_{i}.npz          image and text embeddings of rows [i*M, (i+1)*M)
    OUT/report.json, OUT/report.md              every metric per setting, written once all are done
    OUT/plots/{metric}.png                      each metric against steps, one line per other setting
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import contract
from .arguments import (
    add_batch_size_argument,
    add_sampling_arguments,
    check_device,
    folder_path,
    int_in,
    progress_bar,
    resolve_steps,
    steps_count,
)
from .contract import SEED_LIMIT, ArgumentError
from .tables import missing_column, parquet_files, read_text_column

MANIFEST = "eval.json"
DEFAULT_CAPTION_COLUMN = "caption"  # img2dataset's and clip-retrieval's name
DEFAULT_EMBEDDING_COLUMN = "embedding"
KS = (1, 5, 10)  # recall@k
CONFIDENCE = 95  # percent, the bootstrap interval
DEFAULT_RESAMPLES = 1000
# Settings that change the numbers in the chunks, other than the grid's own (a chunk's folder names those).
RESUME_KEYS = ("pairs_sha256", "rows", "weights_sha256", "seed", "chunk_size", "device", "dtype")

# The metrics of a setting, in report order: name -> (label, what it measures).
METRICS = {
    "similarity_original": ("similarity with original image",
                            "cosine of the prediction to the caption's true image embedding"),
    "similarity_text": ("similarity with text", "cosine of the prediction to the caption's CLIP text embedding"),
    "text_minus_baseline": ("difference from baseline",
                            "similarity with text minus the baseline (text to true image), per pair"),
    "similarity_unrelated": ("similarity with unrelated image",
                             "cosine of the prediction to another pair's true image embedding (a fixed derangement)"),
    "original_minus_unrelated": ("original minus unrelated",
                                 "similarity with original image minus similarity with unrelated image, per pair"),
    **{f"recall_at_{k}": (f"recall@{k}", f"share of pairs whose true image is among the {k} nearest true images "
                                         "of the set to the prediction (FAISS inner product, normalised)") for k in KS},
    "median_rank": ("median rank", "median rank of the true image among all true images of the set, "
                                   "queried with the prediction (1 is best)"),
    "norm": ("prediction norm", "L2 norm of the prediction (the prior's outputs are not normalised)"),
    "variance_ratio": ("variance ratio", "mean per-dimension variance of the normalised predictions over that of "
                                         "the normalised true embeddings (1: as spread out as real images)"),
}
# Figures of the data alone, the same for every setting.
BASELINE = {
    "baseline": ("baseline similarity", "cosine of the caption's CLIP text embedding to its true image embedding"),
    **{f"text_recall_at_{k}": (f"text recall@{k}", f"recall@{k} queried with the text embedding instead") for k in KS},
    "text_median_rank": ("text median rank", "median rank queried with the text embedding instead"),
    "image_variance": ("image variance", "mean per-dimension variance of the normalised true embeddings"),
}
# In a metric's plot, the baseline figure drawn beside it as a dashed line.
REFERENCE = {"similarity_text": "baseline", "median_rank": "text_median_rank",
             **{f"recall_at_{k}": f"text_recall_at_{k}" for k in KS}}


# ---------------------------------------------------------------------------------------------
# Input


@dataclass
class Pairs:
    source: Path
    captions: list[str]  # pair i's caption
    images: np.ndarray  # (n, D) float32: pair i's true image embedding
    source_rows: np.ndarray  # (n,) int64: the row of PAIRS pair i came from
    total: int  # rows in PAIRS
    blank: int  # rows skipped for a blank caption

    def sha256(self) -> str:
        """A fingerprint of exactly the pairs measured, to refuse resuming on other data."""
        digest = hashlib.sha256()
        for row, caption in zip(self.source_rows.tolist(), self.captions, strict=True):
            data = caption.encode("utf-8")
            digest.update(row.to_bytes(8, "little") + len(data).to_bytes(8, "little") + data)
        digest.update(np.ascontiguousarray(self.images, dtype="<f4").tobytes())
        return digest.hexdigest()


def _bad(problem: str) -> ArgumentError:
    return ArgumentError("pairs", problem)


def read_pairs(path: Path, column: str = DEFAULT_CAPTION_COLUMN, embedding_column: str = DEFAULT_EMBEDDING_COLUMN,
               limit: int | None = None, seed: int = 0) -> Pairs:
    """The pairs of PAIRS with a non-blank caption; with `limit`, a sample of that many drawn with
    `seed` (kept in file order). Every problem is an ArgumentError naming PAIRS or the column,
    raised before anything is sampled: no caption or embedding column, row counts that differ
    between the embeddings and the captions, embeddings of differing widths, NaN, infinite or
    all-zero embeddings, fewer than two pairs."""
    path = Path(path)
    if not path.exists():
        raise _bad(f"no such folder or file, got {str(path)!r}")
    if path.is_dir():
        captions, rows_of = _read_clip_retrieval(path, column)
    elif path.suffix.lower() == ".parquet":
        captions, rows_of = _read_one_parquet(path, column, embedding_column)
    else:
        raise _bad(f"must be a clip-retrieval folder (img_emb/*.npy and metadata/*.parquet) or a .parquet file, "
                   f"got {str(path)!r}")
    keep = np.array([i for i, c in enumerate(captions) if c is not None and c.strip()], dtype=np.int64)
    blank = len(captions) - len(keep)
    if len(keep) < 2:
        raise _bad(f"must hold at least 2 pairs with a non-blank caption, got {len(keep)} "
                   f"(of {len(captions)} rows) in {str(path)!r}")
    if limit is not None and limit < len(keep):
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=limit, replace=False))
    images = rows_of(keep)
    norms = np.linalg.norm(images, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        row = int(keep[bad[0]])
        what = "NaN or infinite values" if not np.isfinite(norms[bad[0]]) else "only zeros"
        raise _bad(f"embeddings must be finite and non-zero, got {what} in row {row} of {str(path)!r} "
                   f"({len(bad)} such row(s) among those measured)")
    return Pairs(path, [captions[i] for i in keep], images, keep, len(captions), blank)


def _read_clip_retrieval(folder: Path, column: str):
    """Captions of every row, and a function giving the embeddings of chosen rows."""
    embedding_files = sorted((folder / "img_emb").glob("*.npy"))
    metadata = parquet_files(folder / "metadata", lambda p, problem: _bad(f"{str(p)!r}: {problem}"))
    if not embedding_files or not metadata:
        missing = "img_emb/*.npy" if not embedding_files else "metadata/*.parquet"
        raise _bad(f"must be a clip-retrieval folder (img_emb/*.npy and metadata/*.parquet) or a .parquet file, "
                   f"got {str(folder)!r} (no {missing})")
    if len(embedding_files) != len(metadata):
        raise _bad(f"must hold as many img_emb/*.npy as metadata/*.parquet files, got {len(embedding_files)} and "
                   f"{len(metadata)} in {str(folder)!r}")
    arrays, captions, dim = [], [], None
    for npy, (parquet, _, count) in zip(embedding_files, metadata, strict=True):
        numbers = [re.search(r"(\d*)$", p.stem).group(1) for p in (npy, parquet)]
        if all(numbers) and int(numbers[0]) != int(numbers[1]):
            raise _bad(f"{str(npy)!r} pairs with {str(parquet)!r} in sorted order, but their numbers differ: "
                       "img_emb/ and metadata/ must hold the same parts")
        try:
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise _bad(f"{str(npy)!r}: not a readable .npy file ({str(e).strip().splitlines()[0]})") from None
        if array.ndim != 2 or array.dtype.kind != "f":
            raise _bad(f"{str(npy)!r}: must hold a 2-D float array (rows, D), got {array.dtype} {array.shape}")
        if array.shape[0] != count:
            raise _bad(f"{str(npy)!r} holds {array.shape[0]} rows but {str(parquet)!r} holds {count}: "
                       "the embeddings and captions must match row for row")
        if dim is not None and array.shape[1] != dim:
            raise _bad(f"{str(npy)!r}: holds {array.shape[1]}-dimensional embeddings, the files before it {dim}")
        dim = array.shape[1]
        arrays.append(array)
        captions.extend(read_text_column(parquet, "parquet", column, field="pairs"))
    starts = np.cumsum([0] + [len(a) for a in arrays])

    def rows_of(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), dim), dtype=np.float32)
        where = np.searchsorted(starts, rows, side="right") - 1
        for f, array in enumerate(arrays):
            mine = np.flatnonzero(where == f)
            if len(mine):
                out[mine] = array[rows[mine] - starts[f]]
        return out

    return captions, rows_of


def _read_one_parquet(path: Path, column: str, embedding_column: str):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    captions = read_text_column(path, "parquet", column, field="pairs")  # a bad file or caption column fails here
    names = pq.read_schema(path).names
    if embedding_column not in names:
        raise missing_column(embedding_column, names, path, field="embedding_column")
    values = pq.read_table(path, columns=[embedding_column]).column(embedding_column).combine_chunks()
    kind = values.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise ArgumentError("embedding_column", f"must name a column of float lists, got {embedding_column!r} "
                                                f"(holds {kind})")
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise _bad(f"embeddings must be finite and non-zero, got a null embedding in row {row} of {str(path)!r}")
    lengths = np.asarray(pc.list_value_length(values).to_numpy(zero_copy_only=False))
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise _bad(f"embeddings must all have one length, got {lengths[row]} in row {row} and {lengths[0]} in row 0 "
                   f"of {str(path)!r}")
    dim = int(lengths[0]) if len(lengths) else 0
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    images = flat.reshape(len(values), dim)
    return captions, lambda rows: images[rows]


# ---------------------------------------------------------------------------------------------
# Metrics: plain numpy over (n, D) arrays, row i of each belonging to pair i


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    return np.sum(unit(a) * unit(b), axis=1)


def unrelated_order(n: int, seed: int) -> np.ndarray:
    """A derangement of range(n) (n >= 2) drawn with `seed`: pair i's unrelated image is
    order[i], never i. One random cycle through all pairs."""
    cycle = np.random.default_rng([seed, 1]).permutation(n)
    order = np.empty(n, dtype=np.int64)
    order[cycle] = np.roll(cycle, -1)
    return order


def ranks(queries: np.ndarray, gallery: np.ndarray, block: int = 1 << 24) -> np.ndarray:
    """Rank (1 = best) of gallery[i] among all of `gallery` for queries[i], by cosine: one plus the
    number of gallery rows strictly closer to the query."""
    q, g = unit(queries), unit(gallery)
    n = len(q)
    out = np.empty(n, dtype=np.int64)
    step = max(1, block // max(n, 1))
    for start in range(0, n, step):
        scores = q[start : start + step] @ g.T
        own = scores[np.arange(len(scores)), np.arange(start, start + len(scores))]
        out[start : start + step] = 1 + np.sum(scores > own[:, None], axis=1)
    return out


def top_k_hits(queries: np.ndarray, gallery: np.ndarray, ks: tuple[int, ...] = KS) -> dict[int, np.ndarray]:
    """k -> per query, whether gallery[i] is among the k nearest (a FAISS flat inner-product index
    of the normalised gallery, queried with the normalised queries, as `prior search` does)."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(unit(gallery)))
    _, ids = index.search(np.ascontiguousarray(unit(queries)), min(max(ks), len(gallery)))
    own = np.arange(len(queries))[:, None]
    return {k: np.any(ids[:, :k] == own, axis=1) for k in ks}


class Resamples:
    """Bootstrap resamples of the pairs: `count` draws of n pair indices with replacement, made in
    blocks of at most BLOCK indices (memory stays bounded for large sets) and drawn again, the same,
    for each statistic. The same draws serve every metric and setting, so that settings are
    compared on equal terms."""

    BLOCK = 1 << 24

    def __init__(self, n: int, count: int = DEFAULT_RESAMPLES, seed: int = 0):
        self.n, self.count, self.seed = n, count, seed

    def blocks(self):
        """The resamples, a (resamples, n) array of pair indices at a time."""
        size = max(1, self.BLOCK // self.n)
        for block, start in enumerate(range(0, self.count, size)):
            rng = np.random.default_rng([self.seed, 2, block])
            yield rng.integers(0, self.n, size=(min(size, self.count - start), self.n))

    def replicates(self, statistic) -> np.ndarray:
        """statistic(rows) -> one value per resample, over every block."""
        return np.concatenate([statistic(rows) for rows in self.blocks()])

    def interval(self, value: float, replicates: np.ndarray) -> dict[str, float]:
        tail = (100 - CONFIDENCE) / 2
        low, high = np.nanpercentile(replicates, [tail, 100 - tail])  # NaN: a ratio over a resample without spread
        return {"value": float(value), "low": float(low), "high": float(high)}

    def mean(self, values: np.ndarray) -> dict[str, float]:
        values = np.asarray(values, dtype=np.float64)
        return self.interval(values.mean(), self.replicates(lambda rows: values[rows].mean(axis=1)))

    def median(self, values: np.ndarray) -> dict[str, float]:
        values = np.asarray(values, dtype=np.float64)
        return self.interval(np.median(values), self.replicates(lambda rows: np.median(values[rows], axis=1)))

    def variances(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        """Mean per-dimension variance of the rows of x, and its value in every resample."""
        x = np.asarray(x, dtype=np.float32)
        squares = np.sum(np.square(x, dtype=np.float64), axis=1)

        def variance(rows: np.ndarray) -> np.ndarray:
            # how often each pair is drawn in each resample, so that the sums are matrix products
            offsets = (rows + self.n * np.arange(len(rows))[:, None]).ravel()
            weights = np.bincount(offsets, minlength=rows.size).reshape(rows.shape).astype(np.float32)
            mean = weights @ x / self.n
            return (weights @ squares / self.n - np.sum(np.square(mean, dtype=np.float64), axis=1)) / x.shape[1]

        return float(x.var(axis=0).mean()), self.replicates(variance)


def baseline_metrics(texts: np.ndarray, images: np.ndarray, resamples: Resamples) -> dict[str, dict[str, float]]:
    """The figures of the data alone (BASELINE): text against true image."""
    hits = top_k_hits(texts, images)
    variance, replicates = resamples.variances(unit(images))
    return {
        "baseline": resamples.mean(cosines(texts, images)),
        **{f"text_recall_at_{k}": resamples.mean(hits[k]) for k in KS},
        "text_median_rank": resamples.median(ranks(texts, images)),
        "image_variance": resamples.interval(variance, replicates),
    }


def prediction_metrics(predictions: np.ndarray, texts: np.ndarray, images: np.ndarray, order: np.ndarray,
                       resamples: Resamples) -> dict[str, dict[str, float]]:
    """Every metric of METRICS for one setting's predictions; `order` pairs each with an unrelated image."""
    original = cosines(predictions, images)
    to_text = cosines(predictions, texts)
    unrelated = cosines(predictions, images[order])
    hits = top_k_hits(predictions, images)
    predicted_variance, predicted = resamples.variances(unit(predictions))
    true_variance, true = resamples.variances(unit(images))
    return {
        "similarity_original": resamples.mean(original),
        "similarity_text": resamples.mean(to_text),
        "text_minus_baseline": resamples.mean(to_text - cosines(texts, images)),
        "similarity_unrelated": resamples.mean(unrelated),
        "original_minus_unrelated": resamples.mean(original - unrelated),
        **{f"recall_at_{k}": resamples.mean(hits[k]) for k in KS},
        "median_rank": resamples.median(ranks(predictions, images)),
        "norm": resamples.mean(np.linalg.norm(predictions, axis=1)),
        "variance_ratio": resamples.interval(predicted_variance / true_variance,
                                             np.divide(predicted, true, out=np.full_like(predicted, np.nan), where=true > 0)),
    }


# ---------------------------------------------------------------------------------------------
# The settings grid


@dataclass(frozen=True)
class Setting:
    sampler: str
    steps: int
    cond_scale: float
    candidates: int
    guidance: str

    @property
    def name(self) -> str:
        """The chunk folder's name: every field (cond_scale exactly), in file-name-safe characters."""
        text = f"{self.sampler}_steps{self.steps}_scale{self.cond_scale!r}_n{self.candidates}_{self.guidance}"
        return re.sub(r"[^A-Za-z0-9._+-]", "-", text)


GRID_KEYS = ("sampler", "cond_scale", "candidates", "guidance", "steps")  # lines of a plot vary the first four


def _grid_value(key: str, text: str):
    if key == "steps":
        return steps_count(text)
    if key == "cond_scale":
        return contract.parse_float("value", text, *contract.COND_SCALE)
    if key == "candidates":
        return contract.parse_int("value", text, *contract.CANDIDATES)
    return contract.check_choice("value", text, contract.SAMPLERS if key == "sampler" else contract.GUIDANCE)


def grid_item(text: str) -> tuple[str, tuple]:
    """KEY=V1,V2,... as typed after --settings: the key and its checked values, in order, once each."""
    key, equals, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or key not in GRID_KEYS:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE[,VALUE...] with KEY one of {', '.join(GRID_KEYS)}, "
                                         f"got {contract.shown(text)}")
    parsed = []
    for value in values.split(","):
        try:
            parsed.append(_grid_value(key, value.strip()))
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(f"{key}: {e.problem}") from None
    return key, tuple(dict.fromkeys(parsed))


def settings_grid(args: argparse.Namespace, num_timesteps: int) -> list[Setting]:
    """Every combination of --settings' values; a key it does not name takes its single option's value."""
    grid: dict[str, tuple] = {}
    for key, values in args.settings or []:
        if key in grid:
            raise ArgumentError("settings", f"names each key once, got {key} twice")
        grid[key] = values
    single = {"sampler": args.sampler, "cond_scale": args.cond_scale, "candidates": args.candidates,
              "guidance": args.guidance, "steps": args.steps}
    values = {key: grid.get(key, (single[key],)) for key in GRID_KEYS}
    values["steps"] = tuple(dict.fromkeys(resolve_steps(s, num_timesteps) for s in values["steps"]))
    return [Setting(**dict(zip(GRID_KEYS, combination, strict=True)))
            for combination in itertools.product(*(values[key] for key in GRID_KEYS))]


# ---------------------------------------------------------------------------------------------
# Chunks: the unit of resumption


def chunk_path(out: Path, setting: Setting, index: int, count: int) -> Path:
    return out / "chunks" / setting.name / f"chunk_{str(index).zfill(len(str(count)))}.npz"


def read_chunk(path: Path, rows: int, dim: int) -> dict[str, np.ndarray] | None:
    """A finished chunk's arrays, or None when it is missing, truncated or of another shape."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("image", "text")}
    except Exception:  # missing, truncated or not ours: whatever the error, the chunk is redone
        return None
    return arrays if all(a.shape == (rows, dim) and a.dtype == np.float32 for a in arrays.values()) else None


def write_chunk(path: Path, image: np.ndarray, text: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contract.atomic_path(path) as partial, open(partial, "wb") as f:
        np.savez(f, image=image.astype(np.float32), text=text.astype(np.float32))


def embed_chunk(model, captions: list[str], first_row: int, setting: Setting, seed: int, batch_size: int,
                on_rows) -> tuple[np.ndarray, np.ndarray]:
    """Rows first_row.. in forward passes of batch_size prompts: row r with seed (seed + r) mod 2**32
    (Prior.embed gives prompt i of a call the call's seed + i)."""
    images, texts = [], []
    for start in range(0, len(captions), batch_size):
        prompts = captions[start : start + batch_size]
        result = model.embed(prompts, candidates=setting.candidates, cond_scale=setting.cond_scale,
                             steps=setting.steps, seed=(seed + first_row + start) % SEED_LIMIT,
                             guidance=setting.guidance, sampler=setting.sampler)
        images.append(result.image_embedding)
        texts.append(result.text_embedding)
        on_rows(len(prompts))
    return np.concatenate(images), np.concatenate(texts)


def read_manifest(out: Path) -> dict | None:
    return contract.read_manifest(out / MANIFEST, "eval")


def check_manifest(out: Path, previous: dict | None, record: dict) -> None:
    """Refuse to mix two runs' chunks: a manifest for other data, weights or seed, or chunks with
    no manifest to say which run wrote them."""
    stray = next(iter(sorted((out / "chunks").glob("*"))), None)
    contract.check_same_run(out, previous, record, RESUME_KEYS, stray, "chunks", MANIFEST, "data or settings")


# ---------------------------------------------------------------------------------------------
# The report: JSON, a markdown table, plots


def _cell(interval: dict[str, float], name: str) -> str:
    digits = 1 if "rank" in name else 3
    return f"{interval['value']:.{digits}f} ({interval['low']:.{digits}f}–{interval['high']:.{digits}f})"


def markdown(report: dict) -> str:
    lines = [f"# prior eval: {report['rows']} pairs from {report['pairs']}", "",
             f"Weights {report['weights']} ({report['device']}, {report['dtype']}), seed {report['seed']}. "
             f"Each figure: value ({CONFIDENCE}% bootstrap interval over pairs, {report['resamples']} resamples).", "",
             "| data alone | value |", "|---|---|"]
    lines += [f"| {BASELINE[name][0]} | {_cell(v, name)} |" for name, v in report["baseline"].items()]
    lines += ["", "| " + " | ".join(list(GRID_KEYS) + [METRICS[m][0] for m in METRICS]) + " |",
              "|" + "---|" * (len(GRID_KEYS) + len(METRICS))]
    for entry in report["settings"]:
        cells = [f"{entry[k]:g}" if isinstance(entry[k], float) else str(entry[k]) for k in GRID_KEYS]
        cells += [_cell(entry["metrics"][m], m) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| metric | meaning |", "|---|---|"]
    lines += [f"| {label} | {meaning} |" for label, meaning in [*METRICS.values(), *BASELINE.values()]]
    return "\n".join(lines) + "\n"


def plot(report: dict, metric: str, path: Path) -> None:
    """One metric against steps: a line per combination of the other settings, its interval
    shaded; the data-alone counterpart (REFERENCE) dashed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    varying = [k for k in GRID_KEYS[:-1] if len({e[k] for e in report["settings"]}) > 1]
    lines: dict[tuple, list[dict]] = {}
    for entry in report["settings"]:
        lines.setdefault(tuple(entry[k] for k in GRID_KEYS[:-1]), []).append(entry)
    for key, entries in lines.items():
        entries = sorted(entries, key=lambda e: e["steps"])
        steps = [e["steps"] for e in entries]
        values = [e["metrics"][metric] for e in entries]
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in zip(GRID_KEYS[:-1], key, strict=True) if k in varying) or None
        (line,) = axes.plot(steps, [v["value"] for v in values], marker="o", label=label)
        axes.fill_between(steps, [v["low"] for v in values], [v["high"] for v in values], color=line.get_color(),
                          alpha=0.2, linewidth=0)
    if metric in REFERENCE:
        reference = report["baseline"][REFERENCE[metric]]
        axes.axhline(reference["value"], color="gray", linestyle="--", label=BASELINE[REFERENCE[metric]][0])
        axes.axhspan(reference["low"], reference["high"], color="gray", alpha=0.15, linewidth=0)
    all_steps = sorted({e["steps"] for e in report["settings"]})
    if all_steps[-1] >= 8 * all_steps[0]:
        axes.set_xscale("log")
    axes.set_xticks(all_steps, [str(s) for s in all_steps])
    axes.set_xlabel("steps")
    axes.set_ylabel(METRICS[metric][0])
    axes.set_title(f"{METRICS[metric][0]} ({report['rows']} pairs, {CONFIDENCE}% intervals)", fontsize=10)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.savefig(path, format="png", dpi=100)


def write_report(out: Path, report: dict) -> None:
    """plots/ first, then report.md and report.json: once report.json is there, the run is complete."""
    contract.write_folder(out / "plots", {f"{m}.png": (lambda path, m=m: plot(report, m, path)) for m in METRICS})
    text = json.dumps(report, indent=2) + "\n"
    table = markdown(report)
    contract.write_folder(out, {"report.md": lambda path: path.write_text(table, encoding="utf-8"),
                                "report.json": lambda path: path.write_text(text, encoding="utf-8")})


# ---------------------------------------------------------------------------------------------
# The command


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "eval", help="measure the prior against true image embeddings of captioned images (report and plots)",
        description="Embed every caption of PAIRS under each setting of a grid and compare the predictions with "
                    "the true image embeddings; resumable.")
    parser.add_argument("pairs", metavar="PAIRS", type=Path,
                        help="a clip-retrieval folder (img_emb/*.npy, metadata/*.parquet with captions), or a "
                             ".parquet file with a caption and an embedding column")
    add_sampling_arguments(parser)
    parser.add_argument("--settings", metavar="KEY=V[,V...]", nargs="+", type=grid_item, default=None,
                        help=f"the grid to sweep, KEY one of {', '.join(GRID_KEYS)} (samplers: "
                             f"{', '.join(contract.SAMPLERS)}); a key named here replaces its single option, e.g. "
                             "--settings steps=16,32,64 cond_scale=1,2 sampler=ddpm,ddim")
    parser.add_argument("--out", type=folder_path, required=True,
                        help="output directory: report.json, report.md, plots/, and chunks/ for resuming")
    parser.add_argument("--limit", type=int_in(2, 2**40), default=None,
                        help="measure a sample of this many pairs, drawn with --seed (default: all)")
    parser.add_argument("--column", default=DEFAULT_CAPTION_COLUMN,
                        help=f"the caption column (default: {DEFAULT_CAPTION_COLUMN!r})")
    parser.add_argument("--embedding-column", default=DEFAULT_EMBEDDING_COLUMN,
                        help=f"the embedding column of a .parquet PAIRS (default: {DEFAULT_EMBEDDING_COLUMN!r})")
    add_batch_size_argument(parser)
    parser.add_argument("--chunk-size", type=int_in(1, 100_000_000), default=1000,
                        help="rows per saved chunk, the unit of resumption (default 1000)")
    parser.add_argument("--resamples", type=int_in(10, 100_000), default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples for the intervals (default {DEFAULT_RESAMPLES})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .pipeline import load

    out = Path(args.out)
    contract.check_output_folder("out", out)
    previous = read_manifest(out) if out.is_dir() else None
    seed = args.seed if args.seed is not None else (previous or {}).get("seed")
    if not contract.is_integer(seed) or not 0 <= seed < SEED_LIMIT:
        seed = secrets.randbelow(SEED_LIMIT)
    pairs = read_pairs(args.pairs, args.column, args.embedding_column, args.limit, seed)  # bad input fails fast
    check_device(args.device)

    model = load(args.weights, device=args.device, dtype=args.dtype, expected_sha256=args.sha256)
    dim = model.config.dim
    if pairs.images.shape[1] != dim:
        raise ArgumentError("pairs", f"embeddings must be {dim}-dimensional like this prior's, got "
                                     f"{pairs.images.shape[1]} in {str(pairs.source)!r} (another CLIP model?)")
    settings = settings_grid(args, model.config.num_timesteps)
    rows = len(pairs.captions)
    record = {"pairs": str(pairs.source.resolve()), "pairs_sha256": pairs.sha256(), "rows": rows,
              "limit": args.limit, "column": args.column, "seed": seed, "chunk_size": args.chunk_size,
              "weights": str(model.weights_path), "weights_sha256": model.weights_sha256 or contract.sha256_of(
                  model.weights_path), "device": model.device.type, "dtype": str(model.dtype).removeprefix("torch."),
              "dim": dim}
    check_manifest(out, previous, record)
    out.mkdir(parents=True, exist_ok=True)
    with contract.atomic_path(out / MANIFEST) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")

    starts = list(range(0, rows, args.chunk_size))
    todo = [(s, i, start) for s in settings for i, start in enumerate(starts)
            if read_chunk(chunk_path(out, s, i, len(starts)), min(args.chunk_size, rows - start), dim) is None]
    args.interrupted = f"interrupted; finished chunks in {out}/ are kept: rerun the same command to resume"
    done = len(settings) * rows - sum(min(args.chunk_size, rows - start) for _, _, start in todo)
    bar = progress_bar(len(settings) * rows, args.quiet, desc="evaluating", unit="prompt", initial=done)
    started = time.perf_counter()
    try:
        for setting, i, start in todo:
            bar.set_postfix_str(setting.name, refresh=False)
            stop = min(start + args.chunk_size, rows)
            image, text = embed_chunk(model, pairs.captions[start:stop], start, setting, seed, args.batch_size,
                                      bar.update)
            write_chunk(chunk_path(out, setting, i, len(starts)), image, text)
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    resamples = Resamples(rows, args.resamples, seed)
    order = unrelated_order(rows, seed)
    entries, baseline = [], None
    for setting in settings:
        chunks = [read_chunk(chunk_path(out, setting, i, len(starts)), min(args.chunk_size, rows - start), dim)
                  for i, start in enumerate(starts)]
        predictions = np.concatenate([c["image"] for c in chunks])
        texts = np.concatenate([c["text"] for c in chunks])
        if baseline is None:  # the text tower is deterministic: every setting has the same text embeddings
            baseline = baseline_metrics(texts, pairs.images, resamples)
        entries.append({**asdict(setting), "metrics": prediction_metrics(predictions, texts, pairs.images, order,
                                                                         resamples)})
    report = {**{k: record[k] for k in ("pairs", "rows", "limit", "column", "seed", "weights", "weights_sha256",
                                       "device", "dtype", "dim")},
              "pairs_rows": pairs.total, "blank_captions_skipped": pairs.blank, "resamples": args.resamples,
              "confidence": CONFIDENCE, "baseline": baseline, "settings": entries,
              "metrics": {name: {"label": label, "meaning": meaning}
                          for name, (label, meaning) in [*METRICS.items(), *BASELINE.items()]}}
    write_report(out, report)
    args.interrupted = f"interrupted; {out}/ holds the complete report"
    computed = sum(min(args.chunk_size, rows - start) for _, _, start in todo)
    rate = f", {computed / seconds:.2f} prompts/s" if computed and seconds > 0 else ""
    best = max(entries, key=lambda e: e["metrics"]["similarity_original"]["value"])
    print(f"wrote {out}/report.md, report.json and plots/ ({rows} pairs, {len(settings)} setting(s), seed {seed}"
          f"{rate}); best similarity with original image "
          f"{best['metrics']['similarity_original']['value']:.4f} at {Setting(**{k: best[k] for k in GRID_KEYS}).name}")
    return 0
