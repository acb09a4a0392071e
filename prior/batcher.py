"""Continuous batching: many concurrent callers, one Prior, shared network passes.

    caller 1 ──submit()──┐                      ┌──> result 1
    caller 2 ──submit()──┼─> queue ─> worker ───┼──> result 2       (one thread, every core)
    caller 3 ──submit()──┘   (oldest first)     └──> result 3

While one batch samples, new requests wait in the queue. When it finishes, the worker takes the
oldest waiting request and every other waiting request with the same steps and sampler (they
share a schedule), up to `max_rows` network rows, and samples them together with
`Prior.embed_many`: each request keeps its own prompt, candidates, cond_scale, seed and guidance.
A request's result equals a solo `Prior.embed` call up to float rounding (see embed_many).

`submit` is a coroutine (the cog predictor's async `predict` awaits it); the sampling runs on
the worker thread, so the event loop stays free to accept requests meanwhile. The worker thread
also loads the model: torch's OpenMP runtime keeps one thread pool per thread that runs parallel
work, and once two pools exist on a machine with as many cores as one pool has threads, libgomp
throttles its spin-waiting and every parallel region slows down (on 2 cores: 1.5 cores used
instead of 2, a step 30% slower). Loading and sampling on one thread keeps one pool. Cancelling a
caller drops its request from the queue; if its batch is already sampling, the others finish
and its result is thrown away (a batch whose requests are all cancelled stops at the next step).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .contract import DEFAULT_SAMPLER
from .pipeline import EmbedResult, Prior, Request

MAX_ROWS = 256  # network rows per pass (candidates, doubled for guided requests): see README "Serving"
GATHER_SECONDS = 0.02  # an idle worker waits this long after the first arrival for the rest of a burst


class _AllCancelled(Exception):
    """Every request of the running batch was cancelled: stop sampling."""


@dataclass(eq=False)
class _Pending:
    request: Request
    steps: int
    sampler: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.request.candidates * (2 if self.request.cond_scale != 1 else 1)

    def settle(self, result: EmbedResult | None = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the caller's event loop (from the worker thread)."""

        def deliver() -> None:
            if self.future.done():  # cancelled meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass


class Batcher:
    """Queue requests from any number of coroutines onto one Prior; see the module docstring.

    `load` builds the Prior (`lambda: prior.load(path)`); it runs on the batcher's own thread,
    and its exception, if any, is raised here."""

    def __init__(self, load: Callable[[], Prior], max_rows: int = MAX_ROWS, gather_seconds: float = GATHER_SECONDS):
        self.max_rows, self.gather_seconds = max_rows, gather_seconds
        self.threads = torch.get_num_threads()  # the caller's: every core, unless the user set fewer
        self._queue: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # requests per batch sampled, for tests and benchmarks (last 1000)
        loaded: Future[Prior] = Future()
        self._thread = threading.Thread(target=self._work, args=(load, loaded), name="prior-batcher", daemon=True)
        self._thread.start()
        self.model: Prior = loaded.result()

    async def submit(self, request: Request, steps: int | None = None, sampler: str = DEFAULT_SAMPLER) -> EmbedResult:
        """Sample one request in the next batch it fits in. Bad values raise ArgumentError here,
        before queueing, so one bad request never fails a batch."""
        (request,), steps = self.model.check([request], steps, sampler)
        loop = asyncio.get_running_loop()
        pending = _Pending(request, steps, sampler, loop, loop.create_future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(pending)
            self._wake.notify()
        try:
            return await pending.future
        except asyncio.CancelledError:
            with self._wake:
                pending.cancelled = True
                if pending in self._queue:
                    self._queue.remove(pending)
            raise

    def close(self, timeout: float | None = None) -> None:
        """Stop after the running batch; requests still queued fail."""
        with self._wake:
            self._closed = True
            left, self._queue = list(self._queue), deque()
            self._wake.notify()
        for pending in left:
            pending.settle(error=RuntimeError("the server is shutting down"))
        self._thread.join(timeout)

    def _take(self) -> list[_Pending]:
        """The oldest request and the waiting ones that can share its passes (same steps and
        sampler), oldest first, up to max_rows rows (the oldest always goes, however large)."""
        first = self._queue.popleft()
        batch, rows = [first], first.rows
        for pending in list(self._queue):
            if (pending.steps, pending.sampler) == (first.steps, first.sampler) and rows + pending.rows <= self.max_rows:
                self._queue.remove(pending)
                batch.append(pending)
                rows += pending.rows
        return batch

    def _work(self, load: Callable[[], Prior], loaded: Future[Prior]) -> None:
        # A thread starts with the OpenMP runtime's defaults, not the values torch.set_num_threads
        # gave the caller's thread: take the caller's.
        torch.set_num_threads(self.threads)
        try:
            loaded.set_result(load())
        except BaseException as e:  # raised in the caller's thread by __init__
            loaded.set_exception(e)
            return
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                idle_since = self._queue[0].arrived
            wait = self.gather_seconds - (time.monotonic() - idle_since)
            if wait > 0:  # a burst of requests arrives over a few milliseconds: take it whole
                time.sleep(wait)
            with self._wake:
                if not self._queue:
                    continue
                batch = self._take()
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        def stop_when_all_cancelled(i: int, total: int) -> None:
            if all(p.cancelled for p in batch):
                raise _AllCancelled

        self.batches = [*self.batches[-999:], len(batch)]
        print(f"sampling a batch of {len(batch)} ({sum(p.rows for p in batch)} rows, {batch[0].steps} steps "
              f"{batch[0].sampler})", flush=True)
        started = time.perf_counter()
        try:
            results = self.model.embed_many([p.request for p in batch], batch[0].steps, batch[0].sampler,
                                            on_step=stop_when_all_cancelled)
        except _AllCancelled:
            print(f"batch of {len(batch)} stopped: every request was cancelled", flush=True)
            return
        except Exception as e:  # every request of the batch fails with the same one-line error
            for pending in batch:
                pending.settle(error=e)
            return
        print(f"sampled a batch of {len(batch)} in {time.perf_counter() - started:.2f} s", flush=True)
        for pending, result in zip(batch, results, strict=True):
            pending.settle(result)
