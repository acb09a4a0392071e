"""conditioned-prior: text prompt -> CLIP ViT-L/14 image embedding with LAION's diffusion prior.

    import prior
    model = prior.load("weights/prior_ema_fp16.pth")
    result = model.embed("a red cube on a table", candidates=2, steps=64, seed=0)
    result.image_embedding  # (1, 768) float32

The names below are imported on first use, so `python -m prior ...` can check its
arguments (and `python -m prior.weights` can download) without loading torch first.
"""

import importlib

from .contract import (
    DEFAULT_STEPS,
    GUIDANCE,
    PRIOR_EMA_FP16_SHA256,
    SAMPLERS,
    ArgumentError,
    OutputError,
    PriorError,
    WeightsError,
    default_weights,
)

__version__ = "0.1.0"

_EXPORTS = {
    "load": "pipeline",
    "Prior": "pipeline",
    "EmbedResult": "pipeline",
    "Request": "pipeline",
}

__all__ = ["__version__", "DEFAULT_STEPS", "GUIDANCE", "SAMPLERS", "PRIOR_EMA_FP16_SHA256", "ArgumentError",
           "OutputError", "PriorError", "WeightsError", "default_weights", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
