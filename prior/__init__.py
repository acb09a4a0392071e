"""conditioned-prior: text prompt -> CLIP ViT-L/14 image embedding with LAION's diffusion prior.

    import prior
    model = prior.load("weights/prior_ema_fp16.pth")
    result = model.embed("a red cube on a table", candidates=2, steps=64, seed=0)
    result.image_embedding  # (1, 768) float32
"""

__version__ = "0.1.0"

from .checkpoint import PRIOR_EMA_FP16_SHA256, WeightsError
from .pipeline import DEFAULT_WEIGHTS, GUIDANCE, EmbedResult, Prior, load

__all__ = ["__version__", "DEFAULT_WEIGHTS", "GUIDANCE", "PRIOR_EMA_FP16_SHA256", "EmbedResult", "Prior", "WeightsError", "load"]
