"""Cog predictor: the inputs and outputs a Replicate user sees, and nothing else.

All the work is `prior.load()` (once, in setup) and `Prior.embed()` (per prediction).
Bounds on the inputs live in the `Input(...)` declarations below: cog writes them into
.cog/openapi_schema.json and its server rejects bad values with 422 before predict() runs.
Keep every `Input(...)` argument a plain literal: `cog build` reads this file without
running it (a static parser) and skips expressions it cannot evaluate.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path as FilePath

from cog import BaseModel, BasePredictor, Input, Path

import prior
from prior import contract


class PriorOutput(BaseModel):
    text_tokens: Path  # .npy, int64 (1, 77): the prompt's CLIP tokens, as clip.tokenize(truncate=True)
    text_embedding: Path  # .npy, float32 (1, D): CLIP's raw encode_text output, not normalised
    image_embedding: Path  # .npy, float32 (1, D): the chosen candidate, not re-normalised
    candidates: Path  # .npy, float32 (N, D): every sampled image embedding
    scores: list[float]  # cosine similarity of each candidate to the text embedding
    chosen: int  # index of the candidate returned as image_embedding
    seed: int  # the seed used: pass it back to get the same result


def weights_path() -> FilePath:
    """The file setup() loads: $PRIOR_WEIGHTS or the default weights, by the rule every edge
    shares (contract.resolve_weights: a fresh converted .safetensors beside a .pth is preferred)."""
    return contract.resolve_weights()


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the weights once: cuda when present (float16), else cpu (float32).

        A missing or bad file raises prior.WeightsError, whose one-line message names the
        file and the problem; cog then reports SETUP_FAILED with that line in the logs.
        """
        path = weights_path()
        self.model = prior.load(path)
        self.output_root = FilePath(tempfile.mkdtemp(prefix="prior-outputs-"))
        atexit.register(shutil.rmtree, self.output_root, ignore_errors=True)  # the last outputs, at shutdown
        self.recent_outputs: list[FilePath] = []
        self.model.warmup()  # load kernels (and on a GPU capture the step graphs) before the first request
        print(f"loaded {path} on {self.model.device} ({str(self.model.dtype).removeprefix('torch.')}) "
              f"in {self.model.load_seconds:.1f} s")

    def predict(
        self,
        prompt: str = Input(
            description="The text to turn into a CLIP ViT-L/14 image embedding.",
            # "holds a character that is not whitespace", spelled out as Python's str.isspace() (the
            # engine's rule): cog's HTTP validator reads \s differently from Python. Anchored at both
            # ends, so search, match and fullmatch agree, and a search stays linear.
            regex=r"^[\s\S]*[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][\s\S]*$",
        ),
        candidates: int = Input(
            default=2, ge=1, le=32,
            description="How many image embeddings to sample; the one closest to the text is returned.",
        ),
        cond_scale: float = Input(
            default=1.0, ge=0.0, le=5.0,
            description="Classifier-free guidance scale. 1 disables guidance; higher follows the text more closely.",
        ),
        steps: int = Input(
            default=64, ge=1, le=1000,
            description="Denoising steps. 64 is fast; 1000 with sampler 'ddpm' is the original model's exact sampler.",
        ),
        seed: int | None = Input(
            default=None, ge=0, le=4294967295,
            description="Random seed. Leave blank for a random one; the seed used is returned.",
        ),
        guidance: str = Input(
            default="original", choices=["original", "standard"],
            description="'original' reproduces the released model exactly; 'standard' is textbook guidance.",
        ),
        sampler: str = Input(
            default="sde-dpmpp-2m", choices=["ddpm", "ddim", "sde-dpmpp-2m", "dpmpp-2m"],
            description="'sde-dpmpp-2m' keeps the original's distribution in few steps; 'ddpm' at 1000 steps is "
                        "the original exactly (fewer steps shrink the spread); 'ddim' and 'dpmpp-2m' are deterministic.",
        ),
    ) -> PriorOutput:
        # cog reads a prediction's files after predict() returns, so they cannot be removed here;
        # the one before last is certainly done with, and goes now (else /tmp fills up over time).
        while len(self.recent_outputs) > 1:
            shutil.rmtree(self.recent_outputs.pop(0), ignore_errors=True)
        # cog's validator lets whole-number floats (4.0, 1e2) through for integer inputs, as floats
        candidates, steps, seed = int(candidates), int(steps), None if seed is None else int(seed)
        result = self.model.embed(prompt, candidates=candidates, cond_scale=cond_scale, steps=steps, seed=seed,
                                  guidance=guidance, sampler=sampler)
        folder = write_arrays(result, self.output_root)
        self.recent_outputs.append(folder)
        return PriorOutput(
            text_tokens=Path(folder / "text_tokens.npy"),
            text_embedding=Path(folder / "text_embedding.npy"),
            image_embedding=Path(folder / "image_embedding.npy"),
            candidates=Path(folder / "candidates.npy"),
            scores=[float(s) for s in result.scores[0]],
            chosen=int(result.chosen[0]),
            seed=int(result.seed),
        )


def write_arrays(result: prior.EmbedResult, parent: FilePath | None = None) -> FilePath:
    """Save one prompt's arrays as .npy files in a new folder of their own under `parent`, all or
    nothing (contract.write_result). A fresh folder per prediction: nothing is shared between
    predictions or cached by prompt."""
    folder = FilePath(tempfile.mkdtemp(prefix="prediction-", dir=parent))
    contract.write_result(folder, result)
    return folder
