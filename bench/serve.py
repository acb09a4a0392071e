"""The HTTP service under load: throughput and latency of concurrent clients against `prior serve`.

    .venv/bin/python -m bench.serve                          # CPU, full-size random checkpoint
    .venv/bin/python -m bench.serve --clients 1,4,16,32 --steps 64 --device cuda

One run, one machine, on the full-size random checkpoint (bench.common.full_checkpoint):
1. `prior serve` (coglet behind the supervising proxy, the batching predictor) is started, and
   for each client count C, C clients send their requests at once, each client its share one
   after another (a 409 would be retried after 0.2 s and counted; none is expected below the
   server's concurrency cap). The rows: requests, throughput (requests/s), p50 and p95
   latency, 409s. C = 1 is "the same requests served one at a time", the reference.
2. The server is stopped, and in this process `Prior.embed` samples the same 16 (and 32)
   prompts in one batched call: the engine's own best, which a server can approach but not beat.
Every request: a distinct prompt and seed, `--steps` steps, candidates 2, cond_scale 1 (the
product's defaults), so that the batched call holds the same work.
Targets (CPU, 2 cores): 16 clients >= 2.5x the one-at-a-time throughput, their p95 latency
<= 2x the time of the one batched call of 16 prompts. Prints a table; writes
bench/results/serve-<machine>-<date>.json and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.common import REPO, RESULTS, full_checkpoint, machine_info, machine_slug, print_table, write_json

CANDIDATES, COND_SCALE = 2, 1.0


def prompt(i: int) -> str:
    subjects = ["a lighthouse", "a red cube", "an astronaut", "a bowl of fruit", "a city street", "a mountain lake"]
    styles = ["oil on canvas", "a photograph", "a watercolor", "pencil sketch", "3d render"]
    return f"{subjects[i % len(subjects)]}, {styles[i % len(styles)]}, number {i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, weights: Path, log: Path, device: str | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prior", "serve", "--port", str(self.port), "--weights", str(weights)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health-check", timeout=5) as r:
                    status = json.load(r)["status"]
                if status == "READY":
                    return
                if status == "SETUP_FAILED":
                    raise RuntimeError("setup failed")
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the server did not become ready")

    def predict(self, inputs: dict) -> tuple[float, int]:
        """Seconds until a successful answer, and how many 409s were retried meanwhile."""
        body = json.dumps({"input": inputs}).encode()
        started, busy = time.perf_counter(), 0
        while True:
            request = urllib.request.Request(self.url + "/predictions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=3600) as r:
                    answer = json.load(r)
                if answer["status"] != "succeeded":
                    raise RuntimeError(answer.get("error"))
                return time.perf_counter() - started, busy
            except urllib.error.HTTPError as e:
                if e.code not in (409, 503):
                    raise
                busy += 1
                time.sleep(0.2)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def run_clients(server: Server, clients: int, requests: int, steps: int, first_seed: int) -> dict:
    """`clients` threads at once, `requests` in all (client k takes k, k + clients, ...)."""
    latencies: list[float] = [0.0] * requests
    retries = [0] * requests

    def client(k: int) -> None:
        for i in range(k, requests, clients):
            latencies[i], retries[i] = server.predict({"prompt": prompt(first_seed + i), "seed": first_seed + i,
                                                        "steps": steps, "candidates": CANDIDATES, "cond_scale": COND_SCALE})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": requests, "seconds": wall, "throughput": requests / wall,
        "p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "retries_409_503": sum(retries),
    }


def batched_call(weights: Path, count: int, steps: int, device: str | None) -> float:
    """Seconds of one Prior.embed call holding `count` prompts (after a warm-up call)."""
    import prior

    model = prior.load(weights, device=device)
    model.embed([prompt(i) for i in range(2)], candidates=CANDIDATES, steps=2, seed=0)
    started = time.perf_counter()
    model.embed([prompt(i) for i in range(count)], candidates=CANDIDATES, cond_scale=COND_SCALE, steps=steps, seed=0)
    return time.perf_counter() - started


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["server"]
    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["throughput"] for r in rows], "o-", label="prior serve")
    for count, seconds in record["batched_call_seconds"].items():
        left.axhline(int(count) / seconds, ls="--", color="gray" if count == "16" else "silver",
                     label=f"one Prior.embed call, {count} prompts")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    left.set_xticks(clients, [str(c) for c in clients])
    left.legend(fontsize=8)
    right.plot(clients, [r["p50"] for r in rows], "o-", label="p50")
    right.plot(clients, [r["p95"] for r in rows], "s-", label="p95")
    right.axhline(2 * record["batched_call_seconds"]["16"], ls="--", color="gray", label="2x one call of 16 prompts")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    right.set_xticks(clients, [str(c) for c in clients])
    right.legend(fontsize=8)
    device = record["machine"]["gpu_name"] or record["machine"]["cpu_model"]
    fig.suptitle(f"prior serve, {record['steps']} steps, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="default: the full-size random checkpoint")
    parser.add_argument("--clients", default="1,4,16,32", help="client counts (default 1,4,16,32)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/serve-<machine>-<date>.json)")
    args = parser.parse_args(argv)
    weights = args.weights or full_checkpoint()
    counts = [int(c) for c in args.clients.split(",")]
    info = machine_info()

    log = RESULTS / "serve-server.log"
    RESULTS.mkdir(parents=True, exist_ok=True)
    server = Server(weights, log, args.device)
    rows = []
    try:
        server.wait_ready()
        server.predict({"prompt": "warm-up", "steps": 2, "seed": 0})
        for clients in counts:
            requests = max(clients, 16)
            rows.append(run_clients(server, clients, requests, args.steps, first_seed=1000 * clients))
            r = rows[-1]
            print(f"{clients:>3} clients: {r['throughput']:.3f} requests/s, p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s",
                  flush=True)
    finally:
        server.stop()
    batches = [int(line.split("sampled a batch of ")[1].split()[0]) for line in log.read_text().splitlines()
               if "sampled a batch of " in line]
    log.unlink()
    calls = {str(n): batched_call(weights, n, args.steps, args.device) for n in (1, 16, 32)}

    alone = rows[0]["throughput"] if counts[0] == 1 else None
    def versus(throughput: float) -> str:
        return f"{throughput / alone:.2f}x" if alone else "-"

    table = [[str(r["clients"]), str(r["requests"]), f"{r['throughput']:.3f}", versus(r["throughput"]),
              f"{r['p50']:.2f} s", f"{r['p95']:.2f} s", str(r["retries_409_503"])] for r in rows]
    for n, seconds in calls.items():
        table.append(["one Prior.embed call", n, f"{int(n) / seconds:.3f}", versus(int(n) / seconds),
                      f"{seconds:.2f} s", f"{seconds:.2f} s", "-"])
    print_table(["clients", "requests", "requests/s", "vs one at a time", "p50", "p95", "409/503 retries"], table)

    by_clients = {r["clients"]: r for r in rows}
    targets = {}
    if alone and 16 in by_clients:
        targets = {
            "throughput_16_vs_one_at_a_time": by_clients[16]["throughput"] / alone,
            "p95_16_vs_one_batched_call_of_16": by_clients[16]["p95"] / calls["16"],
        }
        print(f"16 clients: {targets['throughput_16_vs_one_at_a_time']:.2f}x the one-at-a-time throughput (target >= 2.5x); "
              f"p95 {targets['p95_16_vs_one_batched_call_of_16']:.2f}x one batched call of 16 (target <= 2x)")
    record = {"machine": info, "steps": args.steps, "candidates": CANDIDATES, "cond_scale": COND_SCALE,
              "server": rows, "batched_call_seconds": calls, "batch_sizes_seen": batches, "targets": targets,
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    out = args.out or RESULTS / f"serve-{machine_slug(info)}-{info['date_utc'][:10]}.json"
    write_json(out, record)
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} and its .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
