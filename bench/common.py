"""Helpers shared by the CPU and GPU benchmarks (bench/cpu.py, bench/gpu.py).

What lives here: the cached full-size random checkpoint (and its safetensors copy when the
engine can write one), the oracle's own sampling loop cut to a few steps, interleaved
timing, deviation measures, the facts about the machine, the table and the JSON file.

It also runs as a child process, so that each implementation's load time and peak memory
are measured in a fresh interpreter that has never held the other one:

    python -m bench.common footprint --impl ours|oracle --weights PATH [--device cpu] [--dtype float32] [--steps 4]
        [--threads N] [--shape full|tiny]

prints one JSON line (import, load and sampling seconds, RSS high-water marks in MiB, from
/proc/self/status VmHWM: see peak_rss_mib).
Only bench/ and tests/ import the oracle (tests/oracle.py); prior/ never does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prior import contract

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PRIOR_BENCH_CACHE", REPO / "bench" / "cache"))
RESULTS = REPO / "bench" / "results"
TEST_CACHE = Path(os.environ.get("PRIOR_TEST_CACHE", Path.home() / ".cache" / "conditioned-prior-tests"))
CHECKPOINT_NAME = "full-seed0.pth"  # tests.oracle.make_checkpoint(path, FULL, seed=0)

# Two prompts, so a batch of 4 rows is 2 prompts x 2 candidates (the product's default).
PROMPTS = ("a photograph of a red cube on a wooden table", "an oil painting of a lighthouse at dusk, waves crashing")
SEED = 0
GUIDED_COND_SCALE = 3.0  # any value but 1 turns guidance (the unconditional pass) on


# -- the checkpoint ---------------------------------------------------------------------

def sampler_at(steps: int) -> str:
    """The sampler of a prediction row: 0.11.5's own (ddpm) at all 1000 steps, the original the
    oracle is compared with; the default sampler at fewer."""
    return "ddpm" if steps == 1000 else contract.DEFAULT_SAMPLER


def full_checkpoint(cache: Path = CACHE) -> Path:
    """The full-size random checkpoint (1.35 GB), built once (about a minute) and cached.

    The tests cache the same file (same builder, same seed); when it is there and on the
    same file system it is hard-linked instead of rebuilt.
    """
    path = cache / CHECKPOINT_NAME
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tests_copy = TEST_CACHE / CHECKPOINT_NAME
    if tests_copy.exists():
        try:
            os.link(tests_copy, path)
            return path
        except OSError:
            pass  # another file system: build our own
    from tests.oracle import FULL, make_checkpoint

    print(f"building the full-size random checkpoint at {path} (about a minute) ...", file=sys.stderr, flush=True)
    return make_checkpoint(path, FULL, seed=0)


def tiny_checkpoint(cache: Path = CACHE) -> Path:
    """A tiny random checkpoint (tests.oracle.TINY) for smoke runs of the benchmark code itself."""
    path = cache / "tiny-seed0.pth"
    if not path.exists():
        from tests.oracle import TINY, make_checkpoint

        make_checkpoint(path, TINY, seed=0)
    return path


def oracle_shape(name: str):
    """tests.oracle's shape for "full" or "tiny"."""
    from tests.oracle import FULL, TINY

    return {"full": FULL, "tiny": TINY}[name]


def safetensors_converter() -> Callable | None:
    """prior.checkpoint.convert_to_safetensors when the engine has it, else None."""
    import prior.checkpoint

    return getattr(prior.checkpoint, "convert_to_safetensors", None)


def converted_checkpoint(source: Path, dtype: str | None = None) -> Path | None:
    """The safetensors copy of `source` written by the engine's converter, made once and
    cached beside it (`<name>.safetensors`, or `<name>.<dtype>.safetensors` with the weights
    stored in `dtype`); None when the engine has no converter, or none that takes a dtype.
    """
    convert = safetensors_converter()
    if convert is None:
        return None
    parameters = inspect.signature(convert).parameters
    if dtype is not None and "dtype" not in parameters:
        return None
    target = source.with_suffix(f".{dtype}.safetensors" if dtype else ".safetensors")
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    print(f"converting {source.name} to {target.name} ...", file=sys.stderr, flush=True)
    options = {"dtype": getattr(torch, dtype)} if dtype else {}
    written = Path(convert(source, target, **options) or target)
    if not written.exists():
        raise RuntimeError(f"convert_to_safetensors did not write {written}")
    return written


# -- the oracle's own sampling loop, cut short ------------------------------------------

@torch.no_grad()
def oracle_text_condition(oracle, tokens: torch.Tensor, candidates: int) -> dict:
    """The text_cond dict DiffusionPrior.sample builds: each prompt repeated `candidates` times."""
    text = tokens.repeat_interleave(candidates, dim=0).to(oracle.device)
    text_embed, text_encodings, text_mask = oracle.clip.embed_text(text)
    return {"text_embed": text_embed, "text_encodings": text_encodings, "mask": text_mask}


@torch.no_grad()
def oracle_sample_steps(oracle, tokens: torch.Tensor, seed: int, candidates: int, cond_scale: float, steps: int,
                        sync: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, float, float]:
    """The first `steps` steps (t = 999 down) of 0.11.5's DiffusionPrior.sample, as its own
    p_sample_loop runs them, after torch.manual_seed(seed).

    Returns (x after those steps, text-encoding seconds, sampling-loop seconds). Used to
    time the oracle per step without running all 1000 steps, and to compare our trajectory.
    """
    torch.manual_seed(seed)
    started = time.perf_counter()
    text_cond = oracle_text_condition(oracle, tokens, candidates)
    sync()
    text_seconds = time.perf_counter() - started
    batch = text_cond["text_embed"].shape[0]
    started = time.perf_counter()
    x = torch.randn((batch, oracle.image_embed_dim), device=oracle.device)
    total = oracle.noise_scheduler.num_timesteps
    for t in range(total - 1, total - 1 - steps, -1):
        times = torch.full((batch,), t, device=oracle.device, dtype=torch.long)
        x = oracle.p_sample(x, times, text_cond=text_cond, cond_scale=cond_scale)
    sync()
    return x, text_seconds, time.perf_counter() - started


# -- timing -----------------------------------------------------------------------------

@dataclass
class Timing:
    """Wall-clock seconds of repeated calls; the median is what tables report."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def record(self) -> dict:
        return {"median_s": self.median, "min_s": self.best, "n": len(self.seconds), "samples_s": self.seconds}


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Time each call `repeats` times, taking turns (a, b, a, b, ...), after `warmup` untimed
    rounds. Taking turns spreads any slow spell of a shared machine over every contender."""
    timings = {name: Timing() for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            sync()
            started = time.perf_counter()
            call()
            sync()
            if round_ >= warmup:
                timings[name].seconds.append(time.perf_counter() - started)
    return timings


def ratio(slow: float | None, fast: float | None) -> float | None:
    """How many times faster `fast` is (oracle seconds / our seconds)."""
    if slow is None or fast is None or fast <= 0:
        return None
    return slow / fast


# -- deviation --------------------------------------------------------------------------

def deviation(value: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far `value` is from `reference`, both (rows, D), in float64.

    cosine_min: the lowest per-row cosine similarity. max_rel_err: the largest absolute
    difference over the largest reference magnitude (elementwise ratios blow up near 0).
    rel_l2: ||value - reference|| / ||reference||.
    """
    a = value.detach().double().cpu().reshape(-1, value.shape[-1])
    b = reference.detach().double().cpu().reshape(-1, reference.shape[-1])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "cosine_min": float(cosine.min()),
        "max_rel_err": float((a - b).abs().max() / b.abs().max()),
        "rel_l2": float((a - b).norm() / b.norm()),
    }


# -- the machine ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    """What the numbers were measured on: CPU, threads, GPU, versions, load right now."""
    flags = cpu_flags()
    info = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16_features": sorted(f for f in flags if f in {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512f"}),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "gpu_name": None,
        "cuda_version": None,
    }
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def machine_slug(info: dict) -> str:
    """A file-name-safe name for the machine: the GPU's if any, else the CPU's and its threads."""
    if info.get("gpu_name"):
        name = info["gpu_name"]
    else:
        name = f"{info['cpu_model']}-{info['torch_threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_path(info: dict, directory: Path = RESULTS) -> Path:
    """bench/results/<machine>-<date>.json (a rerun on the same day replaces the file)."""
    return directory / f"{machine_slug(info)}-{info['date_utc'][:10]}.json"


def write_json(path: Path, record: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


# -- the table --------------------------------------------------------------------------

def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 600:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def print_table(headers: list[str], rows: list[list[str]], file=sys.stdout) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line, file=file)
    print("-" * len(line), file=file)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)), file=file)


# -- load time and peak memory in a fresh process -----------------------------------------

def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark, in MiB.

    Linux's VmHWM, not getrusage's ru_maxrss: across fork + exec, Linux carries the parent's
    high-water mark into the child's ru_maxrss, so a child started by a process holding
    3 GB would report at least 3 GB. VmHWM belongs to the child's own address space.
    ru_maxrss is the fallback where /proc is missing.
    """
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_parts_mib() -> dict:
    """Resident memory now, split into anonymous (tensors made in memory) and file-backed
    (memory-mapped weights, shared libraries) pages."""
    return {"rss_anon_mib": _proc_status_mib("RssAnon"), "rss_file_mib": _proc_status_mib("RssFile")}


def measure_footprint(impl: str, weights: Path, device: str = "cpu", dtype: str = "float32", steps: int = 4,
                      threads: int | None = None, shape: str = "full", timeout: float = 900) -> dict:
    """Run `python -m bench.common footprint ...` in a fresh interpreter and return its JSON."""
    command = [sys.executable, "-m", "bench.common", "footprint", "--impl", impl, "--weights", str(weights),
               "--device", device, "--dtype", dtype, "--steps", str(steps), "--shape", shape]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"footprint child failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _footprint(args: argparse.Namespace) -> dict:
    """Load one implementation from `args.weights`, then sample `args.steps` steps for one
    prompt and 2 candidates; report seconds and RSS high-water marks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    record = {"impl": args.impl, "weights": str(args.weights), "device": args.device, "steps": args.steps,
              "rss_mib_at_start": peak_rss_mib()}
    started = time.perf_counter()
    if args.impl == "ours":
        import prior

        record["import_s"] = time.perf_counter() - started
        record["rss_mib_after_import"] = peak_rss_mib()
        started = time.perf_counter()
        model = prior.load(args.weights, device=device, dtype=args.dtype)
        sync()
        record["load_s"] = time.perf_counter() - started
        record["dtype"] = args.dtype
        record["warmup_s"] = 0.0
        if hasattr(model, "warmup"):  # prior/predictor.py's setup() warms up after loading
            started = time.perf_counter()
            model.warmup()
            sync()
            record["warmup_s"] = time.perf_counter() - started
        record["setup_s"] = record["load_s"] + record["warmup_s"]
        record["peak_rss_mib_after_load"] = peak_rss_mib()
        record["after_load"] = rss_parts_mib()
        started = time.perf_counter()
        model.embed(PROMPTS[0], candidates=2, steps=args.steps, seed=SEED)
        sync()
        record["first_embed_s"] = time.perf_counter() - started
    else:
        from tests.oracle import build_oracle

        record["import_s"] = time.perf_counter() - started  # the oracle's imports happen inside build
        record["rss_mib_after_import"] = peak_rss_mib()
        started = time.perf_counter()
        oracle = build_oracle(oracle_shape(args.shape))  # exactly tests.oracle.load_oracle, timed in its parts
        record["build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        record["torch_load_s"] = time.perf_counter() - started
        started = time.perf_counter()
        oracle.load_state_dict(state, strict=True)
        oracle = oracle.float().eval().to(device)
        del state
        sync()
        record["load_state_dict_s"] = time.perf_counter() - started
        record["load_s"] = record["build_s"] + record["torch_load_s"] + record["load_state_dict_s"]
        record["setup_s"] = record["load_s"]  # LAION's setup(): build, load_state_dict, move; no warm-up
        record["dtype"] = "float32"
        record["peak_rss_mib_after_load"] = peak_rss_mib()
        record["after_load"] = rss_parts_mib()
        import prior.text

        tokens, _ = prior.text.Tokenizer()([PROMPTS[0]])
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            oracle_sample_steps(oracle, tokens, SEED, 2, 1.0, args.steps, sync)
        record["first_embed_s"] = time.perf_counter() - started
    record["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        record["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.common")
    commands = parser.add_subparsers(dest="command", required=True)
    footprint = commands.add_parser("footprint", help="load one implementation in this fresh process; print JSON")
    footprint.add_argument("--impl", choices=["ours", "oracle"], required=True)
    footprint.add_argument("--weights", type=Path, required=True)
    footprint.add_argument("--device", default="cpu")
    footprint.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    footprint.add_argument("--steps", type=int, default=4)
    footprint.add_argument("--threads", type=int, default=None)
    footprint.add_argument("--shape", choices=["full", "tiny"], default="full", help="the oracle's shape (tiny: smoke runs)")
    args = parser.parse_args(argv)
    print(json.dumps(_footprint(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
