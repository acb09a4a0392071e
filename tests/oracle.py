"""The reference implementation, dalle2-pytorch 0.11.5, and random checkpoints in its file format.

Only tests and bench/ import this module; `prior/` never does. Nothing here downloads:
the OpenAI CLIP model is built from its hyperparameters with random weights instead of
`clip.load`, and handed to dalle2-pytorch's `OpenAIClipAdapter` the way the original
predictor's adapter would have held it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import types
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class OracleShape:
    """Every size a checkpoint can vary in. Defaults are the real prior_ema_fp16.pth."""

    dim: int = 768  # prior width == CLIP embedding size
    depth: int = 24
    dim_head: int = 64
    heads: int = 32
    ff_mult: int = 4
    timesteps: int = 1000
    text_width: int = 768
    text_layers: int = 12
    vision_width: int = 1024
    vision_layers: int = 24
    vision_patch: int = 14
    image_size: int = 224


FULL = OracleShape()
TINY = OracleShape(
    dim=64, depth=2, dim_head=16, heads=4, text_width=64, text_layers=2,
    vision_width=64, vision_layers=1, vision_patch=14, image_size=28,
)
# CLIP's text width must equal the prior's width: the 77 text states are tokens of its sequence.
TINY_SHAPES = {
    "tiny": TINY,
    "tiny_wide_heads": OracleShape(
        dim=128, depth=3, dim_head=32, heads=6, text_width=128, text_layers=1,
        vision_width=64, vision_layers=1, image_size=28,
    ),
    "tiny_deep": OracleShape(
        dim=64, depth=4, dim_head=8, heads=2, ff_mult=2, text_width=64, text_layers=3,
        vision_width=64, vision_layers=1, image_size=28,
    ),
    "tiny_big_head": OracleShape(
        dim=192, depth=1, dim_head=64, heads=3, text_width=192, text_layers=2,
        vision_width=64, vision_layers=1, image_size=28,
    ),
}


# Schedules other than LAION's 1000 steps: the exact sampler is then that many steps.
SCHEDULE_SHAPES = {
    "short_schedule": replace(TINY, timesteps=37),
    "long_schedule": replace(TINY, timesteps=1200),
}


def _random_openai_clip(shape: OracleShape):
    import clip.model

    return clip.model.CLIP(
        embed_dim=shape.dim,
        image_resolution=shape.image_size,
        vision_layers=shape.vision_layers,
        vision_width=shape.vision_width,
        vision_patch_size=shape.vision_patch,
        context_length=77,
        vocab_size=49408,
        transformer_width=shape.text_width,
        transformer_heads=shape.text_width // 64,
        transformer_layers=shape.text_layers,
    )


def _adapter(clip_model):
    """An OpenAIClipAdapter around `clip_model`, set up as its __init__ would after clip.load."""
    from dalle2_pytorch.dalle2_pytorch import BaseClipAdapter, OpenAIClipAdapter

    adapter = OpenAIClipAdapter.__new__(OpenAIClipAdapter)
    BaseClipAdapter.__init__(adapter, clip_model)
    adapter.handle = adapter.find_layer("ln_final").register_forward_hook(adapter._hook)
    adapter.cleared = False
    return adapter


def _quiet_progress() -> None:
    """0.11.5 prints a tqdm bar for every sample; tests and benchmarks do not want it."""
    import dalle2_pytorch.dalle2_pytorch as d2

    d2.tqdm = lambda iterable, *args, **kwargs: iterable


def build_oracle(shape: OracleShape):
    """The DiffusionPrior exactly as LAION's predictor built it (random weights)."""
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    _quiet_progress()

    net = DiffusionPriorNetwork(
        dim=shape.dim, depth=shape.depth, dim_head=shape.dim_head, heads=shape.heads,
        normformer=True, attn_dropout=5e-2, ff_dropout=5e-2, num_time_embeds=1,
        num_image_embeds=1, num_text_embeds=1, num_timesteps=shape.timesteps, ff_mult=shape.ff_mult,
    )
    return DiffusionPrior(
        net=net, clip=_adapter(_random_openai_clip(shape)), image_embed_dim=shape.dim,
        timesteps=shape.timesteps, cond_drop_prob=0.1, loss_type="l2",
        condition_on_text_encodings=True,
    )


@torch.no_grad()
def make_checkpoint(path: str | Path, shape: OracleShape = TINY, seed: int = 0) -> Path:
    """Write a random prior_ema_fp16.pth-format file: a flat fp16 state_dict of the oracle.

    Every LayerNorm gain and bias is perturbed away from 1 and 0, so a loader that drops
    one gives different numbers, not the same ones by luck.
    """
    path = Path(path)
    torch.manual_seed(seed)
    oracle = build_oracle(shape)
    state = oracle.state_dict()
    for key, tensor in state.items():
        if key.startswith("net.") and key.endswith((".gamma", ".beta")):
            tensor.add_(0.2 * torch.randn_like(tensor))
        elif key.startswith("clip.clip.") and ("ln_" in key) and key.endswith((".weight", ".bias")):
            tensor.add_(0.2 * torch.randn_like(tensor))
    state = {k: v.half() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # concurrent builders never collide
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_oracle(path: str | Path, shape: OracleShape):
    """The oracle loaded strictly from `path`, in float32 on the CPU, ready to sample."""
    oracle = build_oracle(shape)
    state = torch.load(path, map_location="cpu", weights_only=True)
    oracle.load_state_dict(state, strict=True)
    return oracle.float().eval()


@torch.no_grad()
def oracle_sample(oracle, tokens: torch.Tensor, seed: int, candidates: int, cond_scale: float) -> torch.Tensor:
    """DiffusionPrior.sample after torch.manual_seed(seed): the original predictor's path."""
    torch.manual_seed(seed)
    return oracle.sample(tokens, num_samples_per_batch=candidates, cond_scale=cond_scale)


@torch.no_grad()
def oracle_text(oracle, tokens: torch.Tensor):
    """(raw encode_text output, ln_final states, mask) as the oracle computes them."""
    raw = oracle.clip.clip.encode_text(tokens)
    states = oracle.clip.text_encodings
    del oracle.clip.text_encodings
    return raw.float(), states.float(), tokens != 0


def shape_dict(shape: OracleShape) -> dict:
    return asdict(shape)


def uniform(prompts: int, candidates: int, cond_scale: float, guidance: str = "original") -> tuple[list, list, list]:
    """Prior._denoiser's per-prompt settings when every prompt has the same ones."""
    return [candidates] * prompts, [cond_scale] * prompts, [guidance] * prompts


@contextlib.contextmanager
def _packaging_before_26_1():
    """While active, objects of the classes `old_packaging_version` makes pickle under
    packaging's own names (packaging.version.Version, ...), as packaging 21-26.0 pickled them."""
    names = ("packaging.version", "packaging._structures")
    saved = {name: sys.modules.get(name) for name in names}
    version_module, structures_module = types.ModuleType(names[0]), types.ModuleType(names[1])
    for cls, module in ((_OldVersion, version_module), (_OldVersionParts, version_module),
                        (_OldInfinity, structures_module), (_OldNegativeInfinity, structures_module)):
        setattr(module, cls.__qualname__, cls)
    sys.modules.update(zip(names, (version_module, structures_module), strict=True))
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _OldVersion:
    pass


class _OldInfinity:
    pass


class _OldNegativeInfinity:
    pass


_OldVersionParts = collections.namedtuple("_Version", "epoch release dev pre post local")
for _cls, _module, _name in ((_OldVersion, "packaging.version", "Version"),
                             (_OldVersionParts, "packaging.version", "_Version"),
                             (_OldInfinity, "packaging._structures", "InfinityType"),
                             (_OldNegativeInfinity, "packaging._structures", "NegativeInfinityType")):
    _cls.__module__, _cls.__qualname__, _cls.__name__ = _module, _name, _name


def old_packaging_version(release: tuple[int, ...]) -> _OldVersion:
    """A Version as packaging before 26.1 held it: __dict__ with the parts and a comparison key."""
    version = _OldVersion()
    version.__dict__.update(_version=_OldVersionParts(0, release, None, None, None, None),
                            _key=(0, release, _OldNegativeInfinity(), _OldInfinity(), _OldInfinity(),
                                  _OldNegativeInfinity()))
    return version


def make_trainer_file(path: str | Path, checkpoint: str | Path, shape: OracleShape, seed: int = 0,
                      old_packaging: bool = False, extra: dict | None = None) -> Path:
    """A dalle2-pytorch 0.11.5 trainer file (`DiffusionPriorTrainer.save`, the real code) whose
    EMA network is `checkpoint`'s weights and whose online network took one AdamW step on random
    gradients (so the two differ, and the optimizer's state is there). `old_packaging` pickles
    its version object as packaging before 26.1 did; `extra` adds entries to the saved dict."""
    from dalle2_pytorch.trainer import DiffusionPriorTrainer

    _quiet_progress()
    path = Path(path)
    torch.manual_seed(seed)
    online = load_oracle(checkpoint, shape)
    with warnings.catch_warnings():  # GradScaler's deprecation warning
        warnings.simplefilter("ignore")
        trainer = DiffusionPriorTrainer(online, device="cpu", use_ema=True, lr=1e-2)
    trainable = [p for p in online.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # "Saving checkpoint at step: 0"
        trainer.save(str(path))
    if old_packaging or extra:
        saved = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        saved.update(extra or {})
        if old_packaging:
            saved["version"] = old_packaging_version(tuple(int(n) for n in str(saved["version"]).split(".")))
            with _packaging_before_26_1():
                torch.save(saved, path)
        else:
            torch.save(saved, path)
    return path
