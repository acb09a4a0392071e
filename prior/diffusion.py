"""Noise schedules and samplers, apart from the network.

A sampler is a plain function over a denoiser `denoise(x_t, t, i) -> x_0` (t: (B,) timesteps,
i: the index of the step, 0 first) and a `Schedule`: the timesteps to visit, high to low,
with the per-step coefficients. Nothing here knows what the denoiser is.

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

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
NoiseSource = Callable[[], torch.Tensor]

SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class Schedule:
    """Per-step values, step 0 first (the highest timestep). All 1-D float32 except timesteps."""

    timesteps: torch.Tensor  # (S,) int64, descending
    mean_coef_x0: torch.Tensor  # posterior mean = coef_x0 * x_0 + coef_xt * x_t
    mean_coef_xt: torch.Tensor
    noise_std: torch.Tensor  # exp(0.5 * clipped posterior log-variance); not applied at t = 0
    alphas_cumprod: torch.Tensor  # at each kept timestep (for DDIM)
    alphas_cumprod_prev: torch.Tensor  # at the next kept timestep below (1 after the last)

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
    )


def make_schedule(buffers: dict[str, torch.Tensor], steps: int, sampler: str = "ddpm") -> Schedule:
    """DDPM over every timestep: the exact schedule. Otherwise the cosine schedule respaced.

    DDIM always uses the float64 cumulative alphas: it divides by sqrt(1 - alphas_cumprod),
    which the fp16 buffers make 0 at t = 0.
    """
    num_timesteps = len(buffers["posterior_mean_coef1"])
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps == num_timesteps and sampler == "ddpm":
        return exact_schedule(buffers)
    return respaced_schedule(cosine_alphas_cumprod(num_timesteps), spaced_timesteps(num_timesteps, steps))


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
    eta: float = 0.0,
    on_step: Callable[[int], None] | None = None,
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
