"""Cog predictor: the inputs and outputs a Replicate user sees, and nothing else.

All the work is `prior.load()` (once, in setup) and `Prior.embed_many()`: predict() is async,
and concurrent predictions are sampled together by a prior.batcher.Batcher (cog.yaml's
`concurrency.max` says how many may run at once).
Bounds on the inputs live in the `Input(...)` declarations below: cog writes them into
.cog/openapi_schema.json and its server rejects bad values with 422 before predict() runs.
Keep every `Input(...)` argument a plain literal: `cog build` reads this file without
running it (a static parser) and skips expressions it cannot evaluate.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections import deque
from pathlib import Path as FilePath

from cog import BaseModel, BasePredictor, Input, Path

import prior
from prior import contract
from prior.batcher import Batcher


class PriorOutput(BaseModel):
    text_tokens: Path  # .npy, int64 (1, 77): the prompt's CLIP tokens, as clip.tokenize(truncate=True)
    text_embedding: Path  # .npy, float32 (1, D): CLIP's raw encode_text output, not normalised
    image_embedding: Path  # .npy, float32 (1, D): the chosen candidate, not re-normalised
    candidates: Path  # .npy, float32 (N, D): every sampled image embedding
    scores: list[float]  # cosine similarity of each candidate to the text embedding
    chosen: int  # index of the candidate returned as image_embedding
    seed: int  # the seed used: pass it back to get the same result
    weights_layout: str  # the layout of the weights file read (contract.LAYOUTS)


def weights_path() -> FilePath:
    """The file setup() loads: $PRIOR_WEIGHTS or the default weights, by the rule every edge
    shares (contract.resolve_weights: a fresh converted .safetensors beside a .pth is preferred)."""
    return contract.resolve_weights()


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load the weights once: cuda when present (float16), else cpu (float32), and start the
        batcher that runs concurrent predictions together.

        A missing or bad file raises prior.WeightsError, whose one-line message names the file
        (by its name, not the host's path) and the problem; cog then reports SETUP_FAILED with
        that line in the logs.
        """
        path = weights_path()

        def load() -> prior.Prior:  # on the batcher's thread, which samples (see prior/batcher.py)
            model = prior.load(path)
            model.warmup()  # load kernels (and on a GPU capture the step graphs) before the first request
            return model

        try:
            self.batcher = Batcher(load)
        except prior.WeightsError as e:  # the health check shows this line: no host paths in it
            raise prior.WeightsError(FilePath(e.path).name, e.problem) from None
        self.model = self.batcher.model
        self.outputs = OutputFolders()
        print(f"loaded {path.name} on {self.model.device} ({str(self.model.dtype).removeprefix('torch.')}) "
              f"in {self.model.load_seconds:.1f} s")

    async def predict(
        self,
        prompt: str = Input(
            description="The text to turn into a CLIP ViT-L/14 image embedding (at most 10000 characters; "
                        "CLIP reads the first 77 tokens).",
            max_length=10000,
            # contract.PROMPT_PATTERN: a character that is neither whitespace nor invisible
            regex=r"^[\s\S]*[^\x00-\x20\x7f-\xa0\xad\u034f\u061c\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180f\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0][\s\S]*$",
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
        # cog's validator lets whole-number floats (4.0, 1e2) through for integer inputs, as floats
        request = prior.Request(prompt, candidates=int(candidates), cond_scale=cond_scale,
                                seed=None if seed is None else int(seed), guidance=guidance)
        result = await self.batcher.submit(request, steps=int(steps), sampler=sampler)
        folder = self.outputs.new()
        contract.write_result(folder, result)
        return PriorOutput(
            text_tokens=Path(folder / "text_tokens.npy"),
            text_embedding=Path(folder / "text_embedding.npy"),
            image_embedding=Path(folder / "image_embedding.npy"),
            candidates=Path(folder / "candidates.npy"),
            scores=[float(s) for s in result.scores[0]],
            chosen=int(result.chosen[0]),
            seed=int(result.seed),
            weights_layout=self.model.layout,
        )


class OutputFolders:
    """A fresh folder per prediction, under one root made in setup() (in $TMPDIR).

    cog reads a prediction's files after predict() returns, so they cannot be removed there;
    the oldest folder goes once more than KEEP exist (KEEP is far above the predictions that
    can finish at once), so a long-running server's disk use stays bounded. The root goes at
    shutdown (atexit; `prior serve` also removes its temporary folder after a crash).
    """

    KEEP = 128

    def __init__(self) -> None:
        self.root = FilePath(tempfile.mkdtemp(prefix="prior-outputs-"))
        atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self.recent: deque[FilePath] = deque()
        self.count = 0

    def new(self) -> FilePath:
        """A path for the next prediction's folder (created whole by contract.write_result)."""
        while len(self.recent) >= self.KEEP:
            shutil.rmtree(self.recent.popleft(), ignore_errors=True)
        self.count += 1
        folder = self.root / f"prediction-{self.count}"
        self.recent.append(folder)
        return folder
