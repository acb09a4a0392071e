"""`python -m prior batch`: a file of prompts -> sharded embeddings, on one machine or a Ray cluster.

The output is the layout clip-retrieval writes and embedding-reader / autofaiss read:

    DIR/img_emb/img_emb_{i}.npy          (rows, D) the prior's image embedding, exactly as
                                         Prior.embed returns it (what CLIP-conditioned decoders take)
    DIR/text_emb/text_emb_{i}.npy        (rows, D) CLIP text embedding, L2-normalised
                                         (clip-retrieval's convention; the raw norm is in metadata)
    DIR/metadata/metadata_{i}.parquet    one line per row: row, source_row, prompt, seed, score,
                                         chosen, truncated, text_norm
    DIR/batch.json                       the run's settings; resuming demands the same ones

Rows are the non-blank prompts of INPUT in order; `source_row` says where each came from.
Shard i holds rows [i*M, (i+1)*M) for --shard-size M, its number zero-padded as clip-retrieval
does so that a sorted file listing is row order. Row r is sampled with seed (run seed + r) mod
2**32, whatever the batch it lands in or the worker that runs it.

A shard is finished when its three files exist with the right row count. Each file is written
under a temporary name and renamed, metadata last, so a run killed at any moment leaves at
worst an unfinished shard, which the next run with the same --out redoes.

The driver alone writes files; workers (this process, or Ray actors) only compute batches, so
a Ray run writes the same bytes as a single-process run with the same --batch-size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from . import contract
from .arguments import (
    add_batch_size_argument,
    add_sampling_arguments,
    check_device,
    folder_path,
    int_in,
    progress_bar,
    resolve_steps,
)
from .contract import SEED_LIMIT, ArgumentError
from .tables import TABLE_SUFFIXES, read_text_column

MANIFEST = "batch.json"
DEFAULT_TABLE_COLUMN = "caption"  # img2dataset's and clip-retrieval's name for the text column
# Settings that change the numbers in the files: a resumed run must repeat them exactly.
# (--batch-size, --ray and --workers do not change them.)
RESUME_KEYS = ("input_sha256", "rows", "weights_sha256", "candidates", "cond_scale", "steps", "seed",
               "guidance", "sampler", "device", "dtype", "shard_size", "emb_dtype")


# ---------------------------------------------------------------------------------------------
# Input


@dataclass
class Prompts:
    texts: list[str]  # the non-blank prompts, in file order: row r is texts[r]
    source_rows: list[int]  # 0-based line (text file) or row (table) of INPUT each came from

    def sha256(self) -> str:
        """A fingerprint of exactly what gets embedded, to refuse resuming on a changed INPUT."""
        digest = hashlib.sha256()
        for source_row, text in zip(self.source_rows, self.texts, strict=True):
            data = text.encode("utf-8")
            digest.update(source_row.to_bytes(8, "little") + len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()


def read_prompts(path: Path, column: str | None = None) -> Prompts:
    """Prompts from a text file (one a line) or a Parquet/CSV file's `column`.

    Blank prompts (empty, only whitespace, or null) are skipped: they have no embedding.
    Raises ArgumentError naming INPUT or --column.
    """
    path = Path(path)
    if not path.exists():
        raise ArgumentError("input", f"no such file, got {str(path)!r}")
    if not path.is_file():
        raise ArgumentError("input", f"must be a file, got {str(path)!r} (not a regular file)")
    kind = TABLE_SUFFIXES.get(path.suffix.lower(), "text")
    if kind == "text":
        if column is not None:
            raise ArgumentError("column", f"only for .parquet or .csv INPUT, got --column {column!r} "
                                f"with the text file {str(path)!r}")
        values = _read_text_lines(path)
    else:
        values = read_text_column(path, kind, column or DEFAULT_TABLE_COLUMN)
    texts, source_rows = [], []
    for i, value in enumerate(values):
        if value is not None and value.strip():
            texts.append(value)
            source_rows.append(i)
    if not texts:
        what = "lines" if kind == "text" else f"values in column {column or DEFAULT_TABLE_COLUMN!r}"
        raise ArgumentError("input", f"holds no prompts (no non-blank {what}), got {str(path)!r}")
    return Prompts(texts, source_rows)


def _read_text_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArgumentError("input", f"cannot be read, got {str(path)!r} ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ArgumentError("input", f"must be UTF-8 text, got {str(path)!r} (invalid byte on line {line}); "
                            "for a table use a .parquet or .csv file") from None
    # Only "\n" ends a line (str.splitlines would also split on form feeds and U+2028 inside prompts).
    return [line.removesuffix("\r") for line in text.split("\n")]


# ---------------------------------------------------------------------------------------------
# The job: settings, shards, and the files of one shard


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers written."""

    candidates: int
    cond_scale: float
    steps: int
    seed: int
    guidance: str
    sampler: str
    device: str  # "cpu" or "cuda": the same prompt and seed differ in the last bits between them
    dtype: str  # network precision, as resolved on the workers
    shard_size: int
    emb_dtype: str


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row
    stop: int  # one past the last row

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(rows: int, shard_size: int) -> list[Shard]:
    return [Shard(i, start, min(start + shard_size, rows)) for i, start in enumerate(range(0, rows, shard_size))]


def shard_paths(out: Path, shard: Shard, shard_count: int) -> dict[str, Path]:
    """The three files of a shard, keyed img/text/meta. Numbers are zero-padded to a common
    width, as clip-retrieval does, so sorted file names are in row order (embedding-reader
    and clip-retrieval's metadata reader both rely on sorted names)."""
    number = str(shard.index).zfill(len(str(shard_count)))
    return {
        "img": out / "img_emb" / f"img_emb_{number}.npy",
        "text": out / "text_emb" / f"text_emb_{number}.npy",
        "meta": out / "metadata" / f"metadata_{number}.parquet",
    }


def is_finished(paths: dict[str, Path], rows: int) -> bool:
    """All three files are there and hold `rows` rows; anything else is redone."""
    import numpy as np
    import pyarrow.parquet as pq

    try:
        if pq.read_metadata(paths["meta"]).num_rows != rows:
            return False
        return all(np.load(paths[k], mmap_mode="r").shape[0] == rows for k in ("img", "text"))
    except Exception:  # missing, truncated or not ours: whatever the error, the shard is redone
        return False


def write_shard(paths: dict[str, Path], columns: dict, emb_dtype: str) -> None:
    """Write one shard's three files whole (contract.atomic_paths), renamed into place together,
    metadata last: from then on the shard counts as finished."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "row": pa.array(columns["row"], pa.int64()),
        "source_row": pa.array(columns["source_row"], pa.int64()),
        "prompt": pa.array(columns["prompt"], pa.string()),
        "seed": pa.array(columns["seed"], pa.int64()),
        "score": pa.array(columns["score"], pa.float32()),
        "chosen": pa.array(columns["chosen"], pa.int64()),
        "truncated": pa.array(columns["truncated"], pa.bool_()),
        "text_norm": pa.array(columns["text_norm"], pa.float32()),
    })
    with contract.atomic_paths([paths["img"], paths["text"], paths["meta"]]) as (img, text, meta):
        for partial, key in ((img, "img"), (text, "text")):
            with open(partial, "wb") as f:
                np.save(f, np.ascontiguousarray(columns[key], dtype=emb_dtype))
        pq.write_table(table, meta)


# ---------------------------------------------------------------------------------------------
# The worker: one loaded model, batches in, arrays out. Runs in this process or as a Ray actor.


class Embedder:
    """Turns a batch of rows into the columns of the output files."""

    def __init__(self) -> None:
        self.model = None

    def load(self, weights: str, device: str | None, dtype: str | None, sha256: str | None,
             threads: int | None = None) -> dict:
        """Load the weights (verified against `sha256` when given); describe the model."""
        import torch

        from .pipeline import load

        if threads:
            torch.set_num_threads(threads)
        self.model = load(weights, device=device, dtype=dtype, expected_sha256=sha256)
        return {"dim": self.model.config.dim, "num_timesteps": self.model.config.num_timesteps,
                "device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                "host": platform.node()}

    def embed_rows(self, first_row: int, prompts: list[str], settings: Settings) -> dict:
        """Rows first_row.. of the job: row r uses seed (settings.seed + r) mod 2**32, because
        Prior.embed gives prompt i of a call the call's seed + i."""
        import numpy as np

        result = self.model.embed(prompts, candidates=settings.candidates, cond_scale=settings.cond_scale,
                                  steps=settings.steps, seed=(settings.seed + first_row) % SEED_LIMIT,
                                  guidance=settings.guidance, sampler=settings.sampler)
        text_norm = np.linalg.norm(result.text_embedding, axis=1)
        rows = np.arange(len(prompts))
        return {
            "img": result.image_embedding,
            "text": result.text_embedding / np.maximum(text_norm, np.finfo(np.float32).tiny)[:, None],
            "seed": list(result.seeds),
            "score": result.scores[rows, result.chosen],
            "chosen": result.chosen,
            "truncated": list(result.truncated),
            "text_norm": text_norm,
        }

    def embed_rows_at(self, first_row: int, prompts: list[str], settings: Settings) -> tuple[int, dict]:
        """embed_rows, labelled with its first row (Ray hands results back in completion order)."""
        return first_row, self.embed_rows(first_row, prompts, settings)


# ---------------------------------------------------------------------------------------------
# Running a job


@dataclass
class Job:
    out: Path
    prompts: Prompts
    settings: Settings
    batch_size: int
    shards: list[Shard]
    todo: list[Shard]  # the unfinished ones

    def batches(self) -> Iterator[tuple[int, list[str]]]:
        """(first row, prompts) for every batch still to do; a batch never spans shards."""
        for shard in self.todo:
            for start in range(shard.start, shard.stop, self.batch_size):
                yield start, self.prompts.texts[start : min(start + self.batch_size, shard.stop)]

    def rows_done(self) -> int:
        return sum(s.rows for s in self.shards) - sum(s.rows for s in self.todo)


class ShardAssembler:
    """Collects batch results, in any order, and writes each shard once all its rows are in."""

    def __init__(self, job: Job, on_rows: Callable[[int], None]):
        self.job, self.on_rows = job, on_rows
        self.pending: dict[int, dict[int, dict]] = {}  # shard index -> first row of a batch -> its result
        self.written = 0

    def add(self, first_row: int, part: dict) -> None:
        shard = self.job.shards[first_row // self.job.settings.shard_size]
        parts = self.pending.setdefault(shard.index, {})
        parts[first_row] = part
        self.on_rows(len(part["seed"]))
        if sum(len(p["seed"]) for p in parts.values()) == shard.rows:
            del self.pending[shard.index]
            self._write(shard, [parts[row] for row in sorted(parts)])

    def _write(self, shard: Shard, parts: list[dict]) -> None:
        import numpy as np

        columns = {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}
        columns["row"] = np.arange(shard.start, shard.stop)
        columns["source_row"] = self.job.prompts.source_rows[shard.start : shard.stop]
        columns["prompt"] = self.job.prompts.texts[shard.start : shard.stop]
        write_shard(shard_paths(self.job.out, shard, len(self.job.shards)), columns, self.job.settings.emb_dtype)
        self.written += 1


class LocalWorker:
    """One model in this process."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.embedder = args, Embedder()
        self.weights_sha256: str | None = None

    def start(self) -> dict:
        from .checkpoint import sha256_of

        args = self.args
        description = self.embedder.load(str(args.weights), args.device, args.dtype, args.sha256)
        self.weights_sha256 = self.embedder.model.weights_sha256 or sha256_of(args.weights)
        return description

    def map(self, units: list[tuple[int, list[str]]], settings: Settings) -> Iterator[tuple[int, dict]]:
        for first_row, prompts in units:
            yield first_row, self.embedder.embed_rows(first_row, prompts, settings)

    def close(self) -> None:
        pass


def cpu_threads_per_worker(node_cpus: list[int], workers: int) -> int:
    """The most CPUs each of `workers` actors can have so that all of them fit on the nodes
    (an actor lives on one node); 0 if they cannot all fit even with one CPU each."""
    for threads in range(max(node_cpus, default=0), 0, -1):
        if sum(cpus // threads for cpus in node_cpus) >= workers:
            return threads
    return 0


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, with one line, where ray.init would retry a wrong address for minutes:
    the address must be host:port or ray://host:port, and something must listen there."""
    import importlib.util
    import socket

    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ArgumentError("ray", f"must be 'auto', 'local', HOST:PORT or ray://HOST:PORT, got {contract.shown(address)}")
    if client and importlib.util.find_spec("grpc") is None:
        raise ArgumentError("ray", "a ray:// address needs Ray Client: pip install 'ray[client]==2.60.0'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ArgumentError("ray", f"cannot reach a Ray cluster at {contract.shown(address)} "
                                   f"({contract.os_reason(e) if e.strerror else 'no answer'})") from None


class RayWorkers:
    """Ray actors, one model each (one per GPU, or CPU actors sharing the cores). The results
    come back to this process, which writes every file: the output does not depend on the
    workers, and only the driver needs to see DIR."""

    def __init__(self, args: argparse.Namespace):
        from .checkpoint import WeightsError, sha256_of

        if args.ray not in ("auto", "local"):
            check_ray_address(args.ray)
        self.args, self.ray, self.actors = args, None, []
        weights = Path(args.weights)
        if not weights.is_file():
            raise WeightsError(weights, "file not found" if not weights.exists() else "not a regular file")
        # Every worker loads its own copy (same path on every node) and checks it against this.
        self.weights_sha256 = args.sha256 or sha256_of(weights)

    def start(self) -> dict:
        import logging

        args = self.args
        try:
            import ray
        except ImportError:
            raise ArgumentError("ray", "needs the 'ray' package (pip install ray)") from None
        # "auto": the cluster in RAY_ADDRESS or the one `ray start` began on this machine, else a
        # new local one; "local": always a new local one; anything else: that cluster's address.
        try:
            ray.init(address=None if args.ray == "auto" else args.ray, include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ArgumentError("ray", f"cannot reach a Ray cluster at {args.ray!r} "
                                f"({str(e).strip().splitlines()[0]})") from None
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        # More workers than the cluster can place would wait for resources forever.
        if gpus and args.device != "cpu":  # one model per GPU
            count, options, threads = args.workers or gpus, {"num_gpus": 1, "num_cpus": 1}, None
            if count > gpus:
                raise ArgumentError("workers", f"at most one per GPU ({gpus} in the cluster), got {count}")
        elif args.device == "cuda":
            raise ArgumentError("device", f"the Ray cluster at {args.ray!r} has no GPU, got 'cuda'")
        else:  # CPU workers share the cluster's cores
            count = args.workers or 1
            node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
            threads = cpu_threads_per_worker(node_cpus, count)
            if threads == 0:
                raise ArgumentError("workers", f"at most one per CPU ({cpus} in the cluster), got {count}")
            options = {"num_cpus": threads}
        remote = ray.remote(Embedder).options(**options)
        self.actors = [remote.remote() for _ in range(count)]
        weights = str(Path(args.weights).resolve())
        described = self._get([a.load.remote(weights, args.device, args.dtype, self.weights_sha256, threads)
                               for a in self.actors])
        kinds = {(d["device"], d["dtype"]) for d in described}
        if len(kinds) > 1:  # mixed precisions would make a row depend on the worker that ran it
            raise ArgumentError("ray", f"workers disagree on device and dtype {sorted(kinds)}; "
                                "set --device and --dtype")
        hosts = {d["host"] for d in described}
        print(f"ray: {count} worker(s) on {len(hosts)} node(s), {described[0]['device']} {described[0]['dtype']}",
              file=sys.stderr)
        return described[0]

    def map(self, units: list[tuple[int, list[str]]], settings: Settings) -> Iterator[tuple[int, dict]]:
        from ray.util import ActorPool

        def submit(actor, unit):
            first_row, prompts = unit
            return actor.embed_rows_at.remote(first_row, prompts, settings)

        # In completion order, so no worker waits for a slower one; units go out in row order,
        # so only the shards being worked on are held here.
        results = ActorPool(self.actors).map_unordered(submit, units)
        while True:
            try:
                yield self._unwrap(lambda: next(results))
            except StopIteration:
                return

    def _get(self, refs):
        return self._unwrap(lambda: self.ray.get(refs))

    def _unwrap(self, call):
        """A worker's exception (a bad weights file, say), not Ray's wrapper around it."""
        try:
            return call()
        except self.ray.exceptions.RayTaskError as e:
            raise (getattr(e, "cause", None) or e) from None

    def close(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The run directory's manifest


def read_manifest(out: Path) -> dict | None:
    """The previous run's record in `out`, or None when there is none."""
    return contract.read_manifest(out / MANIFEST, "batch")


def check_manifest(out: Path, previous: dict | None, record: dict) -> None:
    """Refuse to mix two runs' shards in one folder: a manifest with other settings, or shards
    with no manifest to say which run wrote them."""
    stray = next((p for folder in ("img_emb", "text_emb", "metadata") for p in sorted((out / folder).glob("*"))), None)
    contract.check_same_run(out, previous, record, RESUME_KEYS, stray, "shards", MANIFEST)


def remove_partials(folder: Path) -> None:
    """Delete the temporary files (`.*.partial`) a killed run left in `folder`: the shards they
    belonged to are unfinished and will be written again."""
    for partial in folder.glob(".*.partial"):
        partial.unlink(missing_ok=True)


def write_manifest(out: Path, record: dict) -> None:
    with contract.atomic_path(out / MANIFEST) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")


def manifest_seed(previous: dict | None) -> int | None:
    """The seed a previous run in the folder drew, so that resuming needs no --seed."""
    seed = (previous or {}).get("seed")
    return seed if contract.is_integer(seed) and 0 <= seed < SEED_LIMIT else None


# ---------------------------------------------------------------------------------------------
# The command


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "batch", help="embed a file of prompts into sharded .npy + .parquet files (clip-retrieval's layout)",
        description="Embed every non-blank prompt of INPUT; resumable; --ray runs it on a Ray cluster.")
    parser.add_argument("input", metavar="INPUT", type=Path,
                        help="a text file (one prompt a line; blank lines skipped), or a .parquet / .csv file")
    add_sampling_arguments(parser)
    parser.add_argument("--out", type=folder_path, required=True,
                        help="output directory: img_emb/, text_emb/, metadata/, batch.json; rerun to resume")
    parser.add_argument("--column", default=None,
                        help=f"the prompt column of a .parquet / .csv INPUT (default: {DEFAULT_TABLE_COLUMN!r})")
    add_batch_size_argument(parser, "; does not change the results")
    parser.add_argument("--shard-size", type=int_in(1, 100_000_000), default=100_000,
                        help="rows per output file, and the unit of resumption (default 100000)")
    parser.add_argument("--emb-dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the .npy files (default float32; float16 halves them, as clip-retrieval)")
    parser.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                        help="run on Ray: 'auto' joins the running cluster (RAY_ADDRESS, or `ray start` here) or "
                             "starts one; 'local' starts one here; else a cluster address such as ray://head:10001")
    parser.add_argument("--workers", type=int_in(1, 100_000), default=None,
                        help="Ray workers, one model each (default: one per GPU in the cluster; 1 without GPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    if args.workers is not None and args.ray is None:
        raise ArgumentError("workers", f"only with --ray, got {args.workers}")
    if args.ray is not None and not args.ray.strip():
        raise ArgumentError("ray", "must be 'auto', 'local' or a cluster address, got ''")
    out = Path(args.out)
    contract.check_output_folder("out", out)
    prompts = read_prompts(args.input, args.column)  # before the slow part: bad input fails fast
    previous = read_manifest(out) if out.is_dir() else None
    if args.ray is None:
        check_device(args.device)

    args.weights = contract.resolve_weights(args.weights, args.sha256)
    args.interrupted = f"interrupted; finished shards in {out}/ are kept: rerun the same command to resume"
    workers = None
    try:
        workers = LocalWorker(args) if args.ray is None else RayWorkers(args)
        model = workers.start()
        args.steps = resolve_steps(args.steps, model["num_timesteps"])
        seed = args.seed if args.seed is not None else manifest_seed(previous)
        if seed is None:
            import secrets

            seed = secrets.randbelow(SEED_LIMIT)
        settings = Settings(candidates=args.candidates, cond_scale=args.cond_scale, steps=args.steps, seed=seed,
                            guidance=args.guidance, sampler=args.sampler, device=model["device"].split(":")[0],
                            dtype=model["dtype"], shard_size=args.shard_size, emb_dtype=args.emb_dtype)
        record = {**asdict(settings), "input_sha256": prompts.sha256(), "rows": len(prompts.texts),
                  "weights_sha256": workers.weights_sha256, "input": str(Path(args.input).resolve()),
                  "column": args.column, "weights": str(Path(args.weights).resolve()), "dim": model["dim"],
                  "img_emb": "the prior's image embedding as Prior.embed returns it (not re-normalised)",
                  "text_emb": "CLIP's text embedding, L2-normalised (metadata text_norm holds the raw norm)"}
        check_manifest(out, previous, record)

        shards = plan_shards(len(prompts.texts), args.shard_size)
        todo = [s for s in shards if not is_finished(shard_paths(out, s, len(shards)), s.rows)]
        job = Job(out, prompts, settings, args.batch_size, shards, todo)
        for folder in ("img_emb", "text_emb", "metadata"):
            (out / folder).mkdir(parents=True, exist_ok=True)
            remove_partials(out / folder)
        write_manifest(out, record)

        bar = progress_bar(len(prompts.texts), args.quiet, desc="embedding", unit="prompt", initial=job.rows_done())
        started = time.perf_counter()
        try:
            assembler = ShardAssembler(job, bar.update)
            for first_row, part in workers.map(list(job.batches()), settings):
                assembler.add(first_row, part)
        finally:
            bar.close()
    finally:
        if workers is not None:
            workers.close()
    seconds = time.perf_counter() - started
    computed = sum(s.rows for s in todo)
    rate = f", {computed / seconds:.2f} prompts/s" if computed and seconds > 0 else ""
    skipped = len(shards) - len(todo)
    print(f"wrote {assembler.written} shard(s), {computed} rows, to {out}/ (seed {seed}"
          f"{f'; {skipped} finished shard(s) skipped' if skipped else ''}{rate})")
    return 0
