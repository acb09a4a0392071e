"""The oracle of the later layout: dalle2-pytorch 1.1.0 (the prior network of 0.23.1-1.4.2).

It cannot share a process with 0.11.5 (same package name), so it runs in a subprocess of the
test virtualenv's Python with `.oracle-1.1.0/` (dalle2-pytorch 1.1.0, made by
`scripts/setup.sh test`) first on PYTHONPATH. The tests call `make` and `run` below, which start
that subprocess; the subprocess runs this module's `main`.

    make: random weights of a 1.1.0 DiffusionPrior (random OpenAI CLIP, as tests/oracle.py), every
          LayerNorm gain perturbed, saved as a flat state dict the way the published files are
          (network and schedule float32, CLIP float16), with its prior_config.json beside it.
    run:  load a file strictly and answer requests: text features, single network passes (the
          file's own conditional pass, and the unconditional pass with the text mask those
          versions compute applied, as `--guidance standard` defines it), and whole samples
          (`DiffusionPrior.sample` after torch.manual_seed, 1000 steps), optionally with that
          unconditional pass in the guidance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ORACLE_DIR = ROOT / ".oracle-1.1.0"
VERSION = "1.1.0"


@dataclass(frozen=True)
class LaterShape:
    dim: int = 64
    depth: int = 2
    dim_head: int = 16
    heads: int = 4
    ff_mult: int = 4
    timesteps: int = 1000
    max_text_len: int | None = 77  # None: not in the config, dalle2-pytorch's default 256
    cond_drop_prob: float = 0.2
    text_layers: int = 2


LATER_SHAPES = {
    # laion/DALLE2-PyTorch prior/latest.pth's kind: max_text_len 77, trained with cond_drop_prob > 0
    "later_77": LaterShape(),
    # nousr/conditioned-prior aesthetic/best.pth's kind: no max_text_len (256), cond_drop_prob 0
    "later_256": LaterShape(dim=128, depth=3, dim_head=32, heads=6, ff_mult=2, max_text_len=None, cond_drop_prob=0.0,
                            text_layers=1),
}


def prior_config(shape: LaterShape) -> dict:
    """A prior_config.json as dalle2-pytorch's training script writes it (the parts we read)."""
    net = {"dim": shape.dim, "depth": shape.depth, "dim_head": shape.dim_head, "heads": shape.heads,
           "ff_mult": shape.ff_mult, "num_timesteps": shape.timesteps, "normformer": True, "rotary_emb": True,
           "attn_dropout": 0.05, "ff_dropout": 0.05, "final_proj": True, "norm_out": True}
    if shape.max_text_len is not None:
        net["max_text_len"] = shape.max_text_len
    return {"prior": {"clip": {"make": "openai", "model": "ViT-L/14"}, "net": net, "image_embed_dim": shape.dim,
                      "image_size": 224, "image_channels": 3, "timesteps": shape.timesteps,
                      "cond_drop_prob": shape.cond_drop_prob, "loss_type": "l2", "predict_x_start": True,
                      "beta_schedule": "cosine", "condition_on_text_encodings": True},
            "data": {"batch_size": 8}, "train": {"lr": 1.1e-4}}


# -- the parent's side ------------------------------------------------------------------------------


def _subprocess(command: str, spec: dict, timeout: int = 900) -> None:
    if not (ORACLE_DIR / "dalle2_pytorch").is_dir():
        raise RuntimeError(f"{ORACLE_DIR} is missing: run scripts/setup.sh test (it installs dalle2-pytorch {VERSION})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ORACLE_DIR), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "tests.oracle_later", command, json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the {VERSION} oracle failed:\n{done.stderr[-3000:]}")


def make(path: str | Path, shape: LaterShape, seed: int = 0, with_config: bool = True) -> Path:
    """Random weights in the later layout (written by dalle2-pytorch 1.1.0 itself)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _subprocess("make", {"path": str(path), "shape": asdict(shape), "seed": seed})
    if with_config:
        (path.parent / "prior_config.json").write_text(json.dumps(prior_config(shape), indent=2))
    return path


def run(path: str | Path, shape: LaterShape, requests: list[dict], work: Path) -> list[dict]:
    """Answer `requests` with the 1.1.0 oracle loaded from `path`. Tensors travel in .pt files."""
    inputs, outputs = work / "requests.pt", work / "answers.pt"
    torch.save(requests, inputs)
    _subprocess("run", {"path": str(path), "shape": asdict(shape), "requests": str(inputs), "answers": str(outputs)})
    return torch.load(outputs, weights_only=True)


# -- the subprocess's side (dalle2-pytorch 1.1.0 imported) -------------------------------------------


def _build(shape: LaterShape):
    import dalle2_pytorch
    import dalle2_pytorch.dalle2_pytorch as d2
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    from tests.oracle import OracleShape, _random_openai_clip

    assert dalle2_pytorch.__version__ == VERSION, dalle2_pytorch.__version__
    d2.tqdm = lambda iterable, *args, **kwargs: iterable
    clip_shape = OracleShape(dim=shape.dim, text_width=shape.dim, text_layers=shape.text_layers, vision_width=64,
                             vision_layers=1, image_size=28)
    adapter = d2.OpenAIClipAdapter.__new__(d2.OpenAIClipAdapter)  # its __init__ would download CLIP
    d2.BaseClipAdapter.__init__(adapter, _random_openai_clip(clip_shape))
    adapter.eos_id = 49407
    adapter.handle = adapter.find_layer("ln_final").register_forward_hook(adapter._hook)
    adapter.cleared = False
    extra = {} if shape.max_text_len is None else {"max_text_len": shape.max_text_len}
    net = DiffusionPriorNetwork(dim=shape.dim, depth=shape.depth, dim_head=shape.dim_head, heads=shape.heads,
                                ff_mult=shape.ff_mult, num_timesteps=shape.timesteps, normformer=True,
                                attn_dropout=0.05, ff_dropout=0.05, **extra)
    return DiffusionPrior(net=net, clip=adapter, image_embed_dim=shape.dim, timesteps=shape.timesteps,
                          cond_drop_prob=shape.cond_drop_prob, condition_on_text_encodings=True)


@torch.no_grad()
def _make(spec: dict) -> None:
    shape = LaterShape(**spec["shape"])
    torch.manual_seed(spec["seed"])
    prior = _build(shape)
    state = prior.state_dict()
    for key, tensor in state.items():  # gains away from 1, so that a dropped one shows
        if key.endswith("relative_attention_bias.weight"):
            # counted 128 times: at nn.Embedding's N(0, 1) init, attention would see only the nearest
            # few positions, and a wrong text position far from the query would not show
            tensor.div_(128)
        elif key.startswith("net.") and key.endswith(".g"):
            tensor.add_(0.2 * torch.randn_like(tensor))
        elif key.startswith("clip.clip.") and "ln_" in key and key.endswith((".weight", ".bias")):
            tensor.add_(0.2 * torch.randn_like(tensor))
    state = {k: v.half() if k.startswith("clip.") else v.float() for k, v in state.items()}
    torch.save(state, spec["path"])


def _null_mask(batch: int, text_len: int) -> torch.Tensor:
    """The mask 1.1.0 computes for a dropped condition (mask &= keep_mask, keep False), which it never
    applies: no text position, no text embedding; the timestep, x_t and the query attended."""
    return torch.cat([torch.zeros(batch, text_len + 1, dtype=torch.bool), torch.ones(batch, 3, dtype=torch.bool)], 1)


def _masked_transformer(transformer, mask: torch.Tensor):
    """CausalTransformer.forward of 1.1.0 with `mask` handed to every attention layer."""

    def forward(x):
        n = x.shape[1]
        x = transformer.init_norm(x)
        attn_bias = transformer.rel_pos_bias(n, n + 1, device=x.device)
        for attn, ff in transformer.layers:
            x = attn(x, mask=mask, attn_bias=attn_bias) + x
            x = ff(x) + x
        return transformer.project_out(transformer.norm(x))

    return forward


def _standard_null(net, x_t, t, **text_cond):
    """The unconditional pass of `--guidance standard`: the dropped condition's mask applied."""
    transformer = net.causal_transformer
    real = transformer.forward
    transformer.forward = _masked_transformer(transformer, _null_mask(x_t.shape[0], net.max_text_len))
    try:
        return net(x_t, t, cond_drop_prob=1.0, **text_cond)
    finally:
        transformer.forward = real


@torch.no_grad()
def _run(spec: dict) -> None:
    shape = LaterShape(**spec["shape"])
    prior = _build(shape)
    prior.load_state_dict(torch.load(spec["path"], map_location="cpu", weights_only=True), strict=True)
    prior = prior.float().eval()
    answers = []
    for request in torch.load(spec["requests"], weights_only=True):
        tokens = request["tokens"]
        if request["kind"] == "text":
            raw = prior.clip.clip.encode_text(tokens).float()
            del prior.clip.text_encodings
            embed, encodings = prior.clip.embed_text(tokens)
            answers.append({"raw": raw, "embed": embed, "encodings": encodings})
        elif request["kind"] == "pass":
            embed, encodings = prior.clip.embed_text(tokens)
            args = (request["x_t"], request["t"])
            text_cond = {"text_embed": embed, "text_encodings": encodings}
            answers.append({"final_norm": prior.net.causal_transformer.norm(request["norm_x"]),
                            "conditional": prior.net(*args, cond_drop_prob=0.0, **text_cond),
                            "dropped": prior.net(*args, cond_drop_prob=1.0, **text_cond),
                            "standard_null": _standard_null(prior.net, *args, **text_cond)})
        else:  # a whole sample, as the original predictor ran it
            if request["standard"]:
                def guided(x, t, cond_scale=1.0, **text_cond):
                    logits = prior.net(x, t, **text_cond)
                    null = _standard_null(prior.net, x, t, **text_cond)
                    return null + (logits - null) * cond_scale

                prior.net.forward_with_cond_scale = guided
            torch.manual_seed(request["seed"])
            try:
                image = prior.sample(tokens, num_samples_per_batch=request["candidates"],
                                     cond_scale=request["cond_scale"])
                answers.append({"image": image})
            except AssertionError as e:  # 1.1.0 refuses guidance for a file trained without dropout
                answers.append({"refused": str(e)})
            finally:
                prior.net.__dict__.pop("forward_with_cond_scale", None)
    torch.save(answers, spec["answers"])


def main(argv: list[str]) -> None:
    command, spec = argv[0], json.loads(argv[1])
    torch.set_num_threads(1)
    {"make": _make, "run": _run}[command](spec)


if __name__ == "__main__":
    main(sys.argv[1:])
