"""GPU benchmark: our engine against dalle2-pytorch 0.11.5 under fp16 autocast, same checkpoint.

Run it through bench/gpu.sh on a GPU machine (it installs what is missing and builds
the checkpoint first); by hand, from the repository root:

    python -m bench.gpu --out-dir DIR [--weights PATH] [--budget-s 270]

What it measures, in one process, timings taken in turns and in CUDA-synchronised loops:
- one network step at batch 2 and 4, with and without guidance: the oracle's
  `net.forward_with_cond_scale` under torch.autocast(float16) (how the original predictor
  ran), against our step (`Prior._denoiser`, what `Prior.embed` calls) in float16 and
  bfloat16 as the engine runs it (replaying its captured CUDA graph), and in float16
  eager (`prior.load(..., cuda_graphs=False)`). An engine without that option gets the
  bench's own capture of its step instead, as "float16_graph".
- whole predictions, 1 prompt x 2 candidates, 64 and 1000 steps, end to end through
  `Prior.embed` (whatever the engine does inside: graphs, warm-up), first call apart.
  The oracle's: its per-step time over the first --oracle-steps steps of its own sampling
  loop times the step count ("extrapolated"); its real 1000-step sample is run as well
  when the time budget allows it ("measured").
- load (setup) time and peak GPU memory and RSS, each in a fresh child process.
- deviation of float16 and bfloat16 from our float32 on the GPU (same seed), and of our
  float32 from the oracle's float32 on one step.
JSON goes to DIR/<gpu>-<date>.json; a table to stdout.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import prior
from bench.common import (
    CACHE,
    GUIDED_COND_SCALE,
    PROMPTS,
    RESULTS,
    SEED,
    converted_checkpoint,
    deviation,
    fmt_ratio,
    fmt_seconds,
    full_checkpoint,
    machine_info,
    measure_footprint,
    oracle_sample_steps,
    oracle_shape,
    oracle_text_condition,
    print_table,
    ratio,
    results_path,
    sampler_at,
    time_interleaved,
    tiny_checkpoint,
    write_json,
)
from tests.oracle import uniform  # noqa: E402  (Prior._denoiser's per-prompt settings)

# The GPU targets.
TARGET_64_STEPS_S = 0.100
TARGET_1000_STEPS_S = 1.5
TARGET_STEP_RATIO = 10.0
TARGET_FP16_COSINE = 0.999
TARGET_LOAD_FRACTION = 1 / 3
GRAPH_OPTION_NAMES = ("cuda_graphs", "cuda_graph", "graphs", "use_cuda_graphs", "capture")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def capture_graph(denoise, x: torch.Tensor, t: torch.Tensor):
    """One denoise(x, t, 1) call captured in a CUDA graph on static copies of x and t.
    Returns replay() -> the static output tensor."""
    static_x, static_t = x.clone(), t.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
        for _ in range(3):
            denoise(static_x, static_t, 1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = denoise(static_x, static_t, 1)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_out

    return replay


def looped(call, n: int):
    """`call` n times in a row: GPU steps are timed over a loop, not one launch at a time."""
    def run():
        for _ in range(n):
            call()
    return run


class GpuBench:
    def __init__(self, args: argparse.Namespace, weights: Path, started: float):
        self.args, self.weights = args, weights
        self.device = torch.device(args.device)
        self.shape = "tiny" if args.tiny else "full"
        self.started = started  # perf_counter() at the script's start: the budget counts from there
        self.rows: list[dict] = []
        self.deviations: list[dict] = []
        self.models: dict[str, prior.Prior] = {}
        self.eager: prior.Prior | None = None  # float16 with the engine's CUDA graphs off
        self.oracle = None
        self.notes: list[str] = []

    def autocast(self, enabled: bool = True):
        """fp16 autocast, as LAION's predictor ran the oracle (a no-op off the GPU: smoke runs)."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=enabled and self.device.type == "cuda")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def add_row(self, group: str, name: str, oracle_s: float | None, ours: dict[str, float | None], note: str = "",
                **extra) -> None:
        row = {"group": group, "name": name, "oracle_s": oracle_s, "note": note, **extra}
        for variant, seconds in ours.items():
            row[f"ours_{variant}_s"] = seconds
            row[f"ratio_{variant}"] = ratio(oracle_s, seconds)
        self.rows.append(row)

    def add_deviation(self, name: str, value, reference, **extra) -> None:
        self.deviations.append({"name": name, **deviation(torch.as_tensor(value), torch.as_tensor(reference)), **extra})

    # -- load ------------------------------------------------------------------------------

    def footprints(self, converted: Path | None) -> list[dict]:
        cases = [("ours", self.weights, "float16"), ("oracle", self.weights, "float32")]
        if converted is not None:
            cases.insert(1, ("ours", converted, "float16"))
        records = []
        for impl, path, dtype in cases:
            self.log(f"footprint: {impl} {dtype} from {path.name} on {self.device}, fresh process")
            run = measure_footprint(impl, path, device=str(self.device), dtype=dtype, steps=4, shape=self.shape)
            records.append({"impl": impl, "file": path.name, "dtype": dtype, "load_s_median": run["load_s"],
                            "load_s_min": run["load_s"], "setup_s_median": run["setup_s"], "peak_rss_mib": run["peak_rss_mib"],
                            "peak_rss_mib_after_load": run["peak_rss_mib_after_load"],
                            "peak_gpu_mib": run.get("peak_gpu_mib"), "runs": [run]})
        return records

    def load(self) -> None:
        from tests.oracle import load_oracle

        for dtype in ("float16", "bfloat16", "float32"):
            self.log(f"loading ours ({dtype}) on {self.device}")
            self.models[dtype] = prior.load(self.weights, device=self.device, dtype=dtype)
        option = engine_graph_option()
        if option:
            self.log(f"loading ours (float16, {option}=False) on {self.device}")
            self.eager = prior.load(self.weights, device=self.device, dtype="float16", **{option: False})
        self.log("loading the oracle (float32, runs under fp16 autocast)")
        self.oracle = load_oracle(self.weights, oracle_shape(self.shape)).to(self.device)

    # -- one step --------------------------------------------------------------------------

    def steps(self) -> None:
        for batch in (2, 4):
            for cond_scale in (1.0, GUIDED_COND_SCALE):
                self.step_rows(batch, cond_scale)

    def step_rows(self, batch: int, cond_scale: float) -> None:
        oracle, reference = self.oracle, self.models["float32"]
        tokens, _ = reference.tokenizer(list(PROMPTS[: batch // 2]))
        tokens = tokens.to(self.device)
        label = f"step, batch {batch}, {'guided (cond_scale 3)' if cond_scale != 1 else 'no guidance'}"
        self.log(label)
        text = reference.text.encode(tokens)
        denoisers = {d: m._denoiser(text.states, text.embed, text.mask, *uniform(len(text.states), 2, cond_scale))
                     for d, m in self.models.items()}
        g = torch.Generator(self.device).manual_seed(batch)
        x = torch.randn(batch, reference.config.dim, device=self.device, generator=g)
        t = torch.full((batch,), 999, dtype=torch.long, device=self.device)
        oracle_cond = oracle_text_condition(oracle, tokens, 2)

        def oracle_step(autocast: bool = True):
            with self.autocast(autocast):
                return oracle.net.forward_with_cond_scale(
                    x, t, cond_scale=cond_scale, text_embed=oracle_cond["text_embed"],
                    text_encodings=oracle_cond["text_encodings"], mask=oracle_cond["mask"].clone())

        calls = {"oracle": oracle_step}
        for dtype in ("float16", "bfloat16"):
            calls[dtype] = lambda f=denoisers[dtype]: f(x, t, 1)
        if self.eager is not None:
            eager = self.eager._denoiser(text.states, text.embed, text.mask, *uniform(len(text.states), 2, cond_scale))
            calls["float16_eager"] = lambda: eager(x, t, 1)
        elif self.device.type == "cuda":  # an engine without CUDA graphs of its own: what capturing would give
            try:
                calls["float16_graph"] = capture_graph(denoisers["float16"], x, t)
            except RuntimeError as e:  # reported, not fatal: the eager numbers stand
                self.notes.append(f"CUDA graph capture failed: {str(e).splitlines()[0]}")
        n = self.args.step_loop
        timings = time_interleaved({k: looped(c, n) for k, c in calls.items()}, repeats=self.args.repeats, sync=sync)
        per_call = {k: v.median / n for k, v in timings.items()}
        self.add_row("step", label, per_call.pop("oracle"), per_call, batch=batch, cond_scale=cond_scale,
                     loop=n, timings={k: v.record() for k, v in timings.items()})

        self.add_deviation(f"ours float32 vs oracle float32 (no autocast), one {label}",
                           denoisers["float32"](x, t, 0), oracle_step(autocast=False), batch=batch, cond_scale=cond_scale)
        for dtype in ("float16", "bfloat16"):
            self.add_deviation(f"ours {dtype} vs ours float32, one {label}", denoisers[dtype](x, t, 0),
                               denoisers["float32"](x, t, 0), batch=batch, cond_scale=cond_scale)
        self.add_deviation(f"oracle fp16 autocast vs ours float32, one {label}", oracle_step(),
                           denoisers["float32"](x, t, 0), batch=batch, cond_scale=cond_scale)

    # -- whole predictions ---------------------------------------------------------------

    def predictions(self) -> None:
        tokens, _ = self.models["float32"].tokenizer([PROMPTS[0]])
        oracle_per_step = {}
        for cond_scale in (1.0, GUIDED_COND_SCALE):
            n = self.args.oracle_steps
            self.log(f"oracle: {n} steps of its own sampling loop under fp16 autocast, cond_scale {cond_scale}")
            with self.autocast():
                oracle_sample_steps(self.oracle, tokens, SEED, 2, cond_scale, 3, sync)  # warm-up
                _, text_s, loop_s = oracle_sample_steps(self.oracle, tokens, SEED, 2, cond_scale, n, sync)
            oracle_per_step[cond_scale] = (text_s, loop_s / n)

        variants = ["float16", "bfloat16", "float32"]
        for steps in (64,) if self.args.quick else (64, 1000):
            for cond_scale in (1.0, GUIDED_COND_SCALE):
                guidance = "guided (cond_scale 3)" if cond_scale != 1 else "no guidance"
                label = f"prediction, {steps} steps, 2 candidates, {guidance}"
                self.log(label)
                seconds, first, results = {}, {}, {}
                for dtype in variants:
                    model = self.models[dtype]

                    def embed(model=model, steps=steps, cond_scale=cond_scale):
                        return model.embed(PROMPTS[0], candidates=2, steps=steps, seed=SEED, cond_scale=cond_scale,
                                           sampler=sampler_at(steps))

                    sync()
                    started = time.perf_counter()
                    results[dtype] = embed()  # first call: may capture graphs or compile
                    sync()
                    first[dtype] = time.perf_counter() - started
                    repeats = self.prediction_repeats(dtype, steps, first[dtype])
                    if repeats:
                        seconds[dtype] = time_interleaved({dtype: embed}, repeats=repeats, warmup=0, sync=sync)[dtype].median
                    else:
                        seconds[dtype] = None
                        self.notes.append(f"{label}, {dtype}: only the first call ran ({first[dtype]:.2f} s)")
                text_s, per_step = oracle_per_step[cond_scale]
                self.add_row("prediction", label, text_s + per_step * steps, seconds,
                             note=f"oracle extrapolated: {self.args.oracle_steps} measured steps x {steps}",
                             steps=steps, cond_scale=cond_scale, first_call_s=first, oracle_extrapolated=True)
                for dtype in ("float16", "bfloat16"):
                    self.add_deviation(f"ours {dtype} vs ours float32, chosen image embedding, {steps} steps, "
                                       f"cond_scale {cond_scale}", results[dtype].image_embedding,
                                       results["float32"].image_embedding, steps=steps, cond_scale=cond_scale,
                                       same_choice=bool((results[dtype].chosen == results["float32"].chosen).all()))
                if self.eager is not None and steps == 64:
                    self.log(f"{label}: float16 with the engine's CUDA graphs off")
                    timing = time_interleaved({"x": lambda s=steps, c=cond_scale: self.eager.embed(
                        PROMPTS[0], candidates=2, steps=s, seed=SEED, cond_scale=c, sampler=sampler_at(s))},
                        repeats=self.args.repeats, sync=sync)["x"]
                    self.add_row("prediction", f"{label}, CUDA graphs off", text_s + per_step * steps,
                                 {"float16_eager": timing.median}, note="oracle extrapolated", steps=steps,
                                 cond_scale=cond_scale, oracle_extrapolated=True)

        self.oracle_full(tokens, oracle_per_step)

    def prediction_repeats(self, dtype: str, steps: int, first_call_s: float) -> int:
        """Warm repeats for a prediction row: all of them for float16 (the targets' path),
        fewer for the others, none for a slow float32 1000-step run (its first call is
        enough for the cosine reference), so the whole script fits its time budget."""
        if dtype == "float16":
            return self.args.repeats if steps < 1000 else 3
        if steps < 1000:
            return 2
        return 1 if first_call_s < 3 else 0

    def oracle_full(self, tokens, oracle_per_step) -> None:
        """The oracle's real 1000-step samples, when the budget has room for them."""
        from tests.oracle import oracle_sample

        for cond_scale in (1.0, GUIDED_COND_SCALE):
            text_s, per_step = oracle_per_step[cond_scale]
            expected = text_s + per_step * 1000
            left = self.args.budget_s - self.elapsed()
            if expected * 1.3 > left:
                self.notes.append(f"oracle 1000 steps at cond_scale {cond_scale} not run: about {expected:.0f} s "
                                  f"expected, {left:.0f} s of the budget left")
                continue
            self.log(f"oracle: the whole 1000-step sample under fp16 autocast, cond_scale {cond_scale}")
            sync()
            started = time.perf_counter()
            with self.autocast():
                oracle_sample(self.oracle, tokens.to(self.device), SEED, 2, cond_scale)
            sync()
            measured = time.perf_counter() - started
            for row in self.rows:
                if row["group"] == "prediction" and row["steps"] == 1000 and row["cond_scale"] == cond_scale \
                        and row["oracle_s"] is not None:
                    row["oracle_extrapolated_s"] = row["oracle_s"]
                    row["oracle_s"], row["oracle_extrapolated"], row["note"] = measured, False, "oracle measured in full"
                    for key in [k for k in row if k.startswith("ours_") and k.endswith("_s")]:
                        row[f"ratio_{key[5:-2]}"] = ratio(measured, row[key])


def engine_graph_option() -> str | None:
    """The name of the prior.load option that turns the engine's CUDA graphs off, if it has one."""
    parameters = inspect.signature(prior.load).parameters
    return next((name for name in GRAPH_OPTION_NAMES if name in parameters), None)


def targets(rows: list[dict], deviations: list[dict], footprints: list[dict]) -> list[dict]:
    out = []

    def add(name, required, measured, met, detail):
        shown = fmt_seconds(measured) if required.startswith("<") and "of the" not in required else f"{measured:.6g}"
        out.append({"target": name, "required": required, "measured": measured, "shown": shown, "met": met, "detail": detail})

    def prediction(steps):
        return [r for r in rows if r["group"] == "prediction" and r["steps"] == steps and r.get("ours_float16_s")]

    for steps, limit in ((64, TARGET_64_STEPS_S), (1000, TARGET_1000_STEPS_S)):
        if prediction(steps):
            worst = max(r["ours_float16_s"] for r in prediction(steps))
            add(f"GPU {steps} steps, 2 candidates, end to end", f"< {fmt_seconds(limit)}", worst, worst < limit,
                "Prior.embed, float16, slowest of cond_scale 1 and 3, median of warm calls")
    steps = [r for r in rows if r["group"] == "step"]
    best = []
    for r in steps:
        graph = r.get("ratio_float16_graph")
        best.append(graph if graph is not None else r["ratio_float16"])
    add("GPU per step vs oracle under fp16 autocast", f">= {TARGET_STEP_RATIO}x", min(best), min(best) >= TARGET_STEP_RATIO,
        "float16 step as the engine runs it (the bench's capture if the engine has no graphs), "
        "lowest ratio over batch 2/4, with and without guidance")
    if prediction(1000):
        add("GPU 1000-step prediction vs oracle (whole)", "(no target; for the record)",
            min(r["ratio_float16"] for r in prediction(1000)), None, "oracle / ours, float16, whole prediction")
    cosines = [d["cosine_min"] for d in deviations if d["name"].startswith("ours float16") and "chosen" in d["name"]]
    add("GPU float16 cosine to float32", f">= {TARGET_FP16_COSINE}", min(cosines), min(cosines) >= TARGET_FP16_COSINE,
        "lowest cosine of the chosen image embedding, 64 and 1000 steps, cond_scale 1 and 3")
    oracle_setup = next(f["setup_s_median"] for f in footprints if f["impl"] == "oracle")
    converted = [f for f in footprints if f["impl"] == "ours" and f["file"].endswith(".safetensors")]
    original = next(f for f in footprints if f["impl"] == "ours" and f["file"].endswith(".pth"))
    chosen = converted[0] if converted else original
    fraction = chosen["setup_s_median"] / oracle_setup
    add("setup from the converted file", f"<= {TARGET_LOAD_FRACTION:.3f} of the oracle's", fraction,
        fraction <= TARGET_LOAD_FRACTION if converted else None,
        f"{chosen['file']}: load {chosen['load_s_median']:.2f} s + warm-up "
        f"{chosen['setup_s_median'] - chosen['load_s_median']:.2f} s vs oracle build + load + cuda {oracle_setup:.2f} s"
        + ("" if converted else " (no converter in the engine)"))
    return out


def show(rows, deviations, footprints, goals) -> None:
    variants = ["float16", "float16_eager", "float16_graph", "bfloat16", "float32"]
    present = [v for v in variants if any(r.get(f"ours_{v}_s") is not None for r in rows)]
    headers = ["measure", "oracle fp16-autocast"]
    for v in present:
        headers += [f"ours {v}", "x"]
    table = []
    for r in rows:
        oracle = fmt_seconds(r["oracle_s"]) + (" (extrapolated)" if r.get("oracle_extrapolated") else "")
        line = [r["name"], oracle]
        for v in present:
            line += [fmt_seconds(r.get(f"ours_{v}_s")), fmt_ratio(r.get(f"ratio_{v}"))]
        table.append(line)
    print()
    print_table(headers, table)
    print()
    print_table(["load (fresh process)", "load", "setup (load + warm-up)", "peak RSS", "peak GPU memory"],
                [[f"{f['impl']} {f['dtype']} from {f['file']}", fmt_seconds(f["load_s_median"]),
                  fmt_seconds(f["setup_s_median"]), f"{f['peak_rss_mib']:.0f} MiB",
                  "-" if f.get("peak_gpu_mib") is None else f"{f['peak_gpu_mib']:.0f} MiB"] for f in footprints])
    print()
    print_table(["deviation", "cosine (min)", "max rel err", "rel L2"],
                [[d["name"], f"{d['cosine_min']:.7f}", f"{d['max_rel_err']:.2e}", f"{d['rel_l2']:.2e}"] for d in deviations])
    print()
    print_table(["target", "required", "measured", "met"],
                [[g["target"], g["required"], g["shown"],
                  {True: "met", False: "NOT met", None: "-"}[g["met"]]] for g in goals])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu")
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint (default: the cached full-size random one)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default $OUT, else bench/results)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row")
    parser.add_argument("--step-loop", type=int, default=20, help="steps per timed loop in the step rows")
    parser.add_argument("--oracle-steps", type=int, default=50, help="oracle sampling-loop steps timed for its per-step figure")
    parser.add_argument("--budget-s", type=float, default=270, help="seconds this script may take; optional parts are skipped")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check this script (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint: checks this script, measures nothing")
    parser.add_argument("--quick", action="store_true", help="no 1000-step predictions")
    args = parser.parse_args(argv)
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # the oracle's imports are noisy
        warnings.filterwarnings("ignore", category=category)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device visible to torch", file=sys.stderr)
        return 1

    started = time.perf_counter()
    info = machine_info()
    weights = args.weights or (tiny_checkpoint() if args.tiny else full_checkpoint())
    converted = converted_checkpoint(weights) if weights.suffix == ".pth" else None
    bench = GpuBench(args, weights, started)
    bench.log(f"machine: {info['gpu_name']}, torch {info['torch_version']}, CUDA {info['cuda_version']}")
    smoke = args.tiny or args.quick or args.device != "cuda"
    out_dir = args.out_dir or (CACHE if smoke else Path(os.environ.get("OUT", RESULTS)))
    out = results_path(info, out_dir)
    record = {"benchmark": "bench/gpu.py", "machine": info, "settings": vars(args) | {
        "weights": str(weights), "converted": None if converted is None else str(converted),
        "out_dir": str(out_dir), "prompts": list(PROMPTS), "seed": SEED, "guided_cond_scale": GUIDED_COND_SCALE,
        "candidates": 2, "prior_load_signature": str(inspect.signature(prior.load)),
        "timing": "median wall-clock seconds, CUDA-synchronised; step rows are loops of --step-loop calls, taken in turns",
    }}
    try:
        footprints = bench.footprints(converted)
        with torch.inference_mode():
            bench.load()
            bench.steps()
            bench.predictions()
        goals = targets(bench.rows, bench.deviations, footprints)
        show(bench.rows, bench.deviations, footprints, goals)
        record.update(rows=bench.rows, load_and_memory=footprints, deviations=bench.deviations, targets=goals)
    finally:  # whatever was measured before a failure still comes back
        record.update(rows=bench.rows, deviations=bench.deviations, notes=bench.notes, total_seconds=bench.elapsed())
        write_json(out, record)
        print(f"\nsaved {out}", file=sys.stderr)
    for note in bench.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
