"""The contract every edge shares: bounds, defaults, choices and error types.

The CLI, the Python API, the cog predictor, the batch job and search all read their limits
from here, so they cannot drift apart. Nothing here imports torch: a command can check its
arguments (and fail in milliseconds) before the heavy imports.

predict.py must spell its `Input(...)` bounds as literals (cog's static parser reads that
file without running it); tests/test_cog.py checks that those literals equal these.
"""

from __future__ import annotations

# -- what a request may ask for -------------------------------------------------------------------

CANDIDATES = (1, 32)  # image embeddings sampled per prompt (inclusive bounds)
DEFAULT_CANDIDATES = 2
COND_SCALE = (0.0, 5.0)  # classifier-free guidance scale; 1 = none
DEFAULT_COND_SCALE = 1.0
DEFAULT_STEPS = 64  # sampling steps when none are given; all of a shorter schedule
SEED_LIMIT = 2**32  # seeds are 0 .. SEED_LIMIT - 1
# "original": dalle2-pytorch 0.11.5 exactly, its in-place text-mask quirk included (see README);
# "standard": textbook classifier-free guidance.
GUIDANCE = ("original", "standard")
DEFAULT_GUIDANCE = "original"
SAMPLERS = ("ddpm", "ddim")  # prior.diffusion.SAMPLERS maps each name to its function
DEFAULT_SAMPLER = "ddpm"
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


# -- errors ---------------------------------------------------------------------------------------


class PriorError(Exception):
    """Base of the errors this package raises on purpose; the message is one line for a user."""


class ArgumentError(PriorError, ValueError):
    """A bad argument or input; the message names it, the bound and what arrived."""
