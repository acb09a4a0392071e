"""Noise schedules and samplers, apart from the network.

A sampler is a plain function over a denoiser `denoise(x_t, t, i) -> x_0` (t: (B,) timesteps,
i: the index of the step, 0 first) and a `Schedule`: the timesteps to visit, high to low,
with the per-step coefficients. Nothing here knows what the denoiser is.

Samplers (`SAMPLERS`, name -> function, all with one signature):
- `ddpm`: ancestral sampling, 0.11.5's own at every timestep (exact schedule), else respaced.
- `ddim`: deterministic DDIM (eta = 0) on the same evenly spaced timesteps.
- `sde-dpmpp-2m`: SDE-DPM-Solver++(2M), midpoint form, in x_0-prediction (Lu et al. 2022,
  "DPM-Solver++", the SDE variant as k-diffusion's `sample_dpmpp_2m_sde` and diffusers'
  `sde-dpmsolver++`). Its first-order step is exactly the DDPM posterior on its own grid; the
  second-order term corrects for how the prediction of x_0 moves between steps.
- `dpmpp-2m`: DPM-Solver++(2M), the deterministic (probability-flow ODE) form.
The DPM-Solver++ pair runs on `log_snr_timesteps`: t = T - 1, then integer timesteps evenly
spread in log-SNR from LOG_SNR_MIN to the t = 0 end.

Schedules:
- `exact_schedule`: all timesteps, coefficients read from the checkpoint's own buffers
  (fp16-rounded, as dalle2-pytorch 0.11.5 uses them after loading the file).
- `respaced_schedule`: a subset of timesteps, as improved-diffusion's respace.py does it:
  the DDPM whose cumulative alphas are the original ones at the kept timesteps. The
  cumulative alphas come from the float64 cosine formula the model was trained with, not
  from the checkpoint's fp16 buffers, where alphas_cumprod rounds to exactly 1 at t=0 and
  exactly 0 at t=999 (the posterior coefficients would be 0/0 there). Keeping all 1000
  timesteps is no respacing at all, so `make_schedule` returns the exact schedule then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
NoiseSource = Callable[[], torch.Tensor]

# Lowest log-SNR on the DPM-Solver++ grids after the first step from t = T - 1: EDM's
# sigma_max = 80 (lambda = log(alpha / sigma) = -log 80). Points below it are at the t = T - 1
# end, where x_0's prediction barely moves (t = 992..999 for the cosine schedule).
LOG_SNR_MIN = -math.log(80.0)


@dataclass(frozen=True)
class Schedule:
    """Per-step values, step 0 first (the highest timestep). All 1-D float32 except timesteps."""

    timesteps: torch.Tensor  # (S,) int64, descending
    mean_coef_x0: torch.Tensor  # posterior mean = coef_x0 * x_0 + coef_xt * x_t
    mean_coef_xt: torch.Tensor
    noise_std: torch.Tensor  # exp(0.5 * clipped posterior log-variance); not applied at t = 0
    alphas_cumprod: torch.Tensor  # at each kept timestep (for DDIM)
    alphas_cumprod_prev: torch.Tensor  # at the next kept timestep below (1 after the last)
    log_snr: torch.Tensor  # float64 log(alpha / sigma) = 0.5 log(ac / (1 - ac)) at each kept timestep

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> torch.Tensor:
    """float64 cumulative alphas of the cosine schedule, betas clipped at 0.999 (0.11.5's)."""
    x = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((x / num_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    betas = (1 - f[1:] / f[:-1]).clip(0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


def log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma), float64; +inf where alphas_cumprod is 1, -inf where it is 0."""
    ac = alphas_cumprod.double()
    return 0.5 * (ac.log() - torch.log1p(-ac))


def exact_schedule(buffers: dict[str, torch.Tensor]) -> Schedule:
    """Every timestep, with the checkpoint's `noise_scheduler.*` buffers as they are."""
    n = len(buffers["posterior_mean_coef1"])
    steps = torch.arange(n - 1, -1, -1)
    f32 = {k: v.float() for k, v in buffers.items()}
    return Schedule(
        timesteps=steps,
        mean_coef_x0=f32["posterior_mean_coef1"][steps],
        mean_coef_xt=f32["posterior_mean_coef2"][steps],
        noise_std=(0.5 * f32["posterior_log_variance_clipped"][steps]).exp(),
        alphas_cumprod=f32["alphas_cumprod"][steps],
        alphas_cumprod_prev=f32["alphas_cumprod_prev"][steps],
        log_snr=log_snr(buffers["alphas_cumprod"][steps]),
    )


def spaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """`steps` timesteps evenly spread over [0, num_timesteps - 1], both ends kept, descending.

    One step uses the last timestep alone: from pure noise, the prediction of x_0 is the answer.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    kept = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()
    return kept.flip(0)


def respaced_schedule(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> Schedule:
    """The DDPM over `timesteps` (descending) whose cumulative alphas equal `alphas_cumprod` there."""
    ac = alphas_cumprod.double()[timesteps]
    ac_prev = torch.cat([ac[1:], ac.new_ones(1)])  # the next step down; 1 after t = 0
    betas = 1 - ac / ac_prev
    variance = betas * (1 - ac_prev) / (1 - ac)
    return Schedule(
        timesteps=timesteps.clone(),
        mean_coef_x0=(betas * ac_prev.sqrt() / (1 - ac)).float(),
        mean_coef_xt=((1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)).float(),
        noise_std=(0.5 * variance.clamp(min=1e-20).log()).exp().float(),
        alphas_cumprod=ac.float(),
        alphas_cumprod_prev=ac_prev.float(),
        log_snr=log_snr(ac),
    )


def log_snr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` distinct timesteps, descending: T - 1 (pure noise, where x_T is drawn), then
    steps - 1 integer timesteps evenly spread in log-SNR from LOG_SNR_MIN to the t = 0 end.

    The log-SNR targets are mapped to continuous timesteps (linear interpolation between the
    integers) and rounded; where rounding makes neighbours collide (at the t = 0 end, where
    log-SNR moves fastest) they are pushed apart by one. Over all T steps this is every timestep.
    """
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    lam = log_snr(alphas_cumprod[: num_timesteps - 1]).numpy()  # descending in t, finite below T - 1
    low = max(LOG_SNR_MIN, float(lam[-1]))
    targets = np.linspace(low, lam[0], steps - 1) if steps > 2 else np.array([lam[0]])
    t = np.interp(targets, lam[::-1], np.arange(num_timesteps - 2, -1, -1, dtype=np.float64))
    kept = torch.from_numpy(np.rint(t)).long()  # descending, may repeat; the last is 0
    index = torch.arange(steps - 1)
    # each at least one above the next: kept[k] >= kept[j] + (j - k) for every j > k
    kept = (kept + index).flip(0).cummax(0).values.flip(0) - index
    kept = torch.minimum(kept, num_timesteps - 2 - index)  # and below T - 1, one apart
    return torch.cat([torch.tensor([num_timesteps - 1]), kept])


def make_schedule(buffers: dict[str, torch.Tensor], steps: int, sampler: str = "ddpm") -> Schedule:
    """The schedule `sampler` runs over `steps` steps of the checkpoint's T timesteps.

    ddpm over every timestep: the exact schedule, from the checkpoint's buffers. Otherwise the
    float64 cosine schedule at the sampler's timesteps: evenly spaced for ddpm and ddim, the
    log-SNR grid for the DPM-Solver++ samplers. (DDIM divides by sqrt(1 - alphas_cumprod),
    which the fp16 buffers make 0 at t = 0.)
    """
    num_timesteps = len(buffers["posterior_mean_coef1"])
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps == num_timesteps and sampler == "ddpm":
        return exact_schedule(buffers)
    alphas_cumprod = cosine_alphas_cumprod(num_timesteps)
    if sampler in LOG_SNR_GRID:
        timesteps = log_snr_timesteps(alphas_cumprod, steps)
    else:
        timesteps = spaced_timesteps(num_timesteps, steps)
    return respaced_schedule(alphas_cumprod, timesteps)


def ddpm_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    draw_noise: NoiseSource,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Ancestral DDPM from x = x_T. One noise draw per step, after the network call, the
    last step included (its noise is drawn and not used), exactly as 0.11.5's p_sample."""
    for i, t in enumerate(schedule.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x, t_batch, i)
        mean = schedule.mean_coef_x0[i] * x0 + schedule.mean_coef_xt[i] * x
        noise = draw_noise()
        std = schedule.noise_std[i] if t > 0 else torch.zeros_like(schedule.noise_std[i])
        x = mean + std * noise
        if on_step is not None:
            on_step(i)
    return x


def ddim_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    draw_noise: NoiseSource,
    on_step: Callable[[int], None] | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM from x = x_T. eta = 0 is deterministic given x_T: no noise is drawn after x_T."""
    for i, t in enumerate(schedule.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x, t_batch, i)
        ac, ac_prev = schedule.alphas_cumprod[i].double(), schedule.alphas_cumprod_prev[i].double()
        eps = (x - ac.sqrt().float() * x0) / (1 - ac).sqrt().float()
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).clamp(min=0).sqrt()
        x = ac_prev.sqrt().float() * x0 + (1 - ac_prev - sigma**2).clamp(min=0).sqrt().float() * eps
        if eta > 0 and t > 0:
            x = x + sigma.float() * draw_noise()
        if on_step is not None:
            on_step(i)
    return x


def _alpha_sigma(lam: float) -> tuple[float, float]:
    """alpha = sqrt(sigmoid(2 lambda)), sigma = sqrt(sigmoid(-2 lambda)): alpha^2 + sigma^2 = 1."""
    return math.sqrt(1 / (1 + math.exp(-2 * lam))), math.sqrt(1 / (1 + math.exp(2 * lam)))


def dpmpp_2m_sde_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    draw_noise: NoiseSource,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M), midpoint form, from x = x_T. Step i goes from timestep s to the
    next kept timestep t (h = lambda_t - lambda_s > 0) with x_0's predictions D now and D' at
    the step before:

        x_t = sigma_t / sigma_s e^-h x_s + alpha_t (1 - e^-2h) (D + (D - D') / 2r)
              + sigma_t sqrt(1 - e^-2h) z,     r = h_before / h

    The first step has no D' (first order: exactly the DDPM posterior step); the last, at
    t = 0, returns its prediction of x_0, as DDPM does. One noise draw per step, after the
    network call, none on the last.
    """
    lambdas = schedule.log_snr.tolist()
    last = len(lambdas) - 1
    x0_before, h_before = None, 0.0
    for i, t in enumerate(schedule.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x, t_batch, i)
        if i == last:
            x = x0
        else:
            (_, sigma_s), (alpha_t, sigma_t) = _alpha_sigma(lambdas[i]), _alpha_sigma(lambdas[i + 1])
            h = lambdas[i + 1] - lambdas[i]
            gain = -math.expm1(-2 * h)  # 1 - e^-2h
            x0_step = x0 if x0_before is None else x0 + (x0 - x0_before) * (0.5 * h / h_before)
            x = (sigma_t / sigma_s * math.exp(-h)) * x + (alpha_t * gain) * x0_step
            x = x + (sigma_t * math.sqrt(gain)) * draw_noise()
            x0_before, h_before = x0, h
        if on_step is not None:
            on_step(i)
    return x


def dpmpp_2m_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    draw_noise: NoiseSource,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) from x = x_T: the probability-flow ODE, deterministic after x_T.

        x_t = sigma_t / sigma_s x_s + alpha_t (1 - e^-h) (D + (D - D') / 2r),    r = h_before / h

    Same grid, first and last steps as `dpmpp_2m_sde_sample`; no noise is drawn after x_T.
    """
    lambdas = schedule.log_snr.tolist()
    last = len(lambdas) - 1
    x0_before, h_before = None, 0.0
    for i, t in enumerate(schedule.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = denoise(x, t_batch, i)
        if i == last:
            x = x0
        else:
            (_, sigma_s), (alpha_t, sigma_t) = _alpha_sigma(lambdas[i]), _alpha_sigma(lambdas[i + 1])
            h = lambdas[i + 1] - lambdas[i]
            x0_step = x0 if x0_before is None else x0 + (x0 - x0_before) * (0.5 * h / h_before)
            x = (sigma_t / sigma_s) * x + (-alpha_t * math.expm1(-h)) * x0_step
            x0_before, h_before = x0, h
        if on_step is not None:
            on_step(i)
    return x


Sampler = Callable[..., torch.Tensor]  # (denoise, schedule, x_T, draw_noise, on_step=None) -> x_0

SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "sde-dpmpp-2m": dpmpp_2m_sde_sample,
    "dpmpp-2m": dpmpp_2m_sample,
}
LOG_SNR_GRID = ("sde-dpmpp-2m", "dpmpp-2m")  # the samplers that run on log_snr_timesteps
