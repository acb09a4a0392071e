"""`python -m prior search`: text -> the prior's image embedding -> nearest images in a CLIP index.

The index is a folder as clip-retrieval's `clip index` (autofaiss) writes it:

    INDEX/image.index            a FAISS index of CLIP image embeddings (id = row number)
    INDEX/metadata/*.parquet     optional: one line per id, files in sorted-name order
                                 (what clip-retrieval's ParquetMetadataProvider reads)

The query is the prior's chosen image embedding, L2-normalised as clip-retrieval normalises
its queries, so an inner-product index over normalised embeddings scores cosine similarity.
With --text-too the prompt's CLIP text embedding (normalised) queries the same index, which
is clip-retrieval's ordinary text search: the two result lists side by side show what the
prior adds.

Exit codes as the other commands: 2 for a bad argument (a missing index included), 1 for an
index or weights file that cannot be used (unreadable, or of another dimension than the prior).
"""

from __future__ import annotations

import argparse
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .arguments import add_sampling_arguments, add_trainer_entry_argument, check_device, int_in, load_for_sampling, prompt_text
from .contract import ArgumentError, PriorError
from .tables import parquet_files

IMAGE_INDEX = "image.index"  # clip-retrieval's name for the image side
LABEL_COLUMNS = ("caption", "prompt", "text", "TEXT", "url", "URL", "image_path")  # shown in the table
MAX_K = 10_000


class IndexFileError(PriorError):
    """An index folder that cannot be used; the message names the file and the problem."""


@dataclass
class Hit:
    rank: int
    id: int
    score: float
    metadata: dict


@dataclass
class ClipIndex:
    path: Path  # the .index file
    index: object  # faiss.Index
    metadata_files: list[tuple[Path, int, int]]  # (file, first id, row count), in id order

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric(self) -> str:
        import faiss

        return "inner_product" if self.index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"

    def search(self, queries, k: int) -> list[list[Hit]]:
        """Top k per query (fewer when the index holds fewer), each with its metadata line."""
        import numpy as np

        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        metadata = self.metadata_for(wanted)
        return [[Hit(rank + 1, int(i), float(s), metadata.get(int(i), {}))
                 for rank, (i, s) in enumerate((i, s) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0)]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def metadata_for(self, ids: list[int]) -> dict[int, dict]:
        """Metadata lines for `ids`, reading only the files that hold them."""
        import pyarrow.parquet as pq

        found: dict[int, dict] = {}
        for path, first, count in self.metadata_files:
            inside = [i for i in ids if first <= i < first + count]
            if inside:
                table = pq.read_table(path).take([i - first for i in inside])
                for i, line in zip(inside, table.to_pylist(), strict=True):
                    found[i] = {k: _jsonable(v) for k, v in line.items()}
        return found


def open_index(folder: Path, mmap: bool = False) -> ClipIndex:
    """Open INDEX (a clip-retrieval index folder, or an .index file whose folder has metadata/).
    `mmap` maps the file instead of reading it, for indexes larger than memory."""
    folder = Path(folder)
    if not folder.exists():
        raise ArgumentError("index", f"no such folder or file, got {str(folder)!r}")
    index_file = folder / IMAGE_INDEX if folder.is_dir() else folder
    if not index_file.is_file():
        raise ArgumentError("index", f"must hold {IMAGE_INDEX} (a clip-retrieval index folder), "
                            f"got {str(folder)!r} (no {str(index_file)!r})")
    import faiss

    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(index_file), flags)
    except RuntimeError as e:  # FAISS raises RuntimeError for every kind of bad file
        raise IndexFileError(f"{index_file}: not a readable FAISS index ({_first_line(e)})") from None
    if index.ntotal == 0:
        raise IndexFileError(f"{index_file}: holds no vectors (an empty index)")
    if not index.is_trained:
        raise IndexFileError(f"{index_file}: is not trained (an IVF or PQ index must be trained before vectors are added)")
    files = parquet_files(index_file.parent / "metadata", lambda path, problem: IndexFileError(f"{path}: {problem}"))
    rows = sum(count for _, _, count in files)
    if files and rows != index.ntotal:
        raise IndexFileError(f"{index_file.parent / 'metadata'}: holds {rows} metadata rows for {index.ntotal} "
                          "vectors in the index (not this index's metadata?)")
    return ClipIndex(index_file, index, files)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _jsonable(value):
    """Parquet values as JSON: numbers stay numbers, NaN becomes null, the rest becomes text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _normalised(vectors):
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The command


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "search", help="find the nearest images in a clip-retrieval / autofaiss index, queried with the prior",
        description="Query a FAISS index of CLIP image embeddings with the prior's image embedding of PROMPT.")
    parser.add_argument("prompt", metavar="PROMPT", type=prompt_text, help="the text to look up")
    parser.add_argument("--index", type=Path, required=True,
                        help=f"a clip-retrieval index folder ({IMAGE_INDEX}, metadata/*.parquet), or an .index file")
    parser.add_argument("--k", type=int_in(1, MAX_K), default=10, help=f"results to show (1..{MAX_K}, default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--mmap", action="store_true",
                        help="memory-map the index instead of reading it into RAM (for indexes larger than memory)")
    parser.add_argument("--text-too", action="store_true",
                        help="also query with CLIP's text embedding (plain text search), side by side")
    add_sampling_arguments(parser)
    add_trainer_entry_argument(parser)
    parser.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> int:
    check_device(args.device)
    index = open_index(args.index, mmap=args.mmap)  # before torch is even imported: a wrong path fails fast
    model = load_for_sampling(args)
    if index.dim != model.config.dim:
        raise IndexFileError(f"{index.path}: holds {index.dim}-dimensional embeddings, but this prior makes "
                             f"{model.config.dim}-dimensional ones (an index of another CLIP model?)")

    result = model.embed(args.prompt, candidates=args.candidates, cond_scale=args.cond_scale, steps=args.steps,
                         seed=args.seed, guidance=args.guidance, sampler=args.sampler)
    queries = {"image": result.image_embedding}
    if args.text_too:
        queries["text"] = result.text_embedding
    names = list(queries)
    hits = dict(zip(names, index.search(_normalised(_stack(queries.values())), args.k), strict=True))

    chosen = int(result.chosen[0])
    report = {
        "prompt": args.prompt,
        "seed": result.seed,
        "steps": result.steps,
        "cond_scale": result.cond_scale,
        "guidance": result.guidance,
        "sampler": result.sampler,
        "candidates": int(result.candidates.shape[1]),
        "chosen": chosen,
        "chosen_score": float(result.scores[0, chosen]),
        "truncated": bool(result.truncated[0]),
        "index": str(index.path),
        "index_count": index.count,
        "metric": index.metric,
        "k": args.k,
        **{f"{name}_query": [vars(h) for h in hits[name]] for name in names},
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(_table(report, hits))
    return 0


def _stack(arrays):
    import numpy as np

    return np.concatenate(list(arrays))


def _label(hit: Hit) -> str:
    for column in LABEL_COLUMNS:
        if hit.metadata.get(column) not in (None, ""):
            return printable(" ".join(str(hit.metadata[column]).split()))
    return ""


def printable(text: str) -> str:
    """Text safe to print on a terminal: control and format characters (an escape sequence
    hidden in a caption, `\\x1b[31m`) are shown escaped, not sent."""
    return "".join(c if unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in text)


def _table(report: dict, hits: dict[str, list[Hit]]) -> str:
    """A plain table: one block per query, side by side when there are two."""
    score_name = "cosine" if report["metric"] == "inner_product" else "L2 dist"
    lines = [f"query: {printable(repr(report['prompt']))} (seed {report['seed']}, steps {report['steps']}, candidate "
             f"{report['chosen']} of {report['candidates']}, score {report['chosen_score']:.4f}"
             f"{', truncated to 77 tokens' if report['truncated'] else ''})",
             f"index: {report['index']} ({report['index_count']} vectors, {report['metric'].replace('_', ' ')})"]
    columns = [(f"prior image embedding ({score_name})", hits["image"])]
    if "text" in hits:
        columns.append((f"CLIP text embedding ({score_name})", hits["text"]))
    width = 60 if len(columns) == 2 else 100

    def cell(hit: Hit | None) -> str:
        if hit is None:
            return ""
        text = f"{hit.score:8.4f}  #{hit.id:<8} {_label(hit)}"
        return text if len(text) <= width else text[: width - 1] + "…"

    lines.append("rank  " + " | ".join(f"{title:<{width}}" for title, _ in columns).rstrip())
    for rank in range(max(len(h) for _, h in columns)):
        cells = [cell(h[rank] if rank < len(h) else None) for _, h in columns]
        lines.append(f"{rank + 1:>4}  " + " | ".join(f"{c:<{width}}" for c in cells).rstrip())
    return "\n".join(lines)
