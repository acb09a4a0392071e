"""Batch throughput: prompts per second through the batch command's worker, by batch size.

    .venv/bin/python bench/throughput.py                      # CPU: batch sizes 1, 4, 16
    .venv/bin/python bench/throughput.py --device cuda --dtype float16 --batch-sizes 64,256,1024

Measures `prior.batch.Embedder.embed_rows` (what `python -m prior batch` runs per batch, local
or on Ray) at steps 64, candidates 2, cond_scale 1, after a two-step warm-up call per batch size, and
excludes loading. The weights are a random checkpoint of the real file's size and format
(tests.oracle.make_checkpoint(FULL)), built once into bench/cache/: speed does not depend on the
values. Prints a table and writes bench/results/throughput-<device>-<time>.json with the machine.
The load average is recorded too: on a shared machine, numbers taken under load are low.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.oracle and bench.common, when run as a script

from bench.common import full_checkpoint, write_json  # noqa: E402  (needs the path above)

CACHE = ROOT / "bench" / "cache"
RESULTS = ROOT / "bench" / "results"
def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: a full-size random checkpoint")
    parser.add_argument("--batch-sizes", default="1,4,16", help="comma-separated (default 1,4,16)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per batch size (default 1)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from prior.batch import Embedder, Settings

    weights = args.weights or full_checkpoint()
    info = machine()
    worker = Embedder()
    model = worker.load(str(weights), args.device, args.dtype, sha256=None)
    settings = Settings(candidates=args.candidates, cond_scale=1.0, steps=args.steps, seed=0, guidance="original",
                        sampler="ddpm", device=model["device"], dtype=model["dtype"], shard_size=1, emb_dtype="float32")

    def prompts(n: int, offset: int) -> list[str]:
        return [f"a photograph of object number {offset + i}, studio lighting" for i in range(n)]

    def sync() -> None:
        if model["device"].startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for size in batch_sizes:
        # warm-up at this batch size (allocator, kernels, caches): every step has the same shapes,
        # so two steps warm up as well as 64
        worker.embed_rows(0, prompts(size, 0), dataclasses.replace(settings, steps=2))
        sync()
        started = time.perf_counter()
        for r in range(args.repeats):
            worker.embed_rows(size * (r + 1), prompts(size, size * (r + 1)), settings)
        sync()
        seconds = time.perf_counter() - started
        rows.append({"batch_size": size, "prompts": size * args.repeats, "seconds": round(seconds, 3),
                     "prompts_per_second": round(size * args.repeats / seconds, 4)})
        print(f"batch {size:>5}: {rows[-1]['prompts_per_second']:9.3f} prompts/s "
              f"({rows[-1]['prompts']} prompts in {seconds:.1f} s)", file=sys.stderr, flush=True)

    best = max(rows, key=lambda r: r["prompts_per_second"])
    record = {"what": "prior.batch.Embedder.embed_rows throughput", "steps": args.steps,
              "candidates": args.candidates, "cond_scale": 1.0, "weights": "full-size random checkpoint"
              if args.weights is None else str(args.weights), "device": model["device"], "dtype": model["dtype"],
              "machine": {**info, "load_average_at_end": os.getloadavg()}, "results": rows,
              "best": {"batch_size": best["batch_size"], "prompts_per_second": best["prompts_per_second"]},
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = args.out or RESULTS / f"throughput-{model['device'].split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, record)

    print(f"\nsteps {args.steps}, candidates {args.candidates}, {model['device']} {model['dtype']}, "
          f"{info['cpu']} ({info['torch_threads']} threads), load average {info['load_average_at_start'][0]:.1f}")
    print(f"{'batch size':>10}  {'prompts/s':>10}  {'s/prompt':>9}")
    for row in rows:
        print(f"{row['batch_size']:>10}  {row['prompts_per_second']:>10.3f}  {1 / row['prompts_per_second']:>9.2f}")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
