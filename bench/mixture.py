"""The samplers against a distribution whose exact denoiser is known: a Gaussian mixture.

Data: a mixture of K Gaussians in d dimensions, each with a low-rank-plus-isotropic covariance
(mu_k + U_k diag(s_k) U_k^T + tau^2 I), scaled like the prior's x_0 (|x_0|^2 ~ d). Noised with
the project's cosine schedule, x_t = alpha_t x_0 + sigma_t eps, each component stays Gaussian,
so E[x_0 | x_t] has a closed form (checked here against Tweedie's formula,
E[x_0 | x_t] = (x_t + sigma_t^2 grad log p_t(x_t)) / alpha_t, by autograd). Everything is float64.

The samplers of prior/diffusion.py run unchanged on it, through `SAMPLERS` and
`make_schedule`, with this exact denoiser in place of the network, and with a perturbed one,
x_0_hat = exact + 0.3 sigma_t f(x_t) for a fixed smooth random field f, standing in for a trained
network's error. Each set of samples is compared with the 1000-step DDPM (the original sampler)
run with the same denoiser, on every metric:

- sliced Wasserstein-2 distance in the signal subspace (the span of the means and the U_k);
- the covariance trace and the isotropic variance (outside the signal subspace), as ratios
  to the truth; the mean norm |x|;
- component frequencies (each sample to its most likely component; total variation);
- mean log-likelihood per dimension under the true mixture.

The noise floor of a metric is the largest difference between two independent sets of exact
draws of the same size (10 sets, 45 pairs). A sampler at a step count "matches" the 1000-step
DDPM when every metric differs from it by no more than the floor, with and without the
perturbation. The deterministic solvers also get their convergence order: per sample, the
slope of log |x_S - x_ref| against log S, x_ref the same solver over every timestep below its
first step.

    python -m bench.mixture                  # the recorded run (JSON, table, PNG in bench/results/)
    python -m bench.mixture --quick          # a smoke run (bench/cache/)
    python -m bench.mixture real --weights PATH [--sampler S --steps K] [--prompts 20 --samples 512]

`real` is the companion for the trained prior on a GPU: per prompt, a set of samples from the
sampler against one from the 1000-step DDPM, and a second 1000-step DDPM set for the noise
floor; two-sample metrics only (no exact denoiser exists there).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import CACHE, RESULTS, machine_info, machine_slug, print_table, write_json
from prior import contract
from prior.diffusion import SAMPLERS, cosine_alphas_cumprod, make_schedule, respaced_schedule

NUM_TIMESTEPS = 1000
PERTURBATION = 0.3  # x_0_hat = exact + PERTURBATION * sigma_t * f(x_t)
FLOOR_SETS = 10
FIELD_FEATURES = 64  # of the perturbation's random field
METRICS = ("sliced_w2", "cov_trace_ratio", "iso_var_ratio", "mean_norm", "component_tv", "loglik_per_dim")
DETERMINISTIC = ("ddim", "dpmpp-2m")


# -- the mixture and its exact denoiser --------------------------------------------------------


@dataclass
class Mixture:
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, d)
    bases: torch.Tensor  # (K, d, r), orthonormal columns
    spectra: torch.Tensor  # (K, r) variance along each column, above the isotropic part
    iso: float  # tau^2, the isotropic variance of every component

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def signal_basis(self) -> torch.Tensor:
        """(d, m) orthonormal basis of the span of the means and the low-rank directions."""
        spans = torch.cat([self.means.T, *self.bases], dim=1)
        q, r = torch.linalg.qr(spans)
        return q[:, r.diagonal().abs() > 1e-9 * r.diagonal().abs().max()]

    def covariance_trace(self) -> float:
        mean = self.weights @ self.means
        second = (self.weights * (self.dim * self.iso + self.spectra.sum(1) + (self.means**2).sum(1))).sum()
        return float(second - mean @ mean)


def make_mixture(dim: int = 768, components: int = 8, rank: int = 16, seed: int = 0) -> Mixture:
    """|x_0|^2 ~ d: means carry ~35% of it, the low-rank parts ~40%, the isotropic part 25%."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    weights = torch.softmax(0.5 * torch.randn(components, generator=g, dtype=f64), 0)
    means = torch.randn(components, dim, generator=g, dtype=f64)
    means *= math.sqrt(0.35) / means.norm(dim=1, keepdim=True) * math.sqrt(dim)
    bases = torch.linalg.qr(torch.randn(components, dim, rank, generator=g, dtype=f64))[0]
    decay = 0.8 ** torch.arange(rank, dtype=f64)
    spectra = (0.40 * dim * decay / decay.sum()).expand(components, rank).clone()
    spectra *= torch.exp(0.3 * torch.randn(components, rank, generator=g, dtype=f64))
    return Mixture(weights, means, bases, spectra, iso=0.25)


def draw(mixture: Mixture, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n exact samples (n, d) and their components (n,)."""
    k = torch.multinomial(mixture.weights, n, replacement=True, generator=generator)
    low = torch.randn(n, mixture.spectra.shape[1], generator=generator, dtype=torch.float64) * mixture.spectra[k].sqrt()
    x = mixture.means[k] + torch.einsum("ndr,nr->nd", mixture.bases[k], low)
    return x + math.sqrt(mixture.iso) * torch.randn(n, mixture.dim, generator=generator, dtype=torch.float64), k


def _components(mixture: Mixture, x_t: torch.Tensor, alpha: float, sigma: float):
    """log N(x_t; alpha mu_k, alpha^2 Sigma_k + sigma^2 I) for every component (n, K), and what
    the posterior mean needs: x_t's coordinates along the low-rank directions, centred (n, K, r),
    the covariance's eigenvalues there (K, r), and its eigenvalue everywhere else (a float).
    The d-dimensional work is two matrix products with all components' directions at once."""
    (K, d, r), n = mixture.bases.shape, len(x_t)
    c = alpha**2 * mixture.iso + sigma**2
    eig = alpha**2 * (mixture.spectra + mixture.iso) + sigma**2
    means_along = torch.einsum("kd,kdr->kr", mixture.means, mixture.bases)
    proj = (x_t @ mixture.bases.permute(1, 0, 2).reshape(d, K * r)).view(n, K, r) - alpha * means_along
    # |x_t - alpha mu_k|^2 / c, corrected along U_k: the Mahalanobis distance, by Woodbury
    square = (x_t**2).sum(1, keepdim=True) - 2 * alpha * x_t @ mixture.means.T + alpha**2 * (mixture.means**2).sum(1)
    maha = square / c + (proj**2 * (1 / eig - 1 / c)).sum(2)
    log_det = (d - r) * math.log(c) + eig.log().sum(1)
    return -0.5 * (maha + log_det + d * math.log(2 * math.pi)), proj, eig, c


def log_prob(mixture: Mixture, x: torch.Tensor, alpha: float = 1.0, sigma: float = 0.0) -> torch.Tensor:
    """log p_t(x) (n,) of the noised mixture; alpha = 1, sigma = 0 is the data itself."""
    log_n = _components(mixture, x, alpha, sigma)[0]
    return torch.logsumexp(log_n + mixture.weights.log(), 1)


def posterior_mean(mixture: Mixture, x_t: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """E[x_0 | x_t] = sum_k p(k | x_t) (mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k))."""
    (K, d, r), n = mixture.bases.shape, len(x_t)
    log_n, proj, eig, c = _components(mixture, x_t, alpha, sigma)
    resp = torch.softmax(log_n + mixture.weights.log(), 1)  # (n, K)
    iso_gain = mixture.iso / c  # Sigma_k (...)^-1 off the low-rank directions
    low_gain = (mixture.spectra + mixture.iso) / eig - iso_gain  # and the extra along them
    along = (resp[:, :, None] * proj * low_gain).view(n, K * r)
    return (alpha * iso_gain * x_t + (resp * (1 - alpha**2 * iso_gain)) @ mixture.means
            + alpha * along @ mixture.bases.permute(1, 0, 2).reshape(d, K * r).T)


def tweedie_error(mixture: Mixture, n: int = 64, seed: int = 1) -> float:
    """Largest relative difference between the closed form and Tweedie's formula over t."""
    g = torch.Generator().manual_seed(seed)
    ac = cosine_alphas_cumprod(NUM_TIMESTEPS)
    worst = 0.0
    for t in (0, 50, 300, 600, 900, 990):
        alpha, sigma = math.sqrt(ac[t]), math.sqrt(1 - ac[t])
        x0, _ = draw(mixture, n, g)
        x_t = (alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).requires_grad_()
        (score,) = torch.autograd.grad(log_prob(mixture, x_t, alpha, sigma).sum(), x_t)
        tweedie = ((x_t + sigma**2 * score) / alpha).detach()
        closed = posterior_mean(mixture, x_t.detach(), alpha, sigma)
        worst = max(worst, float((closed - tweedie).norm() / tweedie.norm()))
    return worst


class Denoiser:
    """denoise(x_t, t, i) -> x_0 for the samplers: exact, or exact + scale sigma_t f(x_t)."""

    def __init__(self, mixture: Mixture, perturbation: float = 0.0, seed: int = 7):
        self.mixture, self.perturbation = mixture, perturbation
        self.ac = cosine_alphas_cumprod(NUM_TIMESTEPS)
        g = torch.Generator().manual_seed(seed)
        d, m, f64 = mixture.dim, FIELD_FEATURES, torch.float64
        # a smooth random field of unit RMS per coordinate: m random Fourier features of x
        # (|x|^2 ~ d, so w . x is O(1)), mixed into d outputs
        self.w = torch.randn(d, m, generator=g, dtype=f64) / math.sqrt(d)
        self.b = 2 * math.pi * torch.rand(m, generator=g, dtype=f64)
        self.mix = torch.randn(m, d, generator=g, dtype=f64) / math.sqrt(m)

    def field(self, x_t: torch.Tensor) -> torch.Tensor:
        return (math.sqrt(2) * torch.sin(x_t @ self.w + self.b)) @ self.mix

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        step = int(t[0])
        assert bool((t == step).all()), "one timestep per call"
        alpha, sigma = math.sqrt(self.ac[step]), math.sqrt(1 - self.ac[step])
        x0 = posterior_mean(self.mixture, x_t, alpha, sigma)
        if self.perturbation:
            x0 = x0 + self.perturbation * sigma * self.field(x_t)
        return x0

    def excess_error(self, n: int = 500, seed: int = 3) -> dict[int, float]:
        """E|x_0_hat - x_0|^2 / E|E[x_0|x_t] - x_0|^2 - 1 at a few timesteps."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in (10, 100, 300, 500, 700, 900, 990):
            x0, _ = draw(self.mixture, n, g)
            alpha, sigma = math.sqrt(self.ac[t]), math.sqrt(1 - self.ac[t])
            x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            tt = torch.full((n,), t)
            exact = posterior_mean(self.mixture, x_t, alpha, sigma)
            out[t] = float(((self(x_t, tt, 0) - x0) ** 2).sum() / ((exact - x0) ** 2).sum() - 1)
        return out


def schedule_buffers(num_timesteps: int = NUM_TIMESTEPS) -> dict[str, torch.Tensor]:
    """The schedule buffers of a dalle2-pytorch checkpoint, from the float64 cosine formula."""
    ac = cosine_alphas_cumprod(num_timesteps)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    betas = 1 - ac / ac_prev
    variance = betas * (1 - ac_prev) / (1 - ac)
    return {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)}


def run_sampler(denoise, sampler: str, steps: int, n: int, dim: int, seed: int,
                x_t: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """n samples from `sampler` over `steps` steps, x_T and every noise draw from `seed`
    (given `timesteps`, over those instead of the sampler's own grid)."""
    g = torch.Generator().manual_seed(seed)

    def draw_noise() -> torch.Tensor:
        return torch.randn(n, dim, generator=g, dtype=torch.float64)

    if timesteps is None:
        schedule = make_schedule(schedule_buffers(), steps, sampler)
    else:
        schedule = respaced_schedule(cosine_alphas_cumprod(NUM_TIMESTEPS), timesteps)
    x = draw_noise() if x_t is None else x_t.clone()
    return SAMPLERS[sampler](denoise, schedule, x, draw_noise)


# -- metrics ------------------------------------------------------------------------------------


class Metrics:
    """The metrics of a set of samples, and the distance between two sets, for one mixture."""

    def __init__(self, mixture: Mixture, directions: int = 256, levels: int = 200, seed: int = 5):
        self.mixture = mixture
        self.basis = mixture.signal_basis()
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn(self.basis.shape[1], directions, generator=g, dtype=torch.float64)
        self.directions = self.basis @ (theta / theta.norm(dim=0))  # (d, L) unit, in the signal subspace
        self.levels = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        self.true = {"cov_trace": mixture.covariance_trace(), "iso_var": mixture.iso}

    def summary(self, x: torch.Tensor) -> dict:
        """Scalars of one set, and what the two-sample distances need."""
        centred = x - x.mean(0)
        off = centred - (centred @ self.basis) @ self.basis.T
        log_n = _components(self.mixture, x, 1.0, 0.0)[0]
        joint = log_n + self.mixture.weights.log()
        counts = torch.bincount(joint.argmax(1), minlength=len(self.mixture.weights)).double()
        return {
            "cov_trace_ratio": float((centred**2).sum() / (len(x) - 1)) / self.true["cov_trace"],
            "iso_var_ratio": float((off**2).sum() / (len(x) - 1) / (x.shape[1] - self.basis.shape[1])) / self.true["iso_var"],
            "mean_norm": float(x.norm(dim=1).mean()),
            "loglik_per_dim": float(torch.logsumexp(joint, 1).mean()) / x.shape[1],
            "frequencies": counts / counts.sum(),
            "quantiles": torch.quantile(x @ self.directions, self.levels, dim=0),  # (levels, L)
        }

    @staticmethod
    def distance(a: dict, b: dict) -> dict[str, float]:
        """Two sets' difference on every metric (absolute, so a floor bounds it)."""
        out = {"sliced_w2": float(((a["quantiles"] - b["quantiles"]) ** 2).mean().sqrt()),
               "component_tv": float(0.5 * (a["frequencies"] - b["frequencies"]).abs().sum())}
        for name in ("cov_trace_ratio", "iso_var_ratio", "mean_norm", "loglik_per_dim"):
            out[name] = abs(a[name] - b[name])
        return out

    @staticmethod
    def scalars(a: dict) -> dict[str, float]:
        return {k: v for k, v in a.items() if isinstance(v, float)}


def noise_floor(metrics: Metrics, n: int, sets: int = FLOOR_SETS, seed: int = 100) -> tuple[dict, list[dict]]:
    """Per metric, the largest distance between two of `sets` independent exact sets of n."""
    g = torch.Generator().manual_seed(seed)
    summaries = [metrics.summary(draw(metrics.mixture, n, g)[0]) for _ in range(sets)]
    pairs = [metrics.distance(a, b) for a, b in itertools.combinations(summaries, 2)]
    return {m: max(p[m] for p in pairs) for m in METRICS}, summaries


def convergence_order(denoise, sampler: str, steps: list[int], n: int, dim: int, seed: int) -> dict:
    """Per sample, the least-squares slope of -log |x_S - x_ref| against log S, from one x_T.

    x_ref: the same solver over the finest grid that refines all of them. On the log-SNR grid
    every step count shares the first step, from t = T - 1 to where the grid starts (no step
    count refines it), so x_ref takes that step and then every timestep below it; on evenly
    spaced timesteps, x_ref takes every timestep."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, dim, generator=g, dtype=torch.float64)
    grids = [make_schedule(schedule_buffers(), s, sampler).timesteps for s in steps]
    first = {int(grid[1]) for grid in grids}
    below = first.pop() if len(first) == 1 else NUM_TIMESTEPS - 2
    reference_grid = torch.cat([torch.tensor([NUM_TIMESTEPS - 1]), torch.arange(below, -1, -1)])
    assert all(set(grid.tolist()) <= set(reference_grid.tolist()) for grid in grids), "the reference refines every grid"
    reference_steps = len(reference_grid)
    reference = run_sampler(denoise, sampler, reference_steps, n, dim, seed, x_t, reference_grid)
    errors = torch.stack([(run_sampler(denoise, sampler, s, n, dim, seed, x_t) - reference).norm(dim=1) for s in steps])
    log_s = torch.tensor(steps, dtype=torch.float64).log()
    centred = log_s - log_s.mean()
    log_e = errors.log()
    slopes = -(centred[:, None] * (log_e - log_e.mean(0))).sum(0) / (centred**2).sum()
    return {"steps": steps, "reference_steps": reference_steps,
            "median_rms_error": [float(e) for e in errors.median(1).values / math.sqrt(dim)],
            "order_median": float(slopes.median()), "order_p10": float(slopes.quantile(0.1))}


# -- the benchmark ---------------------------------------------------------------------------------


def evaluate(mixture: Mixture, samplers: list[str], steps: list[int], n: int, reference_n: int,
             perturbations: list[float], log=print) -> dict:
    dim = mixture.dim
    metrics = Metrics(mixture)
    floor, exact_sets = noise_floor(metrics, n)
    truth = metrics.summary(draw(mixture, reference_n, torch.Generator().manual_seed(99))[0])
    record = {"floor": floor,
              "exact_sets": [Metrics.scalars(s) for s in exact_sets],
              "exact_sets_vs_reference": [metrics.distance(s, truth) for s in exact_sets],
              "reference": Metrics.scalars(truth), "variants": {}}
    for perturbation in perturbations:
        denoise = Denoiser(mixture, perturbation)
        variant = {"perturbation": perturbation, "runs": []}
        if perturbation:
            variant["excess_error"] = denoise.excess_error()
        started = time.perf_counter()
        original = metrics.summary(run_sampler(denoise, "ddpm", NUM_TIMESTEPS, n, dim, seed=1))
        variant["ddpm_1000"] = {"seconds": time.perf_counter() - started, **Metrics.scalars(original),
                                "vs_reference": metrics.distance(original, truth)}
        log(f"perturbation {perturbation}: ddpm 1000 in {variant['ddpm_1000']['seconds']:.0f} s")
        for seed, (sampler, count) in enumerate(itertools.product(samplers, steps), start=1000):
            started = time.perf_counter()
            summary = metrics.summary(run_sampler(denoise, sampler, count, n, dim, seed=seed))
            vs_original = metrics.distance(summary, original)
            run = {"sampler": sampler, "steps": count, "seconds": time.perf_counter() - started,
                   **Metrics.scalars(summary), "vs_reference": metrics.distance(summary, truth),
                   "vs_ddpm_1000": vs_original,
                   "over_floor": {m: vs_original[m] / floor[m] for m in METRICS},
                   "matches_ddpm_1000": all(vs_original[m] <= floor[m] for m in METRICS)}
            variant["runs"].append(run)
            log(f"  {sampler:>13} {count:>4}: distance to DDPM-1000 / floor: "
                + ", ".join(f"{m} {v:.2f}" for m, v in run["over_floor"].items()))
        record["variants"][str(perturbation)] = variant
    return record


def choose_default(record: dict) -> dict:
    """The rule for the default: the fewest steps at which a sampler matches the 1000-step DDPM
    (every metric within the floor) with and without the perturbation, at that step count and
    every larger one measured; ties go to the sampler listed first. When none matches, the
    answer says so, with the run whose worst metric is nearest the floor (worst over both
    denoisers), for the choice to be made knowingly."""
    variants = list(record["variants"].values())
    keys = [(r["sampler"], r["steps"]) for r in variants[0]["runs"]]
    worst = {key: max(max(r["over_floor"].values()) for v in variants for r in v["runs"]
                      if (r["sampler"], r["steps"]) == key) for key in keys}
    matching = [(sampler, steps) for sampler, steps in keys
                if all(w <= 1 for (s, k), w in worst.items() if s == sampler and k >= steps)]
    nearest = min(keys, key=worst.get)
    out = {"nearest": {"sampler": nearest[0], "steps": nearest[1], "worst_over_floor": worst[nearest]},
           "worst_over_floor": {f"{s} {k}": w for (s, k), w in worst.items()}}
    if matching:
        sampler, steps = min(matching, key=lambda key: (key[1], keys.index(key)))
        out["matching"] = {"sampler": sampler, "steps": steps}
    else:
        out["matching"] = None
    return out


def table(record: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["perturbed", "sampler", "steps", "cov trace/true", "iso var/true", "mean norm", "SW2 vs DDPM-1000",
               "worst metric / floor", "matches"]
    rows = []
    for variant in record["variants"].values():
        p = variant["perturbation"]
        o = variant["ddpm_1000"]
        rows.append([f"{p:g}", "ddpm (exact)", "1000", f"{o['cov_trace_ratio']:.3f}", f"{o['iso_var_ratio']:.3f}",
                     f"{o['mean_norm']:.2f}", "-", "-", "-"])
        for r in variant["runs"]:
            worst = max(r["over_floor"], key=r["over_floor"].get)
            rows.append([f"{p:g}", r["sampler"], str(r["steps"]), f"{r['cov_trace_ratio']:.3f}",
                         f"{r['iso_var_ratio']:.3f}", f"{r['mean_norm']:.2f}", f"{r['vs_ddpm_1000']['sliced_w2']:.4f}",
                         f"{r['over_floor'][worst]:.2f} ({worst})", "yes" if r["matches_ddpm_1000"] else "no"])
    return headers, rows


def plot(record: dict, path: Path) -> None:
    """Per denoiser, two rows against steps, one line per sampler: each metric's distance to the
    1000-step DDPM over its noise floor (the grey band: within it); and the scalar metrics
    themselves, with the exact sets' range (grey) and the 1000-step DDPM +- half the floor (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(record["variants"].values())
    scalars = ("cov_trace_ratio", "iso_var_ratio", "mean_norm", "loglik_per_dim")
    columns = len(METRICS)
    fig, axes = plt.subplots(2 * len(variants), columns, figsize=(3.3 * columns, 2.9 * 2 * len(variants)), squeeze=False)
    for v, variant in enumerate(variants):
        samplers = sorted({r["sampler"] for r in variant["runs"]}, key=lambda s: list(SAMPLERS).index(s))
        runs = {s: [r for r in variant["runs"] if r["sampler"] == s] for s in samplers}
        steps = sorted({r["steps"] for r in variant["runs"]})
        name = f"perturbation {variant['perturbation']:g}"
        for ax, metric in zip(axes[2 * v], METRICS, strict=True):
            for s in samplers:
                ax.plot([r["steps"] for r in runs[s]], [r["over_floor"][metric] for r in runs[s]], marker="o", label=s)
            ax.axhspan(1e-3, 1, color="grey", alpha=0.3, label="within the noise floor")
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(1e-2, 0.5 * min(r["over_floor"][metric] for r in variant["runs"])))
            ax.set_title(f"{metric}: distance to DDPM-1000 / floor\n{name}", fontsize=8)
        for ax, metric in zip(axes[2 * v + 1], scalars, strict=False):
            values = [s[metric] for s in record["exact_sets"]]
            ax.axhspan(min(values), max(values), color="grey", alpha=0.3, label="exact sets")
            o, half = variant["ddpm_1000"][metric], record["floor"][metric] / 2
            ax.axhspan(o - half, o + half, color="tab:red", alpha=0.2, label="DDPM-1000 +- floor/2")
            for s in samplers:
                ax.plot([r["steps"] for r in runs[s]], [r[metric] for r in runs[s]], marker="o", label=s)
            ax.set_title(f"{metric}\n{name}", fontsize=8)
        for ax in axes[2 * v + 1][len(scalars):]:
            ax.axis("off")
        for ax in [*axes[2 * v], *axes[2 * v + 1][: len(scalars)]]:
            ax.set_xscale("log")
            ax.set_xticks(steps, [str(k) for k in steps], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("steps", fontsize=8)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def mixture_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    info = machine_info()
    started = time.perf_counter()
    mixture = make_mixture(args.dim, args.components, args.rank, seed=args.seed)
    tweedie = tweedie_error(mixture)
    print(f"mixture: d {args.dim}, {args.components} components of rank {args.rank}; closed-form posterior mean "
          f"vs Tweedie's formula: {tweedie:.1e} relative", flush=True)
    if tweedie > 1e-8:
        raise SystemExit("the closed-form posterior mean disagrees with Tweedie's formula")
    record = {"benchmark": "mixture", "machine": info, "settings": vars(args) | {"out_dir": str(args.out_dir)},
              "tweedie_relative_error": tweedie, "true_mean_norm_of_reference": None}
    record |= evaluate(mixture, args.samplers, args.steps, args.samples, args.reference_samples, args.perturbations,
                       log=lambda text: print(text, flush=True))
    record["true_mean_norm_of_reference"] = record["reference"]["mean_norm"]
    record["convergence"] = {}
    for sampler in (s for s in args.samplers if s in DETERMINISTIC):
        record["convergence"][sampler] = convergence_order(Denoiser(mixture), sampler, args.order_steps,
                                                           args.order_samples, args.dim, seed=7)
        print(f"convergence order of {sampler}: median {record['convergence'][sampler]['order_median']:.2f}", flush=True)
    record["default"] = choose_default(record)
    record["seconds"] = time.perf_counter() - started

    headers, rows = table(record)
    print_table(headers, rows)
    print(f"noise floor ({FLOOR_SETS} exact sets of {args.samples}): "
          + ", ".join(f"{m} {v:.4g}" for m, v in record["floor"].items()))
    print(f"fewest steps matching the 1000-step DDPM with and without the perturbation: {record['default']['matching']}; "
          f"nearest to it: {record['default']['nearest']}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    stem = args.out_dir / f"mixture{label}-{machine_slug(info)}-{info['date_utc'][:10]}"
    print(f"wrote {write_json(stem.with_suffix('.json'), record)}")
    plot(record, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.png')} ({record['seconds']:.0f} s in all)")
    return 0


# -- the companion on the trained prior --------------------------------------------------------------

REAL_PROMPTS = (
    "a photograph of a red cube on a wooden table", "an oil painting of a lighthouse at dusk, waves crashing",
    "a corgi wearing sunglasses on a beach", "a bowl of ramen, studio lighting", "an astronaut riding a horse",
    "a watercolor of a fox in a snowy forest", "a close-up of a hummingbird drinking from a flower",
    "a futuristic city skyline at night, neon lights", "a pencil sketch of an old man reading", "a plate of sushi",
    "a red vintage car parked on a cobblestone street", "a cat sleeping on a stack of books",
    "a mountain lake at sunrise, mist over the water", "a cup of coffee with latte art", "a robot playing chess",
    "a medieval castle on a hill under storm clouds", "a field of sunflowers under a blue sky",
    "a portrait of a woman in renaissance style", "a bicycle leaning against a brick wall", "a tropical fish in a coral reef",
)


def two_sample(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor, levels: torch.Tensor) -> dict[str, float]:
    """Distances between two sets of embeddings (n, D) with no exact denoiser to lean on."""
    qa, qb = (torch.quantile(x @ directions, levels, dim=0) for x in (a, b))
    ca, cb = a - a.mean(0), b - b.mean(0)
    return {"sliced_w2": float(((qa - qb) ** 2).mean().sqrt()),
            "cov_trace_ratio": float((ca**2).sum() / (cb**2).sum()),
            "mean_norm_ratio": float(a.norm(dim=1).mean() / b.norm(dim=1).mean()),
            "mean_distance": float((a.mean(0) - b.mean(0)).norm())}


def real_main(args: argparse.Namespace) -> int:
    """Per prompt: --samples embeddings from --sampler at --steps, and two sets from the 1000-step
    DDPM (the original), each set against the first DDPM set; the second DDPM set is the floor."""
    import prior

    info = machine_info()
    model = prior.load(args.weights, device=args.device, dtype=args.dtype)
    total = model.config.num_timesteps
    per_call = min(contract.CANDIDATES[1], args.samples)
    if args.samples % per_call:
        raise SystemExit(f"--samples: must be a multiple of {per_call}, got {args.samples}")

    def sample(prompt: str, sampler: str, steps: int, seed: int) -> torch.Tensor:
        result = model.embed([prompt] * (args.samples // per_call), candidates=per_call, cond_scale=args.cond_scale,
                             steps=steps, seed=seed, sampler=sampler)
        return torch.from_numpy(result.candidates).double().reshape(args.samples, -1)

    g = torch.Generator().manual_seed(0)
    dim = model.config.dim
    theta = torch.randn(dim, 256, generator=g, dtype=torch.float64)
    directions, levels = theta / theta.norm(dim=0), (torch.arange(100, dtype=torch.float64) + 0.5) / 100
    rows, per_prompt = [], []
    started = time.perf_counter()
    for p, prompt in enumerate(REAL_PROMPTS[: args.prompts]):
        seed = 1_000_000 * p
        original = sample(prompt, "ddpm", total, seed)
        floor = two_sample(sample(prompt, "ddpm", total, seed + 10_000), original, directions, levels)
        tried = two_sample(sample(prompt, args.sampler, args.steps, seed + 20_000), original, directions, levels)
        per_prompt.append({"prompt": prompt, "floor": floor, args.sampler: tried})
        rows.append([prompt[:40], f"{tried['sliced_w2']:.4f}", f"{floor['sliced_w2']:.4f}", f"{tried['cov_trace_ratio']:.3f}",
                     f"{floor['cov_trace_ratio']:.3f}", f"{tried['mean_norm_ratio']:.4f}", f"{floor['mean_norm_ratio']:.4f}"])
        print(f"{p + 1}/{args.prompts} prompts, {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"{args.sampler} {args.steps} steps (a) and a second 1000-step DDPM set (floor, f), each against the "
          f"1000-step DDPM, {args.samples} samples per prompt, cond_scale {args.cond_scale}")
    print_table(["prompt", "SW2 a", "SW2 f", "cov trace a", "cov trace f", "mean norm a", "mean norm f"], rows)
    within = {m: sum(abs(r[args.sampler][m] - (1 if "ratio" in m else 0)) <= abs(r["floor"][m] - (1 if "ratio" in m else 0))
                     for r in per_prompt) for m in per_prompt[0]["floor"]}
    print("prompts where the sampler is no further from DDPM-1000 than the second DDPM-1000 set: "
          + ", ".join(f"{m} {k}/{len(per_prompt)}" for m, k in within.items()))
    record = {"benchmark": "mixture-real", "machine": info, "weights": str(args.weights), "sampler": args.sampler,
              "steps": args.steps, "samples": args.samples, "cond_scale": args.cond_scale, "dtype": str(model.dtype),
              "per_prompt": per_prompt, "within_floor": within, "seconds": time.perf_counter() - started}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"mixture-real-{machine_slug(info)}-{info['date_utc'][:10]}.json"
    print(f"wrote {write_json(path, record)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["real"]:
        parser = argparse.ArgumentParser(prog="python -m bench.mixture real", description=real_main.__doc__)
        parser.add_argument("--weights", type=Path, required=True)
        parser.add_argument("--sampler", choices=list(SAMPLERS), default=contract.DEFAULT_SAMPLER)
        parser.add_argument("--steps", type=int, default=contract.DEFAULT_STEPS)
        parser.add_argument("--prompts", type=int, default=20, choices=range(1, len(REAL_PROMPTS) + 1), metavar="1..20")
        parser.add_argument("--samples", type=int, default=512)
        parser.add_argument("--cond-scale", type=float, default=1.0)
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        parser.add_argument("--dtype", default=None)
        parser.add_argument("--out-dir", type=Path, default=RESULTS)
        return real_main(parser.parse_args(argv[1:]))

    parser = argparse.ArgumentParser(prog="python -m bench.mixture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: d 64, 500 samples, to bench/cache/")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--reference-samples", type=int, default=5000)
    parser.add_argument("--samplers", nargs="+", choices=list(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 25, 32, 48, 64])
    parser.add_argument("--perturbations", type=float, nargs="+", default=[0.0, PERTURBATION])
    parser.add_argument("--order-steps", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96])
    parser.add_argument("--order-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="added to the file names (a second sweep beside the first)")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.samples, args.reference_samples, args.order_samples = 64, 500, 2000, 100
        args.rank, args.components = 4, 4
        if args.out_dir == RESULTS:
            args.out_dir = CACHE
    return mixture_main(args)


if __name__ == "__main__":
    sys.exit(main())
