"""Requests with different settings sampled in shared passes (Prior.embed_many) and the
continuous batcher in front of it (prior/batcher.py): each result equals a solo call."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

import prior
from prior.batcher import Batcher
from tests.compare import relative_error

# Mixed on purpose: guided and not, both guidance modes, several candidate counts, prompts of
# different lengths (their text conditions have different prefix lengths).
MIXED = [
    prior.Request("a red cube on a table", candidates=2, cond_scale=1.0, seed=1),
    prior.Request("an astronaut riding a horse on the moon, oil on canvas", candidates=4, cond_scale=2.5, seed=2),
    prior.Request("5!$ wow !%", candidates=1, cond_scale=3.0, seed=3, guidance="standard"),
    prior.Request("a lighthouse", candidates=3, cond_scale=1.0, seed=4, guidance="standard"),
    prior.Request("a blue sphere", candidates=2, cond_scale=0.0, seed=5),
]
SOLO_TOLERANCE = 1e-5  # the documented guarantee on CPU float32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return prior.load(tiny_checkpoint, device="cpu")


def solo(model, request: prior.Request, steps: int, sampler: str) -> prior.EmbedResult:
    return model.embed(request.prompt, candidates=request.candidates, cond_scale=request.cond_scale, steps=steps,
                       seed=request.seed, guidance=request.guidance, sampler=sampler)


def assert_same_result(got: prior.EmbedResult, want: prior.EmbedResult) -> None:
    assert got.seed == want.seed and got.prompts == want.prompts and got.cond_scale == want.cond_scale
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert relative_error(torch.from_numpy(got.candidates), torch.from_numpy(want.candidates)) < SOLO_TOLERANCE
    assert relative_error(torch.from_numpy(got.text_embedding), torch.from_numpy(want.text_embedding)) < SOLO_TOLERANCE
    np.testing.assert_array_equal(got.chosen, want.chosen)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_each_request_in_a_mixed_batch_equals_its_solo_call(model, sampler):
    together = model.embed_many(MIXED, steps=12, sampler=sampler)
    assert len(together) == len(MIXED)
    for request, got in zip(MIXED, together, strict=True):
        assert got.candidates.shape == (1, request.candidates, model.config.dim)
        assert got.guidance == request.guidance and got.steps == 12 and got.sampler == sampler
        assert_same_result(got, solo(model, request, 12, sampler))


def test_a_result_does_not_depend_on_its_companions(model):
    """The same request alone, first, last, or beside other prompts: the same embedding."""
    target = MIXED[1]
    alone = model.embed_many([target], steps=8)[0]
    first = model.embed_many([target, *MIXED[2:]], steps=8)[0]
    last = model.embed_many([*MIXED[2:], target], steps=8)[-1]
    for got in (first, last):
        assert_same_result(got, alone)


def test_the_exact_sampler_in_a_mixed_batch_equals_solo(model):
    """The 1000-step exact sampler (the parity path) too, guided and unguided rows together."""
    steps = model.config.num_timesteps
    pair = [MIXED[0], MIXED[1]]
    for request, got in zip(pair, model.embed_many(pair, steps=steps), strict=True):
        assert_same_result(got, solo(model, request, steps, "ddpm"))


def test_a_missing_seed_is_drawn_and_reported(model):
    first, second = model.embed_many([prior.Request("a cat"), prior.Request("a cat")], steps=2)
    assert first.seed != second.seed  # drawn independently (a 1 in 2**32 chance of a false failure)
    again = model.embed("a cat", steps=2, seed=first.seed)
    assert_same_result(first, again)


@pytest.mark.parametrize(("request_", "field"), [
    (prior.Request("   \u200b "), "prompt"),
    (prior.Request("x", candidates=0), "candidates"),
    (prior.Request("x", cond_scale=float("nan")), "cond_scale"),
    (prior.Request("x", seed=-1), "seed"),
    (prior.Request("x", guidance="loud"), "guidance"),
])
def test_a_bad_request_names_its_field(model, request_, field):
    with pytest.raises(prior.ArgumentError) as error:
        model.embed_many([MIXED[0], request_], steps=2)
    assert error.value.field == field


# -- the batcher ------------------------------------------------------------------------------------


async def _gather(batcher: Batcher, requests, steps: int = 6, sampler: str = "ddpm"):
    return await asyncio.gather(*(batcher.submit(r, steps, sampler) for r in requests))


def test_concurrent_requests_share_passes_and_each_gets_its_own_result(model):
    batcher = Batcher(lambda: model)
    try:
        results = asyncio.run(_gather(batcher, MIXED))
    finally:
        batcher.close()
    assert batcher.batches == [len(MIXED)]  # one burst, one batch
    for request, got in zip(MIXED, results, strict=True):
        assert_same_result(got, solo(model, request, 6, "ddpm"))


def test_requests_with_other_steps_or_sampler_wait_for_their_own_batch(model):
    batcher = Batcher(lambda: model)

    async def mixed_settings():
        return await asyncio.gather(batcher.submit(MIXED[0], 6, "ddpm"), batcher.submit(MIXED[1], 4, "ddpm"),
                                    batcher.submit(MIXED[2], 6, "ddim"), batcher.submit(MIXED[3], 6, "ddpm"))

    try:
        results = asyncio.run(mixed_settings())
    finally:
        batcher.close()
    assert sorted(batcher.batches) == [1, 1, 2]  # (6, ddpm) x2 together; the others alone
    settings = [(6, "ddpm"), (4, "ddpm"), (6, "ddim"), (6, "ddpm")]
    for request, (steps, sampler), got in zip(MIXED[:4], settings, results, strict=True):
        assert_same_result(got, solo(model, request, steps, sampler))


def test_a_burst_arriving_over_a_few_milliseconds_is_one_batch(model):
    """An idle batcher waits GATHER_SECONDS after a first request for the rest of a burst (HTTP
    requests sent together arrive a few milliseconds apart)."""
    batcher = Batcher(lambda: model)

    async def spread_burst():
        tasks = []
        for request in MIXED[:3]:
            tasks.append(asyncio.create_task(batcher.submit(request, 4)))
            await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    try:
        asyncio.run(spread_burst())
    finally:
        batcher.close()
    assert batcher.batches == [3]


def test_max_rows_splits_a_burst(model):
    batcher = Batcher(lambda: model, max_rows=4)  # MIXED[0] is 2 rows, MIXED[3] 3 rows: never together
    try:
        asyncio.run(_gather(batcher, [MIXED[0], MIXED[3], MIXED[0]]))
    finally:
        batcher.close()
    assert batcher.batches == [2, 1]


def test_a_bad_request_fails_alone_before_queueing(model):
    batcher = Batcher(lambda: model)

    async def one_bad():
        return await asyncio.gather(batcher.submit(MIXED[0], 4), batcher.submit(prior.Request("x", candidates=99), 4),
                                    return_exceptions=True)

    try:
        good, bad = asyncio.run(one_bad())
    finally:
        batcher.close()
    assert isinstance(good, prior.EmbedResult)
    assert isinstance(bad, prior.ArgumentError) and bad.field == "candidates"
    assert batcher.batches == [1]


def _slow_steps(model, seconds: float):
    """Make every network call take at least `seconds`, so that a test can act mid-batch."""
    real = model._denoise_step

    def slow(*args):
        time.sleep(seconds)
        return real(*args)

    model._denoise_step = slow
    return real


def test_cancelling_one_request_of_a_batch_lets_the_others_finish(model):
    batcher = Batcher(lambda: model)
    real = _slow_steps(model, 0.05)

    async def cancel_the_second():
        tasks = [asyncio.create_task(batcher.submit(r, 20)) for r in MIXED[:3]]
        while not batcher.batches:  # the batch has started sampling
            await asyncio.sleep(0.01)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(cancel_the_second())
    finally:
        model._denoise_step = real
        batcher.close()
    assert batcher.batches == [3]
    assert isinstance(results[1], asyncio.CancelledError)
    for i in (0, 2):
        assert_same_result(results[i], solo(model, MIXED[i], 20, "ddpm"))


def test_a_batch_whose_requests_are_all_cancelled_stops(model):
    batcher = Batcher(lambda: model)
    steps_run = []
    real = _slow_steps(model, 0.05)
    model_step = model._denoise_step
    model._denoise_step = lambda *args: steps_run.append(1) or model_step(*args)

    async def cancel_all():
        tasks = [asyncio.create_task(batcher.submit(r, 200)) for r in MIXED[:2]]
        while not steps_run:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)
        return len(steps_run)

    try:
        ran = asyncio.run(cancel_all())
        time.sleep(0.3)
        assert len(steps_run) < 30 and len(steps_run) - ran <= 2  # stopped within a step, far short of 200
        # and the batcher still serves
        (after,) = asyncio.run(_gather(batcher, [MIXED[0]], steps=4))
    finally:
        model._denoise_step = real
        batcher.close()
    assert_same_result(after, solo(model, MIXED[0], 4, "ddpm"))


def test_a_cancelled_request_still_queued_is_never_sampled(model):
    batcher = Batcher(lambda: model)
    real = _slow_steps(model, 0.05)

    async def cancel_queued():
        running = asyncio.create_task(batcher.submit(MIXED[0], 10))
        while not batcher.batches:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit(MIXED[1], 10))
        await asyncio.sleep(0.05)
        queued.cancel()
        outcome = await asyncio.gather(running, queued, return_exceptions=True)
        await asyncio.sleep(0.5)  # time for the worker to take anything left in the queue
        return outcome

    try:
        done, cancelled = asyncio.run(cancel_queued())
    finally:
        model._denoise_step = real
        batcher.close()
    assert isinstance(done, prior.EmbedResult) and isinstance(cancelled, asyncio.CancelledError)
    assert batcher.batches == [1]


def test_close_fails_what_is_still_queued(model):
    batcher = Batcher(lambda: model)
    real = _slow_steps(model, 0.05)
    outcome = {}

    async def close_midway():
        running = asyncio.create_task(batcher.submit(MIXED[0], 10))
        while not batcher.batches:
            await asyncio.sleep(0.01)
        queued = asyncio.create_task(batcher.submit(MIXED[1], 10))
        await asyncio.sleep(0.05)
        threading.Thread(target=batcher.close).start()
        outcome["running"], outcome["queued"] = await asyncio.gather(running, queued, return_exceptions=True)

    try:
        asyncio.run(close_midway())
    finally:
        model._denoise_step = real
    assert isinstance(outcome["running"], prior.EmbedResult)
    assert isinstance(outcome["queued"], RuntimeError) and "shutting down" in str(outcome["queued"])
