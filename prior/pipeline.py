"""prompt -> CLIP image embedding: the one path every caller (CLI, cog, batch) takes.

    tokens = tokenize(prompts)                         (B, 77)
    text   = text tower(tokens)                        raw/normalised embedding, states, mask
    cond   = network.encode_condition(text), once      per guidance pass (see GUIDANCE)
    x_T    ~ N(0, I), prompt i drawing from seed + i   (B*N, D)
    x_0    = sampler(denoise, schedule, x_T)           steps of the network's last 3 tokens
    image  = x_0 / sqrt(D); keep, per prompt, the candidate closest to the text embedding
"""

from __future__ import annotations

import platform
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import contract
from .checkpoint import Weights, WeightsError, read_checkpoint
from .diffusion import SAMPLERS, make_schedule
from .graphs import GraphedDenoiser
from .model import STEP_LEN, Condition, PriorNetwork
from .packed import pack_linears
from .text import TextEncoder, Tokenizer

DTYPES = {name: getattr(torch, name) for name in contract.DTYPES}
SEED_LIMIT = contract.SEED_LIMIT
# "original": dalle2-pytorch 0.11.5 exactly. Its network does `mask &= keep_mask` on the
#   caller's mask, so the first unconditional pass zeroes the text mask for good: from the
#   second step on, the conditional pass attends to no text encodings, only to the text
#   embedding. The LAION prior's published outputs at cond_scale != 1 include this.
# "standard": classifier-free guidance as intended: every conditional pass sees the text.
GUIDANCE = contract.GUIDANCE


@dataclass
class EmbedResult:
    prompts: list[str]
    tokens: np.ndarray  # (B, 77) int64
    text_embedding: np.ndarray  # (B, D) float32, CLIP's raw encode_text output
    image_embedding: np.ndarray  # (B, D) float32, the chosen candidate, not re-normalised
    candidates: np.ndarray  # (B, N, D) float32, every sampled embedding
    scores: np.ndarray  # (B, N) float32, cosine similarity of each candidate to the text
    chosen: np.ndarray  # (B,) int64, index of the chosen candidate
    seed: int  # the call's seed; prompt i used seed + i (mod 2**32)
    truncated: list[bool]  # prompt did not fit in 77 tokens and was cut
    steps: int
    cond_scale: float
    guidance: str
    sampler: str
    sample_seconds: float = 0.0
    seeds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Request:
    """One prompt and its own sampling settings (Prior.embed_many; steps and sampler are per call)."""

    prompt: str
    candidates: int = contract.DEFAULT_CANDIDATES
    cond_scale: float = contract.DEFAULT_COND_SCALE
    seed: int | None = None  # None: drawn
    guidance: str = contract.DEFAULT_GUIDANCE

    def checked(self) -> Request:
        """This request with plain Python numbers, or ArgumentError naming the field, the bound
        and the value. Integers may be numpy integers, numbers any real number type."""
        if not isinstance(self, Request):
            raise contract.ArgumentError("requests", f"must hold prior.Request objects, got {type(self).__name__}")
        return Request(
            prompt=contract.check_prompt("prompt", self.prompt),
            candidates=contract.check_int("candidates", self.candidates, *contract.CANDIDATES),
            cond_scale=contract.check_real("cond_scale", self.cond_scale, *contract.COND_SCALE),
            seed=None if self.seed is None else contract.check_int("seed", self.seed, 0, SEED_LIMIT - 1),
            guidance=contract.check_choice("guidance", self.guidance, contract.GUIDANCE),
        )


@dataclass
class _Sampled:
    tokens: np.ndarray  # (B, 77) int64
    truncated: list[bool]
    text_embedding: np.ndarray  # (B, D) raw
    images: list[np.ndarray]  # per prompt (N_i, D)
    scores: list[np.ndarray]  # per prompt (N_i,)
    chosen: list[int]


class Prior:
    """A loaded prior. Build it with `load()`; call `embed()` as often as you like."""

    def __init__(self, weights: Weights, device: torch.device, dtype: torch.dtype, cuda_graphs: bool = True,
                 packed_weights: bool = True):
        self.device, self.dtype = device, dtype
        self.config, self.text_config = weights.prior_config, weights.text_config
        self.weights_path, self.weights_sha256 = weights.path, weights.sha256
        self.trainer_entry, self.saved_by = weights.trainer_entry, weights.saved_by  # of a trainer file
        self.layout, self.cond_drop_prob = weights.layout, weights.cond_drop_prob  # contract.LAYOUTS
        self.tokenizer = Tokenizer(self.text_config.context_length)
        # On a CPU the linear weights are converted to `dtype` as they are packed (below), one layer
        # at a time; converting the whole network first would write a second 1 GB copy.
        pack = packed_weights and device.type == "cpu"
        self.network = _build(PriorNetwork, self.config, weights.prior_state, weights.path, device,
                              None if pack else dtype)
        # The text tower runs once per call; float32 keeps the conditioning exact on every path.
        self.text = _build(TextEncoder, self.text_config, weights.text_state, weights.path, device, torch.float32)
        self.schedule_buffers = {k: v.float().to(device) for k, v in weights.schedule.items()}
        self.image_embed_scale = self.config.dim**0.5
        self.load_seconds = 0.0
        # One step: on a CPU, eager over weights prepacked for oneDNN (weight streaming dominates
        # there); on a GPU, a captured CUDA graph (launch overhead dominates there).
        self.packed = pack and pack_linears(self.network, rows=2 * STEP_LEN, dtype=dtype)
        self.network.to(dtype)  # whatever was not packed
        use_graphs = cuda_graphs and device.type == "cuda"
        self._denoise_step = GraphedDenoiser(self.network) if use_graphs else self.network.denoise

    def warmup(self, candidates: int = 2) -> None:
        """On a GPU, run tiny predictions so that kernels load and the step graphs for
        `candidates` rows with and without guidance are captured before the first request.
        On a CPU there is nothing to capture: the first request is as fast as any other."""
        if self.device.type != "cuda":
            return
        for cond_scale in (1.0, 2.0):
            self.embed("warmup", candidates=candidates, cond_scale=cond_scale, steps=2, seed=0)

    @torch.inference_mode()
    def embed(
        self,
        prompts: str | Sequence[str],
        candidates: int = contract.DEFAULT_CANDIDATES,
        cond_scale: float = contract.DEFAULT_COND_SCALE,
        steps: int | None = None,
        seed: int | None = None,
        guidance: str = contract.DEFAULT_GUIDANCE,
        sampler: str = contract.DEFAULT_SAMPLER,
        on_step: Callable[[int, int], None] | None = None,
    ) -> EmbedResult:
        """Sample `candidates` image embeddings per prompt and keep the one closest to the text.

        steps == num_timesteps (1000) with sampler "ddpm" is 0.11.5's exact sampler; fewer
        steps respace the schedule. None means contract.DEFAULT_STEPS (64), or all of a shorter
        schedule. `on_step(i, total)` is called after each step. Bad arguments raise
        contract.ArgumentError (a ValueError) naming the argument, before any work.
        """
        prompts = _prompt_list(prompts)
        if not prompts:
            raise contract.ArgumentError("prompts", "must hold at least one prompt, got none")
        seed = secrets.randbelow(SEED_LIMIT) if seed is None else contract.check_int("seed", seed, 0, SEED_LIMIT - 1)
        requests, steps = self.check(
            [Request(p, candidates, cond_scale, (seed + i) % SEED_LIMIT, guidance) for i, p in enumerate(prompts)],
            steps, sampler)
        started = time.perf_counter()
        sampled = self._sample(requests, steps, sampler, on_step)
        return EmbedResult(
            prompts=prompts,
            tokens=sampled.tokens,
            text_embedding=sampled.text_embedding,
            image_embedding=np.stack([image[c] for image, c in zip(sampled.images, sampled.chosen, strict=True)]),
            candidates=np.stack(sampled.images),
            scores=np.stack(sampled.scores),
            chosen=np.array(sampled.chosen, dtype=np.int64),
            seed=requests[0].seed,
            seeds=[r.seed for r in requests],
            truncated=sampled.truncated,
            steps=steps,
            cond_scale=requests[0].cond_scale,
            guidance=guidance,
            sampler=sampler,
            sample_seconds=time.perf_counter() - started,
        )

    @torch.inference_mode()
    def embed_many(
        self,
        requests: Sequence[Request],
        steps: int | None = None,
        sampler: str = contract.DEFAULT_SAMPLER,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[EmbedResult]:
        """Sample several prompts, each with its own candidates, cond_scale, seed and guidance, in
        shared network passes (steps and sampler are shared). Result i (one prompt) equals
        `embed(requests[i].prompt, ...)` with the same settings, up to float rounding: rows never
        mix (each row has its own condition, noise and guidance scale); only the matmuls' batch
        size, and so their summation blocking, differs. A request without a seed gets a drawn one.
        """
        requests, steps = self.check(requests, steps, sampler)
        requests = [r if r.seed is not None else replace(r, seed=secrets.randbelow(SEED_LIMIT)) for r in requests]
        started = time.perf_counter()
        sampled = self._sample(requests, steps, sampler, on_step)
        seconds = time.perf_counter() - started
        return [
            EmbedResult(
                prompts=[r.prompt],
                tokens=sampled.tokens[i : i + 1],
                text_embedding=sampled.text_embedding[i : i + 1],
                image_embedding=sampled.images[i][sampled.chosen[i]][None],
                candidates=sampled.images[i][None],
                scores=sampled.scores[i][None],
                chosen=np.array([sampled.chosen[i]], dtype=np.int64),
                seed=r.seed,
                seeds=[r.seed],
                truncated=[sampled.truncated[i]],
                steps=steps,
                cond_scale=r.cond_scale,
                guidance=r.guidance,
                sampler=sampler,
                sample_seconds=seconds,
            )
            for i, r in enumerate(requests)
        ]

    def check(self, requests: Sequence[Request], steps: int | None, sampler: str) -> tuple[list[Request], int]:
        """The requests with their numbers as Python numbers, and the step count (None:
        DEFAULT_STEPS, or all of a shorter schedule). A bad value is an ArgumentError naming the
        field, the bound and the value, raised before any work."""
        if isinstance(requests, Request) or not isinstance(requests, Sequence) or not requests:
            raise contract.ArgumentError("requests", "must be a non-empty sequence of prior.Request")
        if steps is None:
            steps = min(contract.DEFAULT_STEPS, self.config.num_timesteps)
        steps = contract.check_int("steps", steps, 1, self.config.num_timesteps)
        contract.check_choice("sampler", sampler, contract.SAMPLERS)
        requests = [Request.checked(r) for r in requests]
        for r in requests:
            if r.cond_scale != 1 and self.cond_drop_prob == 0:  # dalle2-pytorch refuses it too (can_classifier_guidance)
                raise contract.ArgumentError("cond_scale", f"must be 1 for these weights (trained with cond_drop_prob 0, "
                                                           f"without the unconditional case), got {r.cond_scale:g}")
        return requests, steps

    def _sample(self, requests: Sequence[Request], steps: int, sampler: str,
                on_step: Callable[[int, int], None] | None) -> _Sampled:
        """The one path: prompt i's rows are candidates_i consecutive rows of every pass."""
        counts = [r.candidates for r in requests]
        tokens, truncated = self.tokenizer([r.prompt for r in requests])
        tokens = tokens.to(self.device)
        text = self.text.encode(tokens)
        denoise = self._denoiser(text.states, text.embed, text.mask, counts, [r.cond_scale for r in requests],
                                 [r.guidance for r in requests])
        schedule = make_schedule(self.schedule_buffers, steps, sampler)

        generators = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]

        def draw_noise() -> torch.Tensor:  # prompt i's rows come from prompt i's generator
            return torch.cat([torch.randn((n, self.config.dim), generator=g, device=self.device)
                              for g, n in zip(generators, counts, strict=True)])

        x = draw_noise()
        step_callback = None if on_step is None else (lambda i: on_step(i, len(schedule)))
        x = SAMPLERS[sampler](denoise, schedule, x, draw_noise, on_step=step_callback)

        images, scores, chosen = [], [], []
        text_unit = F.normalize(text.embed, dim=-1)
        for i, image in enumerate((x / self.image_embed_scale).split(counts)):
            score = (text_unit[i][None, :] * F.normalize(image, dim=-1)).sum(-1)  # (N,) cosine to the text
            images.append(image.float().cpu().numpy())
            scores.append(score.float().cpu().numpy())
            chosen.append(int(score.argmax()))
        return _Sampled(tokens.cpu().numpy().astype(np.int64), truncated, text.raw.float().cpu().numpy(),
                        images, scores, chosen)

    def _denoiser(self, states, text_embed, mask, candidates: Sequence[int], cond_scales: Sequence[float],
                  guidances: Sequence[str]):
        """denoise(x_t, t, i) -> x_0 for B prompts' rows (prompt i: candidates[i] consecutive rows,
        its own cond_scale and guidance), guidance included, conditions built once. Only prompts
        whose cond_scale is not 1 get an unconditional pass (0.11.5 skips it at 1); their guidance
        mode decides what their conditional pass sees after step 0."""
        net, dtype, device = self.network, self.dtype, self.device
        states, text_embed = states.to(dtype), text_embed.to(dtype)
        counts = torch.tensor(candidates, device=device)
        # per prompt: 0.11.5 skips the unconditional pass at cond_scale 1; the later layout's versions
        # compute a keep-mask and never apply it, so under "original" their guidance is the conditional pass alone
        no_op = self.layout == contract.LAYOUT_LATER
        guided = torch.tensor([s != 1 and not (no_op and g == "original") for s, g in zip(cond_scales, guidances, strict=True)],
                              device=device)
        # "original": the first unconditional pass zeroes these prompts' text mask for good
        quirk = guided & torch.tensor([g == "original" for g in guidances], device=device)
        yes = torch.ones(len(candidates), dtype=torch.bool, device=device)

        def condition(rows: torch.Tensor, text_mask: torch.Tensor, keep: torch.Tensor) -> Condition:
            """The condition of the prompts selected by `rows`, each repeated once per candidate."""
            return net.encode_condition(states[rows], text_embed[rows], text_mask[rows], keep[rows]) \
                .repeat_interleave(counts[rows])

        def run(cond: Condition, x, t):
            return self._denoise_step(cond, x.to(dtype), t).float()

        full = condition(yes, mask, yes)
        if not guided.any():  # 0.11.5 skips the unconditional pass entirely (see `guided` for the later layout)
            return lambda x, t, i: run(full, x, t)

        null = condition(guided, mask, ~yes)
        first = Condition.cat([full, null])
        later = Condition.cat([condition(yes, mask & ~quirk[:, None], yes), null]) if quirk.any() else first
        every_row = bool(guided.all())
        rows = guided.repeat_interleave(counts)  # (R,) the x rows that are guided
        scale = torch.tensor(cond_scales, device=device).repeat_interleave(counts)[rows][:, None]

        def guided_denoise(x, t, i):
            xg, tg = (x, t) if every_row else (x[rows], t[rows])
            both = run(first if i == 0 else later, torch.cat([x, xg]), torch.cat([t, tg]))
            cond, uncond = both[: len(x)], both[len(x) :]
            if every_row:
                return uncond + (cond - uncond) * scale
            out = cond.clone()
            out[rows] = uncond + (cond[rows] - uncond) * scale
            return out

        return guided_denoise


def load(
    weights: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    expected_sha256: str | None = None,
    cuda_graphs: bool = True,
    packed_weights: bool = True,
    trainer_entry: str | None = None,
) -> Prior:
    """Load a prior_ema_fp16.pth-format file or its converted .safetensors (None: the default
    weights, contract.default_weights(); a .pth with a fresh conversion beside it loads that,
    contract.resolve_weights). Defaults: cuda if present, else cpu; float16 on cuda (the
    original ran under fp16 autocast), float32 on cpu. `cuda_graphs` replays each step as a
    captured CUDA graph; `packed_weights` runs the network's matmuls on weights prepacked for
    oneDNN on a CPU. `trainer_entry` picks the network of a dalle2-pytorch trainer file
    (contract.TRAINER_ENTRIES; default its EMA network). Raises WeightsError for a bad file,
    ArgumentError for a bad argument (before reading anything)."""
    started = time.perf_counter()
    device = _device(device)
    dtype = _dtype(dtype, device)
    expected_sha256 = contract.check_sha256("expected_sha256", expected_sha256)
    if trainer_entry is not None:
        contract.check_choice("trainer_entry", trainer_entry, contract.TRAINER_ENTRIES)
    path = contract.resolve_weights(weights, expected_sha256, trainer_entry)
    prior = Prior(read_checkpoint(path, expected_sha256, trainer_entry), device, dtype, cuda_graphs, packed_weights)
    prior.load_seconds = time.perf_counter() - started
    return prior


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise contract.ArgumentError("dtype", f"must be one of {', '.join(DTYPES)}, got {contract.shown(dtype)}")


def result_record(result: EmbedResult, model: Prior, row: int = 0) -> dict:
    """The JSON description of one prompt's result (result.json)."""
    from . import __version__

    return {
        "prompt": result.prompts[row],
        "seed": result.seeds[row],
        "steps": result.steps,
        "sampler": result.sampler,
        "cond_scale": result.cond_scale,
        "guidance": result.guidance,
        "candidates": int(result.candidates.shape[1]),
        "scores": [float(s) for s in result.scores[row]],
        "chosen": int(result.chosen[row]),
        "truncated": bool(result.truncated[row]),
        "weights": str(model.weights_path),
        "weights_sha256": model.weights_sha256,
        "weights_layout": model.layout,  # contract.LAYOUTS: the dalle2-pytorch network the file holds
        "weights_trainer_entry": model.trainer_entry,  # the network read from a trainer file, else None
        "weights_saved_by": model.saved_by,  # the dalle2-pytorch version a trainer file records, else None
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "packed_weights": bool(model.packed),  # CPU matmuls on oneDNN-prepacked weights (prior/packed.py)
        "load_seconds": round(model.load_seconds, 4),
        "sample_seconds": round(result.sample_seconds, 4),
        "versions": {
            "conditioned_prior": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _build(cls, cfg, state: dict[str, torch.Tensor], path: Path, device: torch.device, dtype: torch.dtype | None):
    """Construct on the meta device (no random init), then take the file's tensors (in `dtype`;
    None keeps the file's)."""
    with torch.device("meta"):
        module = cls(cfg)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(path, f"layout does not match {cls.__name__}: {str(e).splitlines()[-1].strip()}") from None
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _device(device: str | torch.device | None) -> torch.device:
    """cpu or cuda[:N], checked here so that a typo or a missing GPU is an ArgumentError naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in contract.DEVICES:
        raise contract.ArgumentError("device", f"must be cpu or cuda, got {contract.shown(device)}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise contract.ArgumentError("device", f"must be cpu on this machine (no CUDA device), got {contract.shown(device)}")
    return parsed


def _prompt_list(prompts) -> list:
    """One prompt or a sequence of them, as a list; anything else is an ArgumentError."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise contract.ArgumentError("prompts", f"must be a string or a sequence of strings, got {type(prompts).__name__}")
    return list(prompts)
