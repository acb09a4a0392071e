"""Properties of sampling that the oracle cannot check: the strided schedules, DDIM, seeds,
batching, guidance="standard" and the low-precision dtypes, on a tiny random checkpoint.

guidance="standard" is also checked against the oracle with its one quirk removed: 0.11.5's
network does `mask &= keep_mask` on the caller's mask; patched to work on a copy, the
oracle is textbook classifier-free guidance, and must then equal ours.
"""

from __future__ import annotations

import math
import time

import clip
import numpy as np
import pytest
import torch

import prior
from prior.contract import DEFAULT_SAMPLER
from prior.diffusion import (
    Schedule,
    cosine_alphas_cumprod,
    ddim_sample,
    ddpm_sample,
    exact_schedule,
    make_schedule,
    respaced_schedule,
    spaced_timesteps,
)
from tests.compare import relative_error
from tests.oracle import oracle_sample

PROMPTS = ["a red cube on a table", "5!$ wow !%", "an astronaut riding a horse"]
FP16_HALF_ULP = 2.0**-11  # relative rounding error of a float16 normal number
FP16_TINIEST = 2.0**-25  # rounding error of a float16 subnormal


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> prior.Prior:
    return prior.load(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def file_schedule(tiny_checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's own noise_scheduler.* buffers, read straight from the file."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    prefix = "noise_scheduler."
    return {k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)}


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# -- the result object -------------------------------------------------------------------


def test_result_fields_shapes_and_dtypes(model):
    d = model.config.dim
    started = time.perf_counter()
    result = model.embed(PROMPTS[:2], candidates=3, cond_scale=2.0, steps=8, seed=11)
    wall = time.perf_counter() - started
    assert result.prompts == PROMPTS[:2]
    assert result.tokens.shape == (2, 77) and result.tokens.dtype == np.int64
    assert result.text_embedding.shape == (2, d) and result.text_embedding.dtype == np.float32
    assert result.image_embedding.shape == (2, d) and result.image_embedding.dtype == np.float32
    assert result.candidates.shape == (2, 3, d) and result.candidates.dtype == np.float32
    assert result.scores.shape == (2, 3) and result.scores.dtype == np.float32
    assert result.chosen.shape == (2,) and result.chosen.dtype == np.int64
    assert result.seed == 11 and result.seeds == [11, 12]
    assert result.truncated == [False, False]
    assert (result.steps, result.cond_scale, result.guidance, result.sampler) == (8, 2.0, "original", DEFAULT_SAMPLER)
    assert 0 < result.sample_seconds <= wall  # a duration within the call, not a clock reading
    for array in (result.text_embedding, result.image_embedding, result.candidates, result.scores):
        assert np.isfinite(array).all()


def test_chosen_candidate_is_the_one_closest_to_the_text(model):
    result = model.embed(PROMPTS, candidates=4, steps=8, seed=5)
    expected_scores = cosine(result.text_embedding[:, None, :], result.candidates)
    np.testing.assert_allclose(result.scores, expected_scores, rtol=0, atol=1e-5)
    assert np.array_equal(result.chosen, result.scores.argmax(axis=1))
    for b in range(len(PROMPTS)):
        assert np.array_equal(result.image_embedding[b], result.candidates[b, result.chosen[b]])
    # the image embedding is returned as 0.11.5 returns it: x_0 / sqrt(D), not re-normalised
    norms = np.linalg.norm(result.candidates, axis=-1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


def test_over_long_prompt_is_flagged(model):
    result = model.embed(["a cat", "a cat " * 80], candidates=1, steps=2, seed=0)
    assert result.truncated == [False, True]
    assert result.tokens[1, -1] == 49407  # the end token is kept


def test_on_step_is_called_once_per_step(model):
    calls = []
    model.embed("a cat", candidates=1, steps=7, seed=0, on_step=lambda i, total: calls.append((i, total)))
    assert calls == [(i, 7) for i in range(7)]


# -- seeds and batching --------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_output_other_seed_other_output(model, sampler):
    first = model.embed(PROMPTS[0], candidates=2, cond_scale=2.0, steps=10, seed=123, sampler=sampler)
    again = model.embed(PROMPTS[0], candidates=2, cond_scale=2.0, steps=10, seed=123, sampler=sampler)
    other = model.embed(PROMPTS[0], candidates=2, cond_scale=2.0, steps=10, seed=124, sampler=sampler)
    assert np.array_equal(first.candidates, again.candidates)
    assert np.array_equal(first.scores, again.scores)
    assert relative_error(other.candidates, first.candidates) > 1e-2


def test_seed_is_drawn_when_omitted_and_reproduces(model):
    drawn = model.embed(PROMPTS[0], candidates=2, steps=5)
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**32
    again = model.embed(PROMPTS[0], candidates=2, steps=5, seed=drawn.seed)
    assert np.array_equal(drawn.candidates, again.candidates)


@pytest.mark.parametrize(("guidance", "sampler", "cond_scale"), [("original", "ddpm", 2.5), ("standard", "ddim", 3.0),
                                                                   ("original", "ddpm", 1.0)])
def test_batched_call_equals_one_by_one(model, guidance, sampler, cond_scale):
    seed = 2**32 - 2  # prompt i uses (seed + i) mod 2**32: this wraps around to 0
    kwargs = dict(candidates=2, cond_scale=cond_scale, steps=12, guidance=guidance, sampler=sampler)
    batch = model.embed(PROMPTS, seed=seed, **kwargs)
    assert batch.seeds == [2**32 - 2, 2**32 - 1, 0]
    for i, prompt in enumerate(PROMPTS):
        one = model.embed(prompt, seed=batch.seeds[i], **kwargs)
        assert np.array_equal(one.tokens[0], batch.tokens[i])
        assert relative_error(one.text_embedding[0], batch.text_embedding[i]) < 1e-5
        assert relative_error(one.candidates[0], batch.candidates[i]) < 1e-5
        assert relative_error(one.image_embedding[0], batch.image_embedding[i]) < 1e-5
        assert one.chosen[0] == batch.chosen[i]


# -- schedules -------------------------------------------------------------------------------


def test_exact_schedule_is_the_checkpoints_buffers(file_schedule):
    buffers = {k: v.float() for k, v in file_schedule.items()}
    schedule = exact_schedule(buffers)
    t = torch.arange(999, -1, -1)
    assert torch.equal(schedule.timesteps, t)
    assert torch.equal(schedule.mean_coef_x0, buffers["posterior_mean_coef1"][t])
    assert torch.equal(schedule.mean_coef_xt, buffers["posterior_mean_coef2"][t])
    assert torch.allclose(schedule.noise_std, (0.5 * buffers["posterior_log_variance_clipped"][t]).exp(), rtol=1e-6)
    assert torch.equal(schedule.alphas_cumprod, buffers["alphas_cumprod"][t])
    assert torch.equal(schedule.alphas_cumprod_prev, buffers["alphas_cumprod_prev"][t])


def test_steps_1000_ddpm_is_the_exact_schedule(model):
    made = make_schedule(model.schedule_buffers, 1000, "ddpm")
    exact = exact_schedule(model.schedule_buffers)
    for field in Schedule.__dataclass_fields__:
        assert torch.equal(getattr(made, field), getattr(exact, field)), field


def assert_within_fp16_rounding(ours: torch.Tensor, stored: torch.Tensor, what: str) -> None:
    ours, stored = ours.double(), stored.double()
    bound = 1.01 * FP16_HALF_ULP * torch.maximum(ours.abs(), stored.abs()) + FP16_TINIEST
    worst = ((ours - stored).abs() / bound).max().item()
    assert worst <= 1, f"{what}: differs from the checkpoint's fp16 buffer by {worst:.2f}x fp16 rounding"


def test_respaced_over_all_timesteps_is_the_checkpoints_schedule_up_to_fp16(file_schedule):
    timesteps = spaced_timesteps(1000, 1000)
    assert torch.equal(timesteps, torch.arange(999, -1, -1))
    respaced = respaced_schedule(cosine_alphas_cumprod(1000), timesteps)
    t = timesteps
    assert_within_fp16_rounding(respaced.alphas_cumprod, file_schedule["alphas_cumprod"][t], "alphas_cumprod")
    assert_within_fp16_rounding(respaced.alphas_cumprod_prev, file_schedule["alphas_cumprod_prev"][t], "alphas_cumprod_prev")
    assert_within_fp16_rounding(respaced.mean_coef_x0, file_schedule["posterior_mean_coef1"][t], "posterior_mean_coef1")
    assert_within_fp16_rounding(respaced.mean_coef_xt, file_schedule["posterior_mean_coef2"][t], "posterior_mean_coef2")
    log_variance = 2 * respaced.noise_std.double().log()
    assert_within_fp16_rounding(log_variance, file_schedule["posterior_log_variance_clipped"][t], "log variance")


@pytest.mark.parametrize("steps", [2, 7, 64, 250])
def test_respaced_schedule_is_a_consistent_ddpm(file_schedule, steps):
    """Posterior mean of a noiseless x_t = sqrt(ac) x_0 is sqrt(ac_prev) x_0 (any valid DDPM),
    and the kept timesteps carry the checkpoint's cumulative alphas."""
    schedule = make_schedule({k: v.float() for k, v in file_schedule.items()}, steps, "ddpm")
    assert len(schedule) == steps
    ac, ac_prev = schedule.alphas_cumprod.double(), schedule.alphas_cumprod_prev.double()
    reconstructed = schedule.mean_coef_x0.double() + schedule.mean_coef_xt.double() * ac.sqrt()
    torch.testing.assert_close(reconstructed, ac_prev.sqrt(), rtol=1e-5, atol=1e-6)
    assert torch.equal(ac_prev[:-1], ac[1:]) and ac_prev[-1] == 1
    assert_within_fp16_rounding(ac, file_schedule["alphas_cumprod"][schedule.timesteps], "respaced alphas_cumprod")
    assert (schedule.noise_std[:-1] > 0).all() and torch.isfinite(schedule.noise_std).all()


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 64, 100, 250, 999, 1000])
def test_spaced_timesteps(steps):
    t = spaced_timesteps(1000, steps)
    assert t.dtype == torch.int64
    assert len(t) == steps
    assert t[0] == 999
    assert (t[1:] < t[:-1]).all(), "strictly descending"
    assert t[-1] == (999 if steps == 1 else 0)


def test_spaced_timesteps_one_step_is_the_last_timestep():
    assert spaced_timesteps(1000, 1).tolist() == [999]


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_spaced_timesteps_refuses_out_of_range(steps):
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(1000, steps)


# -- the samplers, over a toy denoiser ---------------------------------------------------------


def toy_denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    return 0.5 * x + 0.01 * t[:, None].float()


def test_ddim_with_eta_0_draws_no_noise(model):
    schedule = make_schedule(model.schedule_buffers, 20, "ddim")
    x_t = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))

    def no_noise() -> torch.Tensor:
        raise AssertionError("DDIM with eta=0 drew noise")

    x_0 = ddim_sample(toy_denoise, schedule, x_t.clone(), no_noise, eta=0.0)
    assert torch.isfinite(x_0).all() and not torch.equal(x_0, x_t)


@pytest.mark.parametrize(("sampler", "draws"), [("ddim", 1), ("ddpm", 10)])
def test_embed_draws_x_t_and_then_only_what_the_sampler_needs(model, monkeypatch, sampler, draws):
    """DDIM depends only on x_T: embed() draws it and nothing more (DDPM: x_T and one per step, as 0.11.5)."""
    real, calls = torch.randn, []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("generator"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", counted)
    model.embed(PROMPTS[:2], candidates=3, cond_scale=1.5, steps=9, seed=77, sampler=sampler)
    assert len(calls) == 2 * draws  # two prompts, each from its own generator
    assert len({id(g) for g in calls}) == 2


def test_ddpm_draws_one_noise_per_step_after_the_network():
    schedule = make_schedule(_toy_buffers(), 1000, "ddpm")
    events: list[str] = []

    def denoise(x, t, i):
        events.append("net")
        return toy_denoise(x, t, i)

    def draw_noise():
        events.append("noise")
        return torch.zeros(2, 4)

    ddpm_sample(denoise, schedule, torch.ones(2, 4), draw_noise)
    assert events == ["net", "noise"] * 1000


def _toy_buffers() -> dict[str, torch.Tensor]:
    """0.11.5's schedule buffers for 1000 steps, computed here in float64."""
    ac = cosine_alphas_cumprod(1000)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    variance = betas * (1 - ac_prev) / (1 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }


def test_ddpm_last_step_adds_no_noise():
    schedule = make_schedule(_toy_buffers(), 3, "ddpm")
    last_only = Schedule(*(getattr(schedule, f)[-1:] for f in Schedule.__dataclass_fields__))
    x = torch.randn(3, 5)
    quiet = ddpm_sample(toy_denoise, last_only, x, lambda: torch.zeros(3, 5))
    loud = ddpm_sample(toy_denoise, last_only, x, lambda: torch.full((3, 5), 1e3))
    assert torch.equal(quiet, loud)


# -- guidance -----------------------------------------------------------------------------------


def test_standard_equals_original_at_cond_scale_1(model):
    kwargs = dict(candidates=2, cond_scale=1.0, steps=10, seed=3)
    original = model.embed(PROMPTS, guidance="original", **kwargs)
    standard = model.embed(PROMPTS, guidance="standard", **kwargs)
    assert np.array_equal(original.candidates, standard.candidates)
    assert standard.guidance == "standard"


@pytest.mark.parametrize("cond_scale", [0.0, 3.5])
def test_standard_differs_from_original_when_guided(model, cond_scale):
    kwargs = dict(candidates=2, cond_scale=cond_scale, steps=10, seed=3)
    original = model.embed(PROMPTS, guidance="original", **kwargs)
    standard = model.embed(PROMPTS, guidance="standard", **kwargs)
    if cond_scale == 0.0:  # only the unconditional pass counts: the text mask is irrelevant
        assert relative_error(standard.candidates, original.candidates) < 1e-5
    else:
        assert relative_error(standard.candidates, original.candidates) > 1e-2


def test_standard_guidance_is_the_oracle_without_its_mask_quirk(model, tiny_oracle, monkeypatch):
    from dalle2_pytorch import dalle2_pytorch as d2

    quirky_forward = d2.DiffusionPriorNetwork.forward

    def forward_on_a_copy_of_the_mask(self, *args, mask=None, **kwargs):
        return quirky_forward(self, *args, mask=None if mask is None else mask.clone(), **kwargs)

    monkeypatch.setattr(d2.DiffusionPriorNetwork, "forward", forward_on_a_copy_of_the_mask)
    prompt, seed, candidates, cond_scale = PROMPTS[1] + " and a lighthouse", 21, 2, 3.5
    expected = oracle_sample(tiny_oracle, clip.tokenize([prompt], truncate=True), seed, candidates, cond_scale).numpy()

    standard = model.embed(prompt, candidates=candidates, cond_scale=cond_scale, steps=1000, seed=seed, guidance="standard",
                           sampler="ddpm")
    original = model.embed(prompt, candidates=candidates, cond_scale=cond_scale, steps=1000, seed=seed, guidance="original",
                           sampler="ddpm")
    assert relative_error(standard.image_embedding, expected) < 1e-4
    assert relative_error(original.image_embedding, expected) > 1e-2, "the quirk should matter at cond_scale 3.5"


# -- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_low_precision_is_close_to_float32(tiny_checkpoint, model, dtype, cond_scale):
    low = prior.load(tiny_checkpoint, device="cpu", dtype=dtype)
    assert low.dtype == getattr(torch, dtype)
    kwargs = dict(candidates=3, cond_scale=cond_scale, steps=32, seed=9)
    expected = model.embed(PROMPTS, **kwargs)
    result = low.embed(PROMPTS, **kwargs)
    for name in ("text_embedding", "image_embedding", "candidates", "scores"):
        assert getattr(result, name).dtype == np.float32, name
    assert np.array_equal(result.tokens, expected.tokens)
    np.testing.assert_allclose(result.text_embedding, expected.text_embedding, rtol=0, atol=1e-5)  # the tower is float32
    similarity = cosine(result.candidates, expected.candidates)
    assert similarity.min() > 0.99, f"{dtype}: cosine to float32 as low as {similarity.min():.4f}"


# -- the API's own argument checks ---------------------------------------------------------------


@pytest.mark.parametrize(("argument", "value"), [
    ("prompts", ""), ("prompts", " \t\n"), ("prompts", []), ("prompts", ["fine", "  "]), ("prompts", None),
    ("prompts", b"a cat"), ("prompts", ["fine", None]),
    ("candidates", 0), ("candidates", 33), ("candidates", 2.0), ("candidates", True),
    ("cond_scale", -1.0), ("cond_scale", 5.5), ("cond_scale", math.nan), ("cond_scale", math.inf), ("cond_scale", "1"),
    ("steps", 0), ("steps", 1001), ("steps", 10.0),
    ("seed", -1), ("seed", 2**32), ("seed", 1.5), ("seed", np.int64(-1)), ("seed", np.float64(3.0)),
    ("guidance", "best"), ("sampler", "euler"),
])
def test_embed_refuses_bad_arguments(model, argument, value):
    kwargs = dict(prompts="a cat", candidates=1, steps=2, seed=0)
    kwargs[argument] = value
    name = "prompt" if argument == "prompts" else argument
    with pytest.raises(ValueError, match=name) as caught:
        model.embed(**kwargs)
    if argument != "prompts":
        assert repr(value) in str(caught.value)


def test_embed_takes_numpy_numbers(model):
    """Seeds and counts often come from numpy: np.int64(3) is an integer like 3."""
    plain = model.embed("a cat", candidates=2, cond_scale=2.0, steps=3, seed=3)
    numpy = model.embed("a cat", candidates=np.int64(2), cond_scale=np.float32(2.0), steps=np.int32(3), seed=np.uint32(3))
    assert numpy.seed == 3 and type(numpy.seed) is int and numpy.steps == 3 and type(numpy.steps) is int
    np.testing.assert_array_equal(numpy.candidates, plain.candidates)


def test_embed_default_steps_fit_the_schedule(model, schedule_checkpoints):
    assert model.embed("a cat", candidates=1, seed=0).steps == 64
    short = prior.load(schedule_checkpoints["short_schedule"], device="cpu")
    assert short.embed("a cat", candidates=1, seed=0).steps == 37


@pytest.mark.parametrize(("device", "words"), [("tpu", "cpu or cuda"), ("cuda:x", "cpu or cuda"), (3.5, "cpu or cuda")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA device")]))
def test_load_refuses_a_bad_device(tiny_checkpoint, device, words):
    with pytest.raises(ValueError, match="device") as caught:
        prior.load(tiny_checkpoint, device=device)
    assert words in str(caught.value) and repr(device) in str(caught.value)
