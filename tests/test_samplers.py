"""Every sampler in prior.diffusion.SAMPLERS: the registry, the log-SNR grid, the solvers'
steps against closed forms, and the mixture test: on a Gaussian mixture whose exact denoiser
is known (bench/mixture.py), the default sampler at its default steps keeps the distribution
within the noise floor of exact sampling, the respaced DDPM at 25 steps does not, and
DPM-Solver++(2M) converges with order 2.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import prior
from bench.mixture import Denoiser, Metrics, convergence_order, draw, make_mixture, run_sampler
from prior import contract
from prior.diffusion import (
    LOG_SNR_MIN,
    SAMPLERS,
    cosine_alphas_cumprod,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    dpmpp_2m_sde_sample,
    log_snr,
    log_snr_timesteps,
    make_schedule,
)
from tests.compare import relative_error
from tests.test_sampling import PROMPTS, _toy_buffers, toy_denoise

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW = ("sde-dpmpp-2m", "dpmpp-2m")


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> prior.Prior:
    return prior.load(tiny_checkpoint, device="cpu", dtype="float32")


# -- the registry ----------------------------------------------------------------------------------


def test_registry_is_the_contracts_list():
    assert tuple(SAMPLERS) == contract.SAMPLERS
    assert contract.DEFAULT_SAMPLER in contract.SAMPLERS


@pytest.mark.parametrize("sampler", contract.SAMPLERS)
def test_every_sampler_has_the_one_signature(sampler):
    parameters = list(inspect.signature(SAMPLERS[sampler]).parameters.values())
    assert [p.name for p in parameters[:5]] == ["denoise", "schedule", "x", "draw_noise", "on_step"]
    assert parameters[4].default is None
    assert all(p.default is not inspect.Parameter.empty for p in parameters[4:])


def test_make_schedule_refuses_an_unknown_sampler():
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim, sde-dpmpp-2m, dpmpp-2m, got 'euler'"):
        make_schedule(_toy_buffers(), 10, "euler")


# -- the log-SNR grid --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps", [37, 1000, 1200])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 16, 32, 64, 500, 990, 999, 1000, 1200])
def test_log_snr_grid_is_distinct_descending_timesteps(num_timesteps, steps):
    if steps > num_timesteps:
        return
    t = log_snr_timesteps(cosine_alphas_cumprod(num_timesteps), steps)
    assert t.dtype == torch.int64 and len(t) == steps
    assert t[0] == num_timesteps - 1
    assert (t[1:] < t[:-1]).all(), "strictly descending"
    assert t[-1] == (num_timesteps - 1 if steps == 1 else 0)
    if steps == num_timesteps:
        assert torch.equal(t, torch.arange(num_timesteps - 1, -1, -1))


@pytest.mark.parametrize("steps", [8, 16, 32, 64])
def test_log_snr_grid_is_even_in_log_snr_from_its_floor(steps):
    """After t = 999, the grid starts at the timestep nearest LOG_SNR_MIN and is even in
    log-SNR (each point within a rounding of its target) until rounding crowds the t = 0 end."""
    ac = cosine_alphas_cumprod(1000)
    lam = log_snr(ac)
    t = log_snr_timesteps(ac, steps)
    assert t[1] == int((lam - LOG_SNR_MIN).abs()[:999].argmin())
    targets = torch.linspace(LOG_SNR_MIN, float(lam[0]), steps - 1, dtype=torch.float64)
    rounding = (lam[:-1] - lam[1:]).abs()  # log-SNR moved by one timestep
    crowded = t[1:] < 12  # consecutive integers at the t = 0 end
    off = (lam[t[1:]] - targets).abs()
    assert (off[~crowded] <= rounding[t[1:]][~crowded] + 1e-12).all()


def test_dpm_samplers_run_on_the_log_snr_grid():
    buffers = _toy_buffers()
    for sampler in NEW:
        schedule = make_schedule(buffers, 32, sampler)
        assert torch.equal(schedule.timesteps, log_snr_timesteps(cosine_alphas_cumprod(1000), 32))
        assert schedule.log_snr.dtype == torch.float64
        torch.testing.assert_close(schedule.log_snr, log_snr(cosine_alphas_cumprod(1000))[schedule.timesteps])


# -- the solvers' steps, against closed forms ---------------------------------------------------------


@pytest.mark.parametrize("steps", [2, 10])
def test_sde_first_step_is_the_ddpm_posterior(steps):
    """SDE-DPM-Solver++'s first-order step is the DDPM posterior step on the same timesteps:
    given the same noise, both pass the same x_t to the network at the second step (and over
    two steps, first order then x_0 at t = 0, return the same)."""
    schedule = make_schedule(_toy_buffers(), steps, "sde-dpmpp-2m")
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen: dict[str, list[torch.Tensor]] = {"sde": [], "ddpm": []}

    def denoiser(name):
        def denoise(x, t, i):
            seen[name].append(x.clone())
            return toy_denoise(x, t, i)
        return denoise

    ours = dpmpp_2m_sde_sample(denoiser("sde"), schedule, x, lambda: noise)
    ddpm = ddpm_sample(denoiser("ddpm"), schedule, x, lambda: noise)
    torch.testing.assert_close(seen["sde"][1], seen["ddpm"][1], rtol=1e-6, atol=1e-6)  # float32 coefficients
    if steps == 2:
        torch.testing.assert_close(ours, ddpm, rtol=1e-6, atol=1e-6)


def test_ode_is_exact_for_a_constant_prediction():
    """With x_0's prediction constant the 2M correction vanishes and each step is the exact
    ODE solution, which DDIM (the first-order solver) also is: on one grid, the two pass
    the same x_t to the network at every step."""
    constant = torch.randn(1, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen: dict[str, list[torch.Tensor]] = {"ddim": [], "dpmpp-2m": []}

    def denoiser(name):
        def denoise(x, t, i):
            seen[name].append(x.clone())
            return constant.expand_as(x)
        return denoise

    schedule = make_schedule(_toy_buffers(), 20, "dpmpp-2m")
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dpmpp_2m_sample(denoiser("dpmpp-2m"), schedule, x, lambda: 1 / 0)
    ddim_sample(denoiser("ddim"), schedule, x, lambda: 1 / 0)
    assert len(seen["ddim"]) == len(seen["dpmpp-2m"]) == 20
    for ours, ddim in zip(seen["dpmpp-2m"], seen["ddim"], strict=True):
        assert relative_error(ours.numpy(), ddim.numpy()) < 1e-5  # DDIM rounds its coefficients to float32


@pytest.mark.parametrize("sampler", contract.SAMPLERS)
def test_each_step_calls_the_network_once_in_order(sampler):
    """Guidance's "original" mode tells the first step by its index: i must run 0, 1, ..."""
    schedule = make_schedule(_toy_buffers(), 9, sampler)
    calls, steps = [], []

    def denoise(x, t, i):
        calls.append((i, int(t[0])))
        return toy_denoise(x, t, i)

    SAMPLERS[sampler](denoise, schedule, torch.ones(2, 4), lambda: torch.zeros(2, 4), on_step=steps.append)
    assert calls == list(enumerate(schedule.timesteps.tolist()))
    assert steps == list(range(9))


def test_sde_draws_one_noise_per_step_after_the_network_and_none_on_the_last():
    schedule = make_schedule(_toy_buffers(), 6, "sde-dpmpp-2m")
    events: list[str] = []

    def denoise(x, t, i):
        events.append("net")
        return toy_denoise(x, t, i)

    def draw_noise():
        events.append("noise")
        return torch.zeros(2, 4)

    dpmpp_2m_sde_sample(denoise, schedule, torch.ones(2, 4), draw_noise)
    assert events == ["net", "noise"] * 5 + ["net"]


def test_ode_draws_no_noise():
    schedule = make_schedule(_toy_buffers(), 12, "dpmpp-2m")

    def no_noise():
        raise AssertionError("DPM-Solver++(2M) drew noise")

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dpmpp_2m_sample(toy_denoise, schedule, x.clone(), no_noise),
                       dpmpp_2m_sample(toy_denoise, schedule, x.clone(), no_noise))


@pytest.mark.parametrize("sampler", NEW)
def test_last_step_returns_the_prediction_of_x0(sampler):
    schedule = make_schedule(_toy_buffers(), 5, sampler)
    seen = []

    def denoise(x, t, i):
        seen.append(toy_denoise(x, t, i))
        return seen[-1]

    out = SAMPLERS[sampler](denoise, schedule, torch.randn(3, 4), lambda: torch.randn(3, 4))
    assert torch.equal(out, seen[-1])


# -- through Prior.embed ------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", contract.SAMPLERS)
def test_every_sampler_is_deterministic_per_seed(model, sampler):
    kwargs = dict(candidates=2, cond_scale=2.0, steps=10, sampler=sampler)
    first = model.embed(PROMPTS[0], seed=123, **kwargs)
    again = model.embed(PROMPTS[0], seed=123, **kwargs)
    other = model.embed(PROMPTS[0], seed=124, **kwargs)
    assert first.sampler == sampler
    assert np.array_equal(first.candidates, again.candidates)
    assert relative_error(other.candidates, first.candidates) > 1e-2


@pytest.mark.parametrize("guidance", contract.GUIDANCE)
@pytest.mark.parametrize("sampler", NEW)
def test_batched_call_equals_one_by_one(model, sampler, guidance):
    kwargs = dict(candidates=2, cond_scale=2.5, steps=12, guidance=guidance, sampler=sampler)
    batch = model.embed(PROMPTS, seed=2**32 - 2, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        one = model.embed(prompt, seed=batch.seeds[i], **kwargs)
        assert relative_error(one.candidates[0], batch.candidates[i]) < 1e-5
        assert one.chosen[0] == batch.chosen[i]


@pytest.mark.parametrize("sampler", contract.SAMPLERS)
def test_guidance_modes_with_every_sampler(model, sampler):
    """At cond_scale 1 the two modes are one; guided, they differ (the mask quirk), and
    guidance changes the samples."""
    kwargs = dict(candidates=2, steps=10, seed=3, sampler=sampler)
    plain = {g: model.embed(PROMPTS, cond_scale=1.0, guidance=g, **kwargs) for g in contract.GUIDANCE}
    guided = {g: model.embed(PROMPTS, cond_scale=3.5, guidance=g, **kwargs) for g in contract.GUIDANCE}
    assert np.array_equal(plain["original"].candidates, plain["standard"].candidates)
    assert relative_error(guided["standard"].candidates, guided["original"].candidates) > 1e-2
    assert relative_error(guided["original"].candidates, plain["original"].candidates) > 1e-2


def test_one_step_is_the_first_prediction_for_every_sampler(model):
    """One step from t = 999: each sampler returns the network's prediction of x_0."""
    results = [model.embed(PROMPTS, candidates=2, cond_scale=2.0, steps=1, seed=8, sampler=s) for s in contract.SAMPLERS]
    for result in results[1:]:
        assert relative_error(result.candidates, results[0].candidates) < 1e-6


def test_embed_defaults_are_the_contracts(model):
    result = model.embed("a cat", candidates=1, seed=0)
    assert (result.sampler, result.steps) == (contract.DEFAULT_SAMPLER, contract.DEFAULT_STEPS)


# -- the mixture test -----------------------------------------------------------------------------------

MIXTURE_SAMPLES = 1000


@pytest.fixture(scope="module")
def mixture_check():
    """(sampler, steps) -> the covariance-trace and isotropic-variance ratios of 1,000 samples,
    each within a tolerance of 1: three standard deviations of the same ratio over ten sets of
    1,000 exact draws (the noise floor)."""
    mixture = make_mixture(dim=64, components=4, rank=4, seed=0)
    metrics = Metrics(mixture)
    g = torch.Generator().manual_seed(100)
    exact = [metrics.summary(draw(mixture, MIXTURE_SAMPLES, g)[0]) for _ in range(10)]
    names = ("cov_trace_ratio", "iso_var_ratio")
    tolerance = {m: 3 * float(np.std([e[m] for e in exact], ddof=1)) for m in names}
    assert all(0.002 < t < 0.1 for t in tolerance.values()), tolerance

    def check(sampler: str, steps: int) -> dict[str, tuple[float, float]]:
        x = run_sampler(Denoiser(mixture), sampler, steps, MIXTURE_SAMPLES, mixture.dim, seed=1)
        summary = metrics.summary(x)
        return {m: (summary[m], tolerance[m]) for m in names}

    return check


def test_default_sampler_keeps_the_mixtures_spread(mixture_check):
    for metric, (ratio, tolerance) in mixture_check(contract.DEFAULT_SAMPLER, contract.DEFAULT_STEPS).items():
        assert abs(ratio - 1) <= tolerance, f"{metric}: {ratio:.4f}, allowed 1 +- {tolerance:.4f}"


def test_respaced_ddpm_at_25_steps_shrinks_the_mixture(mixture_check):
    """What the mixture test catches: few-step ancestral sampling is under-dispersed."""
    for metric, (ratio, tolerance) in mixture_check("ddpm", 25).items():
        assert ratio < 1 - tolerance, f"{metric}: {ratio:.4f}, expected below 1 - {tolerance:.4f}"


def test_dpm_solver_2m_converges_with_order_2():
    mixture = make_mixture(dim=64, components=4, rank=4, seed=0)
    order = convergence_order(Denoiser(mixture), "dpmpp-2m", [16, 24, 32, 48, 64], n=100, dim=64, seed=7)
    assert order["order_median"] >= 1.8, order
    ddim = convergence_order(Denoiser(mixture), "ddim", [16, 24, 32, 48, 64], n=100, dim=64, seed=7)
    assert 0.8 < ddim["order_median"] < 1.3, ddim  # first order: the measure tells them apart
    assert math.isfinite(order["order_p10"])
