"""CPU benchmark: our engine against dalle2-pytorch 0.11.5 on the same full-size checkpoint.

    .venv/bin/python -m bench.cpu                 # the recorded run, about 10 minutes on 2 cores
    .venv/bin/python -m bench.cpu --quick         # a smoke run (a few minutes); JSON to bench/cache/
    .venv/bin/python -m bench.cpu --quick --tiny  # checks this script on a tiny checkpoint (a minute)
    .venv/bin/python -m bench.cpu --oracle-full   # also run the oracle's 1000-step samples for real

What it measures, each implementation back to back in this one process, timings taken in
turns (oracle, ours float32, ours bfloat16, oracle, ...) so a busy spell hits all of them,
the best of the repeats reported (the machine is shared: noise only ever adds time):
- one network step at batch 2 and 4, with and without guidance. The oracle's step is
  `net.forward_with_cond_scale` (all 81 tokens, the guided passes one after the other);
  ours is `network.denoise` on the prebuilt Condition (3 tokens, cond + null in one batch).
  Ours float32 is also timed with its weights not prepacked for oneDNN (prior/packed.py),
  to show what the packing is worth on this machine.
- the one-off per-prompt cost: text tower, and for us the Condition (KV cache of 78 tokens).
- whole predictions (1 prompt, 2 candidates) at 64 and 1000 steps through `Prior.embed`.
  The oracle's are its text encoding plus its per-step time, measured on the first
  --oracle-steps steps of its own sampling loop, times the step count: labelled
  "extrapolated". It has no strided sampler, so its 64-step figure is extrapolated too.
  --oracle-full runs its 1000-step samples for real (about 7 and 14 minutes on 2 cores).
- load time and peak RSS, each in a fresh child process (bench/common.py footprint).
- deviation of each fast path from the float32 reference (cosine, max relative error),
  and of our float32 from the oracle (single steps and the first steps of a trajectory).
Results: a table on stdout and JSON under bench/results/<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from prior.diffusion import Schedule, ddpm_sample, exact_schedule
from tests.oracle import uniform  # noqa: E402  (Prior._denoiser's per-prompt settings)

# The CPU targets.
TARGET_STEP = 1.3  # float32 per step, no guidance, times the oracle
TARGET_STEP_GUIDED = 1.8  # float32 per step, cond_scale != 1
TARGET_BF16 = 2.5  # bfloat16 per step
TARGET_BF16_COSINE = 0.999  # bfloat16 chosen embedding vs float32, same seed
TARGET_LOAD_FRACTION = 1 / 3  # load from the converted file vs the oracle's load
UNPACKED = "float32_unpacked"  # the step rows' extra column: plain nn.Linear, no oneDNN prepacking


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint (default: the cached full-size random one)")
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and steps, no 1000-step rows")
    parser.add_argument("--oracle-full", action="store_true", help="run the oracle's 1000-step samples for real")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per step row (default 5, quick 2)")
    parser.add_argument("--oracle-steps", type=int, default=None,
                        help="steps of the oracle's sampling loop timed for its per-step figure (default 12, quick 3)")
    parser.add_argument("--load-repeats", type=int, default=None,
                        help="fresh processes per load measurement (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 path")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint: checks this script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<machine>-<date>.json)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.oracle_steps = args.oracle_steps or (3 if args.quick else 12)
    args.load_repeats = args.load_repeats or (1 if args.quick else 2)
    return args


class Bench:
    """Holds the loaded implementations and collects rows, deviations and notes."""

    def __init__(self, args: argparse.Namespace, weights: Path):
        self.args, self.weights = args, weights
        self.shape = "tiny" if args.tiny else "full"
        self.rows: list[dict] = []
        self.deviations: list[dict] = []
        self.models: dict[str, prior.Prior] = {}
        self.unpacked: prior.Prior | None = None  # float32 with plain nn.Linear weights (step rows only)
        self.oracle = None

    @property
    def dtypes(self) -> list[str]:
        return ["float32"] if self.args.no_bf16 else ["float32", "bfloat16"]

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def add_row(self, group: str, name: str, oracle_s: float | None, ours: dict[str, float | None],
                note: str = "", **extra) -> dict:
        row = {"group": group, "name": name, "oracle_s": oracle_s, "note": note,
               "load_average_1m": round(os.getloadavg()[0], 2), **extra}
        for dtype, seconds in ours.items():
            row[f"ours_{dtype}_s"] = seconds
            row[f"ratio_{dtype}"] = ratio(oracle_s, seconds)
        self.rows.append(row)
        return row

    def add_deviation(self, name: str, value: torch.Tensor, reference: torch.Tensor, **extra) -> dict:
        record = {"name": name, **deviation(value, reference), **extra}
        self.deviations.append(record)
        return record

    # -- load time and peak memory, fresh processes --------------------------------------

    def footprints(self, converted: dict[str, Path]) -> list[dict]:
        """Load + setup time and peak memory, fresh processes: each of our paths from the
        .pth file and from each converted file, then the oracle."""
        cases = []
        for dtype in self.dtypes:
            cases.append(("ours", self.weights, dtype))
            cases += [("ours", path, dtype) for stored, path in converted.items() if stored in ("float16", dtype)]
        cases.append(("oracle", self.weights, "float32"))
        records = []
        for impl, path, dtype in cases:
            runs = []
            for _ in range(self.args.load_repeats):
                self.log(f"footprint: {impl} {dtype} from {path.name} in a fresh process")
                runs.append(measure_footprint(impl, path, dtype=dtype, steps=4, threads=self.args.threads, shape=self.shape))
            loads = [r["load_s"] for r in runs]
            setups = [r["setup_s"] for r in runs]
            records.append({
                "impl": impl, "file": path.name, "dtype": dtype,
                "load_s_best": min(loads),
                "load_s_median": statistics.median(loads),
                "setup_s_best": min(setups),
                "setup_s_median": statistics.median(setups),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "peak_rss_mib_after_load": max(r["peak_rss_mib_after_load"] for r in runs),
                "runs": runs,
            })
        return records

    # -- loading in this process ---------------------------------------------------------

    def load(self) -> None:
        from tests.oracle import load_oracle

        for dtype in self.dtypes:
            self.log(f"loading ours ({dtype})")
            self.models[dtype] = prior.load(self.weights, device="cpu", dtype=dtype)
        if self.models["float32"].packed:  # what prepacking the weights is worth, same run
            self.log("loading ours (float32, weights not prepacked)")
            self.unpacked = prior.load(self.weights, device="cpu", dtype="float32", packed_weights=False)
        self.log("loading the oracle (float32)")
        self.oracle = load_oracle(self.weights, oracle_shape(self.shape))

    # -- one network step ----------------------------------------------------------------

    def steps(self) -> None:
        for batch in (2, 4):
            for cond_scale in (1.0, GUIDED_COND_SCALE):
                self.step_rows(batch, cond_scale)

    def step_rows(self, batch: int, cond_scale: float) -> None:
        """One step at `batch` rows (batch/2 prompts x 2 candidates), then the one-off cost."""
        oracle, reference = self.oracle, self.models["float32"]
        tokens, _ = reference.tokenizer(list(PROMPTS[: batch // 2]))
        guided = cond_scale != 1
        label = f"step, batch {batch}, {'guided (cond_scale 3)' if guided else 'no guidance'}"
        self.log(label)
        oracle_cond = oracle_text_condition(oracle, tokens, 2)
        text = reference.text.encode(tokens)  # the text tower is float32 on every path
        denoisers = {d: m._denoiser(text.states, text.embed, text.mask, *uniform(len(text.states), 2, cond_scale))
                     for d, m in self.models.items()}
        x = torch.randn(batch, reference.config.dim, generator=torch.Generator().manual_seed(batch))
        t = torch.full((batch,), 999, dtype=torch.long)

        def oracle_step():  # a fresh mask each call: every call is the sampler's first step
            return oracle.net.forward_with_cond_scale(
                x, t, cond_scale=cond_scale, text_embed=oracle_cond["text_embed"],
                text_encodings=oracle_cond["text_encodings"], mask=oracle_cond["mask"].clone())

        if self.unpacked is not None:
            denoisers[UNPACKED] = self.unpacked._denoiser(text.states, text.embed, text.mask,
                                                          *uniform(len(text.states), 2, cond_scale))
        calls = {"oracle": oracle_step, **{d: (lambda f=f: f(x, t, 0)) for d, f in denoisers.items()}}
        timings = time_interleaved(calls, repeats=self.args.repeats)
        self.add_row("step", label, timings["oracle"].best, {d: timings[d].best for d in denoisers},
                     batch=batch, cond_scale=cond_scale, timings={k: v.record() for k, v in timings.items()})

        out_oracle = oracle_step()
        out = {d: f(x, t, 0) for d, f in denoisers.items()}
        if UNPACKED in out:
            self.add_deviation(f"ours float32 vs ours float32 weights not prepacked, one {label}", out["float32"],
                               out[UNPACKED], batch=batch, cond_scale=cond_scale)
        self.add_deviation(f"ours float32 vs oracle, one {label}", out["float32"], out_oracle,
                           batch=batch, cond_scale=cond_scale)
        if "bfloat16" in out:
            self.add_deviation(f"ours bfloat16 vs ours float32, one {label}", out["bfloat16"], out["float32"],
                               batch=batch, cond_scale=cond_scale)

        # The one-off cost per call: the oracle encodes the text; we also run the 78
        # step-independent tokens once and keep their keys and values.
        def our_condition(model: prior.Prior):
            encoded = model.text.encode(tokens)
            return model._denoiser(encoded.states, encoded.embed, encoded.mask, *uniform(len(encoded.states), 2, cond_scale))

        one_off = {"oracle": lambda: oracle_text_condition(oracle, tokens, 2),
                   **{d: (lambda m=m: our_condition(m)) for d, m in self.models.items()}}
        timings = time_interleaved(one_off, repeats=max(1, self.args.repeats // 2))
        self.add_row("condition", f"per-call text + condition, batch {batch}, {'guided' if guided else 'no guidance'}",
                     timings["oracle"].best, {d: timings[d].best for d in self.models},
                     note="one-off per call; the oracle recomputes its prefix every step instead",
                     batch=batch, cond_scale=cond_scale, timings={k: v.record() for k, v in timings.items()})

    # -- whole predictions -----------------------------------------------------------------

    def predictions(self) -> None:
        tokens, _ = self.models["float32"].tokenizer([PROMPTS[0]])
        step_counts = [64] if self.args.quick else [64, 1000]
        oracle_per_step: dict[float, tuple[float, float]] = {}
        for cond_scale in (1.0, GUIDED_COND_SCALE):
            n = self.args.oracle_steps
            self.log(f"oracle: {n} steps of its own sampling loop, cond_scale {cond_scale}")
            x_oracle, text_s, loop_s = oracle_sample_steps(self.oracle, tokens, SEED, 2, cond_scale, n)
            oracle_per_step[cond_scale] = (text_s, loop_s / n)
            x_ours = self.trajectory(tokens, cond_scale, n)
            self.add_deviation(f"ours float32 vs oracle, x after the first {n} exact steps, cond_scale {cond_scale}",
                               x_ours, x_oracle, cond_scale=cond_scale, steps=n)

        oracle_full = {}
        if self.args.oracle_full:
            from tests.oracle import oracle_sample

            for cond_scale in (1.0, GUIDED_COND_SCALE):
                self.log(f"oracle: the whole 1000-step sample, cond_scale {cond_scale} (minutes)")
                started = time.perf_counter()
                image = oracle_sample(self.oracle, tokens, SEED, 2, cond_scale)
                oracle_full[cond_scale] = (time.perf_counter() - started, image)

        for steps in step_counts:
            for cond_scale in (1.0, GUIDED_COND_SCALE):
                guidance = "guided (cond_scale 3)" if cond_scale != 1 else "no guidance"
                label = f"prediction, {steps} steps, 2 candidates, {guidance}"
                self.log(label)
                results, seconds = {}, {}
                for dtype, model in self.models.items():
                    started = time.perf_counter()
                    results[dtype] = model.embed(PROMPTS[0], candidates=2, steps=steps, seed=SEED, cond_scale=cond_scale,
                                                 sampler=sampler_at(steps))
                    seconds[dtype] = time.perf_counter() - started
                text_s, per_step = oracle_per_step[cond_scale]
                oracle_s = text_s + per_step * steps
                note = f"oracle extrapolated: {self.args.oracle_steps} measured steps x {steps}"
                if steps == 1000 and cond_scale in oracle_full:
                    oracle_s, note = oracle_full[cond_scale][0], "oracle measured in full"
                    self.add_deviation(f"ours float32 vs oracle, chosen image embedding, 1000 steps, cond_scale {cond_scale}",
                                       torch.from_numpy(results["float32"].image_embedding), oracle_full[cond_scale][1],
                                       cond_scale=cond_scale, steps=steps)
                self.add_row("prediction", label, oracle_s, seconds, note=note, steps=steps, cond_scale=cond_scale,
                             oracle_extrapolated=note != "oracle measured in full")
                if "bfloat16" in results:
                    self.add_deviation(f"ours bfloat16 vs ours float32, chosen image embedding, {steps} steps, "
                                       f"cond_scale {cond_scale}",
                                       torch.from_numpy(results["bfloat16"].image_embedding),
                                       torch.from_numpy(results["float32"].image_embedding),
                                       cond_scale=cond_scale, steps=steps,
                                       same_choice=bool((results["bfloat16"].chosen == results["float32"].chosen).all()))

    def trajectory(self, tokens: torch.Tensor, cond_scale: float, steps: int) -> torch.Tensor:
        """Our float32 engine over the first `steps` steps of the exact sampler, drawing the
        same noise as the oracle after torch.manual_seed(SEED)."""
        model = self.models["float32"]
        text = model.text.encode(tokens)
        denoise = model._denoiser(text.states, text.embed, text.mask, *uniform(len(text.states), 2, cond_scale))
        full = exact_schedule(model.schedule_buffers)
        first = Schedule(*(getattr(full, f)[:steps] for f in Schedule.__dataclass_fields__))
        g = torch.Generator().manual_seed(SEED)

        def draw_noise():
            return torch.randn((2, model.config.dim), generator=g)

        return ddpm_sample(denoise, first, draw_noise(), draw_noise)


def targets(rows: list[dict], deviations: list[dict], footprints: list[dict]) -> list[dict]:
    """Each CPU target: the number measured and whether it is met (worst case over batches)."""
    steps = [r for r in rows if r["group"] == "step"]
    out = []

    def add(name: str, required: str, measured: float | None, met: bool | None, detail: str, digits: int = 2) -> None:
        out.append({"target": name, "required": required, "measured": measured, "met": met, "detail": detail,
                    "digits": digits})

    plain = [r["ratio_float32"] for r in steps if r["cond_scale"] == 1]
    guided = [r["ratio_float32"] for r in steps if r["cond_scale"] != 1]
    add("CPU float32 per step, no guidance", f">= {TARGET_STEP}x", min(plain), min(plain) >= TARGET_STEP,
        "lowest oracle/ours ratio over batch 2 and 4")
    add("CPU float32 per step, guided", f">= {TARGET_STEP_GUIDED}x", min(guided), min(guided) >= TARGET_STEP_GUIDED,
        "lowest oracle/ours ratio over batch 2 and 4")
    bf16 = [r["ratio_bfloat16"] for r in steps if r.get("ratio_bfloat16") is not None]
    if bf16:
        add("CPU bfloat16 per step", f">= {TARGET_BF16}x", min(bf16), min(bf16) >= TARGET_BF16,
            "lowest oracle/ours ratio over batch 2 and 4, with and without guidance")
        cosines = [d["cosine_min"] for d in deviations if d["name"].startswith("ours bfloat16") and "chosen" in d["name"]]
        add("CPU bfloat16 cosine to float32", f">= {TARGET_BF16_COSINE}", min(cosines), min(cosines) >= TARGET_BF16_COSINE,
            "lowest cosine of the chosen image embedding over the predictions run", digits=6)
    # setup = what prior/predictor.py's setup() does: prior.load, then Prior.warmup when the engine has it.
    oracle_setup = next(f["setup_s_best"] for f in footprints if f["impl"] == "oracle")
    ours = [f for f in footprints if f["impl"] == "ours" and f["dtype"] == "float32"]
    converted = [f for f in ours if f["file"].endswith(".safetensors")]
    original = next(f for f in ours if f["file"].endswith(".pth"))
    chosen = min(converted, key=lambda f: f["setup_s_best"]) if converted else original  # the faster converted file
    fraction = chosen["setup_s_best"] / oracle_setup
    best_run = min(chosen["runs"], key=lambda r: r["setup_s"])
    detail = (f"ours from {chosen['file']}: load {best_run['load_s']:.2f} s + warm-up {best_run['warmup_s']:.2f} s; "
              f"oracle build + load {oracle_setup:.2f} s (best of {len(chosen['runs'])} fresh processes each)")
    if not converted:
        detail += " (no converter in the engine: prior.checkpoint.convert_to_safetensors)"
    add("setup from the converted file", f"<= {TARGET_LOAD_FRACTION:.3f} of the oracle's", fraction,
        fraction <= TARGET_LOAD_FRACTION if converted else None, detail, digits=3)
    return out


def show(rows: list[dict], deviations: list[dict], footprints: list[dict], goals: list[dict], dtypes: list[str]) -> None:
    headers = ["measure", "oracle", "ours f32", "f32 speed-up"]
    if "bfloat16" in dtypes:
        headers += ["ours bf16", "bf16 speed-up"]
    unpacked = any(f"ours_{UNPACKED}_s" in r for r in rows)
    if unpacked:
        headers += ["f32 not prepacked", "its speed-up"]
    headers.append("note")
    table = []
    for r in rows:
        line = [r["name"], fmt_seconds(r["oracle_s"]), fmt_seconds(r.get("ours_float32_s")), fmt_ratio(r.get("ratio_float32"))]
        if "bfloat16" in dtypes:
            line += [fmt_seconds(r.get("ours_bfloat16_s")), fmt_ratio(r.get("ratio_bfloat16"))]
        if unpacked:
            line += [fmt_seconds(r.get(f"ours_{UNPACKED}_s")), fmt_ratio(r.get(f"ratio_{UNPACKED}"))]
        table.append([*line, r["note"]])
    print()
    print_table(headers, table)

    print()
    print_table(["load (fresh process)", "load", "setup (load + warm-up)", "peak RSS after setup",
                 "RSS anon + file after setup", "peak RSS with 4 steps"],
                [[f"{f['impl']} {f['dtype']} from {f['file']}", fmt_seconds(f["load_s_best"]), fmt_seconds(f["setup_s_best"]),
                  f"{f['peak_rss_mib_after_load']:.0f} MiB",
                  f"{f['runs'][0]['after_load']['rss_anon_mib']:.0f} + {f['runs'][0]['after_load']['rss_file_mib']:.0f} MiB",
                  f"{f['peak_rss_mib']:.0f} MiB"] for f in footprints])
    print()
    print_table(["deviation", "cosine (min)", "max rel err", "rel L2"],
                [[d["name"], f"{d['cosine_min']:.7f}", f"{d['max_rel_err']:.2e}", f"{d['rel_l2']:.2e}"] for d in deviations])
    print()
    print_table(["target", "required", "measured", "met"],
                [[g["target"], g["required"], "-" if g["measured"] is None else f"{g['measured']:.{g['digits']}f}",
                  {True: "met", False: "NOT met", None: "not measurable yet"}[g["met"]]] for g in goals])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for category in (FutureWarning, DeprecationWarning, UserWarning):  # the oracle's imports are noisy
        warnings.filterwarnings("ignore", category=category)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine_info()
    weights = args.weights or (tiny_checkpoint() if args.tiny else full_checkpoint())
    bench = Bench(args, weights)
    # The converted copies the engine can write: as stored in the file (float16), and in the
    # precision each measured path runs in, used straight from the memory map.
    converted = {}
    if weights.suffix == ".pth":
        for stored in ["float16", *bench.dtypes]:
            path = converted_checkpoint(weights, None if stored == "float16" else stored)
            if path is not None:
                converted[stored] = path
    bench.log(f"machine: {info['cpu_model']}, {info['torch_threads']} torch threads, load average {info['load_average_1_5_15']}")

    footprints = bench.footprints(converted)
    with torch.inference_mode():
        bench.load()
        bench.steps()
        bench.predictions()
    goals = targets(bench.rows, bench.deviations, footprints)
    show(bench.rows, bench.deviations, footprints, goals, bench.dtypes)

    record = {
        "benchmark": "bench/cpu.py",
        "machine": info,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "quick": args.quick, "tiny": args.tiny, "oracle_full": args.oracle_full, "repeats": args.repeats,
            "oracle_steps": args.oracle_steps, "load_repeats": args.load_repeats, "threads": torch.get_num_threads(),
            "weights": str(weights), "weights_bytes": weights.stat().st_size,
            "converted": {k: str(v) for k, v in converted.items()}, "prompts": list(PROMPTS), "seed": SEED,
            "guided_cond_scale": GUIDED_COND_SCALE, "candidates": 2, "guidance": "original", "sampler": "ddpm",
            "timing": "best (min) wall-clock seconds of the repeats, medians beside them in 'timings'; step rows "
                      "interleave oracle and ours call by call; load and setup: best of --load-repeats fresh processes",
        },
        "rows": bench.rows,
        "load_and_memory": footprints,
        "deviations": bench.deviations,
        "targets": goals,
        "total_seconds": time.perf_counter() - started,
    }
    smoke = args.quick or args.tiny or args.weights is not None
    out = args.out or (CACHE / "smoke-cpu.json" if smoke else results_path(info))
    write_json(out, record)
    print(f"\nsaved {out} ({record['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
