"""Reading LAION's prior_ema_fp16.pth (a dalle2-pytorch 0.11.5 DiffusionPrior state_dict).

The file holds three groups of tensors:
    clip.clip.*        OpenAI CLIP ViT-L/14, both towers (we keep the text tower only)
    net.*              the prior network
    noise_scheduler.*  the diffusion schedule, fp16-rounded, used as it is

`read_checkpoint` loads it safely (weights_only: tensors, never code), checks every tensor
it keeps, infers every size from tensor shapes, and returns `Weights`: what inference
needs, renamed to our modules' names. Any problem is a `WeightsError` naming the file.

`convert_to_safetensors` writes the tensors inference needs (no visual tower), under the
same names, to a .safetensors file with a SHA-256 sidecar: no pickle at all, memory-mapped
on load, about 60% of the original's size. `read_checkpoint` reads either format.

A dalle2-pytorch trainer file (`DiffusionPriorTrainer.save`: the EMA network and the online one
as state dicts, the optimizer's and scaler's state, the package version) is read too: one of its
two networks (`ema_model` by default, or `model`) is taken as the state dict above. Its
version is a `packaging.version.Version`, the one object in it that is not a tensor or a
plain Python value: it is unpickled into an inert stand-in of ours (`SavedVersion`), and any
other object is refused, as in every file.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import contract
from .contract import PRIOR_EMA_FP16_SHA256, WeightsError, sha256_of, sidecar_path, sidecar_sha256  # noqa: F401 (re-exported)
from .diffusion import cosine_alphas_cumprod
from .model import TEXT_LEN, PriorConfig
from .text import TextConfig

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
# Every buffer 0.11.5's NoiseScheduler saves: all must be there and finite, as a strict
# load_state_dict of the original would demand, though the sampler reads only those above.
FILE_SCHEDULE_BUFFERS = (
    *SCHEDULE_BUFFERS, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance", "p2_loss_weight",
)
# The three parts of a DiffusionPrior state dict; a tensor outside them means another layout.
_TOP_LEVEL = ("net.", "clip.clip.", "noise_scheduler.")

# file name (under "net.") -> our name. {i} is a layer index.
_NET_KEYS = {
    "learned_query": "learned_query",
    "to_time_embeds.0.weight": "time_embed.weight",
    "causal_transformer.rel_pos_bias.relative_attention_bias.weight": "rel_pos_bias.weight",
    "causal_transformer.norm.gamma": "norm_out.weight",
    "causal_transformer.norm.beta": "norm_out.bias",
    "causal_transformer.project_out.weight": "project_out.weight",
}
_LAYER_KEYS = {
    "0.null_kv": "attn.null_kv",
    "0.norm.gamma": "attn.norm.weight",
    "0.norm.beta": "attn.norm.bias",
    "0.to_q.weight": "attn.to_q.weight",
    "0.to_kv.weight": "attn.to_kv.weight",
    "0.to_out.0.weight": "attn.to_out.weight",
    "0.to_out.1.gamma": "attn.out_norm.weight",
    "0.to_out.1.beta": "attn.out_norm.bias",
    "1.0.gamma": "ff.norm.weight",
    "1.0.beta": "ff.norm.bias",
    "1.1.weight": "ff.proj_in.weight",
    "1.3.gamma": "ff.inner_norm.weight",
    "1.3.beta": "ff.inner_norm.bias",
    "1.5.weight": "ff.proj_out.weight",
}
# The later layout (dalle2-pytorch 0.23.1-1.8.x): LayerNorms hold a gain `g` only, and the
# learned padding of the text positions is one more tensor.
_LATER_NET_KEYS = {
    "learned_query": "learned_query",
    "null_text_embed": "null_text_embed",
    "to_time_embeds.0.weight": "time_embed.weight",
    "causal_transformer.rel_pos_bias.relative_attention_bias.weight": "rel_pos_bias.weight",
    "causal_transformer.norm.g": "norm_out.weight",
    "causal_transformer.project_out.weight": "project_out.weight",
}
_LATER_LAYER_KEYS = {
    "0.null_kv": "attn.null_kv",
    "0.norm.g": "attn.norm.weight",
    "0.to_q.weight": "attn.to_q.weight",
    "0.to_kv.weight": "attn.to_kv.weight",
    "0.to_out.0.weight": "attn.to_out.weight",
    "0.to_out.1.g": "attn.out_norm.weight",
    "1.0.g": "ff.norm.weight",
    "1.1.weight": "ff.proj_in.weight",
    "1.3.g": "ff.inner_norm.weight",
    "1.5.weight": "ff.proj_out.weight",
}
_KEY_MAPS = {contract.LAYOUT_0_11_5: (_NET_KEYS, _LAYER_KEYS), contract.LAYOUT_LATER: (_LATER_NET_KEYS, _LATER_LAYER_KEYS)}
# Keys that dalle2-pytorch 1.9.0 introduced (null embeddings for the text embedding and the image).
_KEYS_SINCE_1_9 = ("null_text_encodings", "null_text_embeds", "null_image_embed")
PB_RELAX_ALPHA = 128  # the later layout's attention: logits / 128, + bias, then * 128
COSINE_SIM_SINCE = (1, 4, 3)  # dalle2-pytorch's attention became cosine-similarity attention here
LATER_SINCE = (0, 23, 1)  # the first version whose network is the later layout's as read here
_LAYER_RE = re.compile(r"causal_transformer\.layers\.(\d+)\.(.+)")
_ROTARY_SUFFIX = "0.rotary_emb.freqs"  # one shared module, stored once per layer

_TEXT_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection")
_TEXT_BLOCK_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


@dataclass
class Weights:
    prior_config: PriorConfig
    text_config: TextConfig
    prior_state: dict[str, torch.Tensor]  # our PriorNetwork's names
    text_state: dict[str, torch.Tensor]  # OpenAI CLIP's names, as in text.TextEncoder
    schedule: dict[str, torch.Tensor]  # noise_scheduler buffers, by short name
    path: Path
    sha256: str | None
    trainer_entry: str | None = None  # the network read from a trainer file; None: a plain state dict
    saved_by: str | None = None  # the dalle2-pytorch version a trainer file records
    layout: str = contract.LAYOUT_0_11_5  # contract.LAYOUTS
    cond_drop_prob: float | None = None  # the later layout's, from its prior_config.json (None: not known)


def read_checkpoint(path: str | Path, expected_sha256: str | None = None, trainer_entry: str | None = None) -> Weights:
    """Load, check and split a prior_ema_fp16.pth-format file, a dalle2-pytorch trainer file
    holding one, or a converted .safetensors of either.

    A .safetensors file is checked against its `.sha256` sidecar when no hash is given.
    `trainer_entry` picks the network of a trainer file (contract.TRAINER_ENTRIES; None: the
    EMA one); asked of a file that is not a trainer file (or its conversion), it is an error.
    Raises WeightsError.
    """
    if trainer_entry is not None:
        contract.check_choice("trainer_entry", trainer_entry, contract.TRAINER_ENTRIES)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise WeightsError(path, "file is empty (0 bytes)")
    # A converted file whose sidecar hash matches holds exactly the tensors that were
    # checked when it was written: the (slow) NaN/Inf scan is not repeated.
    converted = path.suffix == ".safetensors" and expected_sha256 is None and sidecar_path(path).is_file()
    expected_sha256 = contract.required_sha256(path, expected_sha256)  # the contract's hash policy
    sha256 = None
    if converted and _verified_before(path, expected_sha256):
        sha256 = expected_sha256  # unchanged since its last full check
    elif expected_sha256 is not None:
        sha256 = sha256_of(path)
        if sha256 != expected_sha256:
            source = f" (from {sidecar_path(path).name}; converted files are written whole, so the file was changed " \
                     "since)" if converted else " (corrupted or a different file)"
            raise WeightsError(path, f"SHA-256 is {sha256}, expected {expected_sha256}{source}")
        if converted:
            _remember_verified(path, sha256)
    if path.suffix != ".safetensors" and expected_sha256 is None:
        _check_zip_checksums(path)
    state, trainer_entry, saved_by = _load_state(path, trainer_entry)
    layout = _layout_of(path, state, saved_by)
    prior_config, prior_state = _split_prior(path, state, layout)
    cond_drop_prob = _later_config(path, prior_config) if layout == contract.LAYOUT_LATER else None
    text_config, text_state = _split_text(path, state, prior_config.dim)
    schedule = _split_schedule(path, state, prior_config.num_timesteps)
    stray = next((k for k in state if not k.startswith(_TOP_LEVEL)), None)
    if stray is not None:
        raise WeightsError(path, f"unexpected tensor {stray!r} (not a {layout} DiffusionPrior layout)")
    tensors = [*((f"net.{_file_key(k, layout)}", v) for k, v in prior_state.items()),
               *((f"clip.clip.{k}", v) for k, v in text_state.items())]
    for name, tensor in tensors:  # named as in the file; the schedule is checked in _split_schedule
        _check_storage(path, name, tensor)
        if not converted and not torch.isfinite(tensor).all():
            raise WeightsError(path, f"tensor {name!r} contains NaN or Inf")
    return Weights(prior_config, text_config, prior_state, text_state, schedule, path, sha256, trainer_entry, saved_by,
                   layout, cond_drop_prob)


def describe(path: str | Path) -> str:
    """The layout a weights file holds, in words, read from its tensor names alone (no checks of
    values; `read_checkpoint` makes those): which dalle2-pytorch network, in which container.
    Raises WeightsError when it is not a weights file we read, naming why."""
    path = Path(path)
    state, trainer_entry, saved_by = _load_state(path, None)
    layout = _layout_of(path, state, saved_by)
    if path.suffix == ".safetensors":
        where = f"trainer entry '{trainer_entry}'" if trainer_entry else "a state dict"
        return f"{layout} network, converted from {where}"
    if trainer_entry:
        return f"{layout} network '{trainer_entry}' of a trainer file saved by dalle2-pytorch {saved_by or 'unknown'}"
    return f"{layout} state dict"


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(n) for n in match.groups()) if match else None


def _layout_of(path: Path, state: dict, saved_by: str | None) -> str:
    """Which network the tensors are, from their names: the later layout has LayerNorm gains
    `g` and a learned `null_text_embed`; a version we cannot reproduce is refused, naming it."""
    net = {k[4:] for k in state if k.startswith("net.")}
    since_1_9 = [k for k in _KEYS_SINCE_1_9 if k in net]
    if since_1_9:
        raise WeightsError(path, f"made by dalle2-pytorch 1.9.0 or later ('net.{since_1_9[0]}'): its learned null "
                                 "embeddings change the network; only the 0.11.5 and 0.23.1-1.4.2 networks are read")
    if not ("causal_transformer.norm.g" in net and "null_text_embed" in net):
        return contract.LAYOUT_0_11_5
    version = _version_tuple(saved_by)  # known for a trainer file only: a plain state dict does not say
    if version is not None and version >= COSINE_SIM_SINCE:
        raise WeightsError(path, f"made by dalle2-pytorch {saved_by}: from 1.4.3 on its attention is cosine-similarity "
                                 "attention under the same tensor names, which is not reproduced (0.23.1-1.4.2 are)")
    if version is not None and version < LATER_SINCE:
        raise WeightsError(path, f"made by dalle2-pytorch {saved_by}: before 0.23.1 its network applied a text mask "
                                 "under the same tensor names, which is not reproduced (0.23.1-1.4.2 are)")
    return contract.LAYOUT_LATER


# What a later-layout prior_config.json may say, beyond the sizes checked against the tensors:
# options of dalle2-pytorch's DiffusionPrior(Network) whose values other than these are not reproduced.
_LATER_CONFIG_FIXED = {
    "net.num_time_embeds": 1, "net.num_image_embeds": 1, "net.num_text_embeds": 1, "net.norm_in": False,
    "net.norm_out": True, "net.final_proj": True, "net.normformer": True, "net.rotary_emb": True,
    "condition_on_text_encodings": True, "predict_x_start": True, "beta_schedule": "cosine",
    "sampling_clamp_l2norm": False, "sampling_final_clamp_l2norm": False, "init_image_embed_l2norm": False,
    "image_embed_scale": None,
}


def _later_config(path: Path, cfg: PriorConfig) -> float:
    """The later layout's cond_drop_prob (dalle2-pytorch's default 0 when nothing says), from a
    converted file's metadata or the prior_config.json beside the file, whose sizes must agree
    with the tensors'."""
    if path.suffix == ".safetensors":
        recorded = (contract.safetensors_metadata(path) or {}).get("cond_drop_prob")
        if recorded is not None:
            return float(recorded)
    config_path = path.with_name(contract.LATER_CONFIG_NAME)
    if not config_path.is_file():
        return 0.0
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(config_path, f"not a readable JSON file ({str(e).splitlines()[0] if str(e) else e})") from None
    prior = config.get("prior", config) if isinstance(config, dict) else None
    if not isinstance(prior, dict) or not isinstance(prior.get("net"), dict):
        raise WeightsError(config_path, "no 'prior.net' section (not a dalle2-pytorch diffusion prior config)")
    net = prior["net"]
    sizes = {  # name in the config: (its value, dalle2-pytorch's default, what the tensors say)
        "net.dim": (net.get("dim"), None, cfg.dim),
        "net.depth": (net.get("depth"), None, cfg.depth),
        "net.heads": (net.get("heads"), 8, cfg.heads),
        "net.dim_head": (net.get("dim_head"), 64, cfg.dim_head),
        "net.ff_mult": (net.get("ff_mult"), 4, cfg.ff_inner / cfg.dim),
        "net.max_text_len": (net.get("max_text_len"), 256, cfg.text_len),
        "net.num_timesteps": (net.get("num_timesteps"), cfg.num_timesteps, cfg.num_timesteps),
        "timesteps": (prior.get("timesteps"), 1000, cfg.num_timesteps),
        "image_embed_dim": (prior.get("image_embed_dim"), cfg.dim, cfg.dim),
    }
    for name, (value, default, actual) in sizes.items():
        value = default if value is None else value
        if value != actual:
            raise WeightsError(config_path, f"{name} is {value!r}, but the tensors of {path.name} say {actual:g}")
    for name, fixed in _LATER_CONFIG_FIXED.items():
        section, key = (net, name[4:]) if name.startswith("net.") else (prior, name)
        if section.get(key, fixed) != fixed:
            raise WeightsError(config_path, f"{name} is {section[key]!r}; only {fixed!r} is reproduced")
    drop = prior.get("cond_drop_prob", 0.0)
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop <= 1:
        raise WeightsError(config_path, f"cond_drop_prob must be a number from 0 to 1, got {drop!r}")
    return float(drop)


def _load_state(path: Path, trainer_entry: str | None) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """The file's flat state dict, the trainer entry it came from and the version that saved it."""
    if path.suffix == ".safetensors":
        metadata = contract.safetensors_metadata(path) or {}
        recorded = metadata.get("trainer_entry")  # a converted file holds one network: any other asked for is an error
        if trainer_entry is not None and trainer_entry != recorded:
            held = f"trainer entry {recorded!r}" if recorded else "a plain state dict, not a trainer file"
            raise WeightsError(path, f"converted from {held}; asked for {trainer_entry!r}")
        return _safetensors_load(path), metadata.get("trainer_entry"), metadata.get("saved_by")
    return _pick_state(path, _torch_load(path), trainer_entry)


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _pick_state(path: Path, loaded: object, trainer_entry: str | None) -> tuple[dict, str | None, str | None]:
    """A flat state dict as it is; a trainer file's `trainer_entry` network (default the EMA one)."""
    trainer = isinstance(loaded, dict) and any(_is_state_dict(loaded.get(e)) for e in contract.TRAINER_ENTRIES)
    if not trainer:
        if not _is_state_dict(loaded):
            raise WeightsError(path, "not a state_dict (expected a flat mapping of names to tensors, "
                                     "or a dalle2-pytorch trainer file)")
        if trainer_entry is not None:
            raise WeightsError(path, f"not a trainer file (a plain state dict), so it has no {trainer_entry!r} entry")
        state, saved_by = loaded, None
    else:
        trainer_entry = trainer_entry or contract.DEFAULT_TRAINER_ENTRY
        state = loaded.get(trainer_entry)
        if not _is_state_dict(state):
            held = ", ".join(repr(k) for k in loaded if _is_state_dict(loaded[k]))
            raise WeightsError(path, f"trainer file has no {trainer_entry!r} state dict (it holds {held})")
        version = loaded.get("version")
        saved_by = str(version) if isinstance(version, SavedVersion | str) else None
    if not any(isinstance(k, str) and k.startswith("net.") for k in state):
        where = f"its {trainer_entry!r} entry is " if trainer_entry else ""
        raise WeightsError(path, f"{where}not a dalle2-pytorch DiffusionPrior state_dict (no 'net.*' tensors)")
    return state, trainer_entry, saved_by


class SavedVersion:
    """What a trainer file's `packaging.version.Version` is unpickled into: its parts, no code.

    packaging before 26.1 pickles the object's __dict__ (`_version`, a named tuple of the parts,
    and `_key`, a comparison key holding packaging's Infinity markers); 26.2 and later a tuple
    (epoch, release, pre, post, dev, local). Both are accepted; only the parts are kept."""

    parts: tuple = (0, (), None, None, None, None)

    def __setstate__(self, state) -> None:
        if isinstance(state, dict) and isinstance(state.get("_version"), tuple):
            version = state["_version"]  # (epoch, release, dev, pre, post, local)
            self.parts = (version[0], version[1], version[3], version[4], version[2], version[5])
        elif isinstance(state, tuple) and len(state) == 6:
            self.parts = state
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # __slots__ state
            self.__setstate__(state[1])

    def __str__(self) -> str:
        epoch, release, pre, post, dev, local = self.parts
        text = (f"{epoch}!" if epoch else "") + ".".join(str(n) for n in release or ())
        text += "".join(str(p) for p in pre) if pre else ""
        text += f".post{post[-1]}" if post else ""
        text += f".dev{dev[-1]}" if dev else ""
        text += "+" + ".".join(str(p) for p in local) if local else ""
        return text or "unknown"


class _VersionParts(tuple):
    """packaging.version._Version, the named tuple of the parts (packaging before 26.1)."""

    def __new__(cls, *parts):
        return tuple.__new__(cls, parts)


class _Infinity:
    """packaging._structures.InfinityType / NegativeInfinityType: markers in an old comparison key."""


# The only objects, besides tensors and plain Python values, that a file may hold, under the
# names the pickle gives them, each mapped to an inert class of ours.
ALLOWED_GLOBALS = [
    (SavedVersion, "packaging.version.Version"),
    (_VersionParts, "packaging.version._Version"),
    (_Infinity, "packaging._structures.InfinityType"),
    (_Infinity, "packaging._structures.NegativeInfinityType"),
]


WEIGHT_DTYPES = (torch.float16, torch.float32, torch.bfloat16)


def _check_storage(path: Path, name: str, tensor: torch.Tensor) -> None:
    """A dense tensor of a floating dtype the network can run in (not sparse, fp8 or integer)."""
    if tensor.layout != torch.strided:
        raise WeightsError(path, f"tensor {name!r} is stored {str(tensor.layout).removeprefix('torch.')}, expected dense")
    if tensor.dtype not in WEIGHT_DTYPES:
        raise WeightsError(path, f"tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, "
                                 "expected float16, float32 or bfloat16")


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _verified_before(path: Path, sha256: str) -> bool:
    """Hashing a converted file at every load would cost about a second. After a full check
    a `.verified` stamp records the file's size, mtime and inode: while they are unchanged,
    the check is not repeated (`python -m prior.weights verify` always hashes)."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {**_file_identity(path), "sha256": sha256.lower()}


def _remember_verified(path: Path, sha256: str) -> None:
    stamp = json.dumps({**_file_identity(path), "sha256": sha256}) + "\n"
    try:
        with contract.atomic_path(_stamp_path(path)) as partial:
            partial.write_text(stamp)
    except contract.OutputError:
        pass  # a read-only weights folder: every load hashes, which is only slower


def convert_to_safetensors(
    src: str | Path, dst: str | Path | None = None, expected_sha256: str | None = None, dtype: torch.dtype | None = None,
    done: Callable[[], None] | None = None, trainer_entry: str | None = None,
) -> Path:
    """Write what inference needs from `src` to `dst` (default: src with .safetensors), plus
    `dst.sha256`. The source is fully checked first; `dst` appears only when complete.

    `dtype` stores the network and text weights in that precision (default: as in `src`,
    float16). Stored in the precision they run in (float32 on a CPU), they are used straight
    from the memory map, with no conversion at load. The schedule buffers keep the file's
    fp16-rounded values either way (float32 holds them exactly). `done` runs once both files
    are in place, before a held back Ctrl-C lands (contract.atomic_path).

    From a trainer file, `trainer_entry` (default the EMA network) is what is kept; the file is
    memory-mapped, so its other entries (the online network, the optimizer's state) are never read.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    weights = read_checkpoint(src, expected_sha256, trainer_entry)  # every check, before anything is written
    state, _, _ = _load_state(src, weights.trainer_entry)
    text_keys = {f"clip.clip.{k}" for k in weights.text_state}
    # Still the memory-mapped tensors: they are read from the file only as they are written out.
    kept = {k: v for k, v in state.items() if k.startswith(("net.", "noise_scheduler.")) or k in text_keys}
    if dtype is not None:
        kept = {k: v.to(dtype) if v.is_floating_point() and not k.startswith("noise_scheduler.") else v
                for k, v in kept.items()}
    source = src.stat()  # what contract.converted_from() compares the source with later
    metadata = {"format": contract.CONVERTED_FORMAT, "source": src.name,
                "source_sha256": weights.sha256 or sha256_of(src),
                "source_size": str(source.st_size), "source_mtime_ns": str(source.st_mtime_ns)}
    if weights.trainer_entry is not None:
        metadata.update(trainer_entry=weights.trainer_entry, saved_by=weights.saved_by or "unknown")
    if weights.cond_drop_prob is not None:  # the later layout's, from its prior_config.json
        metadata["cond_drop_prob"] = repr(weights.cond_drop_prob)
    _write_converted(kept, metadata, dst, done)
    return dst


# safetensors' names for the dtypes a converted file holds
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def save_safetensors(state: dict[str, torch.Tensor], metadata: dict[str, str], f) -> None:
    """Write `state` to the open binary file `f` in the safetensors format (an 8-byte header
    length, a JSON header of names, dtypes, shapes and byte offsets, then the raw bytes). Our
    own writer, so that a failing disk is a plain OSError with its errno (safetensors'
    save_file reports it only as text)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in sorted(state):
        tensor = state[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for name in sorted(state):
        f.write(state[name].contiguous().view(-1).view(torch.uint8).numpy().data)


def _write_converted(state: dict[str, torch.Tensor], metadata: dict[str, str], dst: Path,
                     done: Callable[[], None] | None = None) -> None:
    """Write `dst` and its sidecar whole (contract.atomic_paths). The sidecar holds the SHA-256
    of the bytes read back from disk. Both are renamed into place, sidecar first, with Ctrl-C
    and SIGTERM held back across the two renames, so a sidecar never describes another file
    than the one beside it; only a hard kill (SIGKILL, power loss) between the two renames can
    leave a new sidecar beside an old file, which a load then reports as changed since
    conversion. On any failure both partial files (hundreds of MB) are deleted: a conversion
    always starts over."""
    try:
        with contract.atomic_paths([contract.sidecar_path(dst), dst], done=done) as (sidecar_partial, partial):
            with open(partial, "wb") as f:
                save_safetensors(state, metadata, f)
            sidecar_partial.write_text(f"{sha256_of(partial)}  {dst.name}\n")
    except contract.OutputError as e:
        raise WeightsError(dst, f"cannot write the converted file ({e.reason})") from None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(path, f"not a readable safetensors file, truncated or corrupted ({first_line})") from None


def _check_zip_checksums(path: Path) -> None:
    """torch.load does not verify the CRC-32 that torch.save stores for every record, so
    bytes flipped inside a tensor would load as wrong numbers. About 1 s for 1.35 GB."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # not a zip (legacy format, or truncated): _torch_load says what it is
    if bad is not None:
        raise WeightsError(path, f"corrupted: record {bad!r} fails its CRC-32 checksum")


# What torch.load accepts: a zip archive (torch.save's format since 1.6), or the legacy format,
# a pickle stream whose first object is this number. Only the first bytes are needed to tell.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = (torch.serialization.MAGIC_NUMBER.to_bytes(10, "little"),  # pickle protocol 2+: LONG1 bytes
                 str(torch.serialization.MAGIC_NUMBER).encode())  # protocols 0 and 1: decimal text
_HEAD_BYTES = 64


def _is_zip_format(path: Path) -> bool:
    """True for torch.save's zip format, False for the legacy one; any other file is refused
    before anything is unpickled. Otherwise torch reads its first bytes as pickle opcodes and
    fails with a message about them (text starting "he" gives `KeyError: 101`, the memo index
    'e' after the opcode 'h')."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise WeightsError(path, f"cannot read ({e.strerror or e})") from None
    if head.startswith(_ZIP_MAGIC):
        return True
    if any(magic in head for magic in _LEGACY_MAGIC):
        return False
    raise WeightsError(path, f"not a PyTorch checkpoint (neither a zip archive nor a legacy torch file){_preview(head)}")


def _preview(head: bytes) -> str:
    """'; it starts with "..."' when the file begins with text: an HTML error page or a Git LFS
    pointer saved in place of the weights says so at once."""
    try:
        line = head.decode("utf-8").strip().splitlines()[0][:40]
    except (UnicodeDecodeError, IndexError):
        return ""
    return f"; it starts with {line!r}" if line.isprintable() else ""


def _torch_load(path: Path) -> object:
    """torch.load with weights_only (tensors and plain values, never code) and ALLOWED_GLOBALS,
    memory-mapped where torch allows (the zip format): only the tensors used are read from disk."""
    mmap = _is_zip_format(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(ALLOWED_GLOBALS):
            warnings.simplefilter("ignore")  # torch warns on old-format files; the error below says it all
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message is long; the useful part is the line naming what was refused
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported operand" in line), lines[0] if lines else "")
        if "GLOBAL" in detail:  # a pickled callable: code that weights_only refused to run
            named = re.search(r"GLOBAL (\S+)", detail)
            what = f"'{named.group(1)}'" if named else f"({detail})"
            raise WeightsError(path, f"refused: the file holds pickled code, not only tensors: the global {what} "
                                     "is not one a weights file may hold (nothing was run)") from None
        raise WeightsError(path, f"not a PyTorch checkpoint, or truncated or corrupted ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(path, f"not a readable PyTorch checkpoint, truncated or corrupted ({first_line})") from None
    return state


def _need(path: Path, state: dict, key: str, shape: tuple[int, ...] | None = None,
          layout: str = contract.LAYOUT_0_11_5) -> torch.Tensor:
    if key not in state:
        raise WeightsError(path, f"missing tensor {key!r} (not a {layout} prior layout)")
    tensor = state[key]
    if shape is not None and tuple(tensor.shape) != shape:
        raise WeightsError(path, f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _split_prior(path: Path, state: dict, layout: str = contract.LAYOUT_0_11_5) -> tuple[PriorConfig, dict[str, torch.Tensor]]:
    net = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    net_keys, layer_keys = _KEY_MAPS[layout]
    layers = sorted({int(m.group(1)) for k in net if (m := _LAYER_RE.fullmatch(k))})
    if not layers:
        raise WeightsError(path, "no prior transformer layers ('net.causal_transformer.layers.*' tensors)")
    if layers != list(range(len(layers))):
        raise WeightsError(path, f"prior layers are not numbered 0..{len(layers) - 1} (found {layers[:8]})")
    dim = _need(path, net, "learned_query").shape[0]
    dim_head = _need(path, net, "causal_transformer.layers.0.0.null_kv").shape[1]
    q_rows = _need(path, net, "causal_transformer.layers.0.0.to_q.weight").shape[0]
    ff_inner = _need(path, net, "causal_transformer.layers.0.1.5.weight").shape[1]
    num_timesteps = _need(path, net, "to_time_embeds.0.weight").shape[0]
    freqs = _need(path, net, f"causal_transformer.layers.0.{_ROTARY_SUFFIX}")
    buckets = _need(path, net, "causal_transformer.rel_pos_bias.relative_attention_bias.weight").shape[0]
    if q_rows % dim_head:
        raise WeightsError(path, f"to_q has {q_rows} rows, not a multiple of dim_head {dim_head}")
    cfg = PriorConfig(dim=dim, depth=len(layers), heads=q_rows // dim_head, dim_head=dim_head,
                      ff_inner=ff_inner, num_timesteps=num_timesteps, rotary_dim=2 * freqs.shape[0],
                      rel_pos_buckets=buckets)
    if layout == contract.LAYOUT_LATER:
        null_text = _need(path, net, "null_text_embed", layout=layout)
        if null_text.dim() != 3 or null_text.shape[0] != 1 or null_text.shape[1] < 1:
            raise WeightsError(path, f"tensor 'net.null_text_embed' has shape {tuple(null_text.shape)}, "
                                     f"expected (1, max_text_len, {dim})")
        cfg = replace(cfg, learned_padding=True, text_len=null_text.shape[1], norm_bias=False, stable_norm_out=True,
                      rel_pos_scale=float(PB_RELAX_ALPHA))
    if cfg.rotary_dim != min(32, dim_head):
        raise WeightsError(path, f"rotary frequencies cover {cfg.rotary_dim} dims, expected min(32, dim_head)")

    expected = _expected_prior_shapes(cfg)
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in net.items():
        if (m := _LAYER_RE.fullmatch(key)) and m.group(2) == _ROTARY_SUFFIX:
            if not torch.equal(tensor, freqs):
                raise WeightsError(path, f"'net.{key}' differs from layer 0's rotary frequencies")
            continue
        name = net_keys.get(key)
        if m and name is None:
            suffix = layer_keys.get(m.group(2))
            name = f"blocks.{m.group(1)}.{suffix}" if suffix else None
        if name is None:
            raise WeightsError(path, f"unexpected tensor 'net.{key}' (not a {layout} prior layout)")
        if tuple(tensor.shape) != expected[name]:
            raise WeightsError(path, f"tensor 'net.{key}' has shape {tuple(tensor.shape)}, expected {expected[name]}")
        ours[name] = tensor
    missing = sorted(set(expected) - set(ours) - {"rotary_freqs"})
    if missing:
        names = ", ".join(repr(f"net.{_file_key(name, layout)}") for name in missing[:3])
        raise WeightsError(path, f"missing tensor {names}{' and more' if len(missing) > 3 else ''} "
                                 f"(not a {layout} prior layout)")
    ours["rotary_freqs"] = freqs
    return cfg, ours


def _file_key(name: str, layout: str = contract.LAYOUT_0_11_5) -> str:
    """Our tensor name -> the file's name under "net." (for messages)."""
    net_keys, layer_keys = _KEY_MAPS[layout]
    if name == "rotary_freqs":
        return f"causal_transformer.layers.0.{_ROTARY_SUFFIX}"
    by_ours = {ours: theirs for theirs, ours in net_keys.items()}
    if name in by_ours:
        return by_ours[name]
    _, layer, rest = name.split(".", 2)  # blocks.{i}.{rest}
    by_ours_layer = {ours: theirs for theirs, ours in layer_keys.items()}
    return f"causal_transformer.layers.{layer}.{by_ours_layer[rest]}"


def _expected_prior_shapes(cfg: PriorConfig) -> dict[str, tuple[int, ...]]:
    d, inner, ff = cfg.dim, cfg.heads * cfg.dim_head, cfg.ff_inner
    shapes = {
        "learned_query": (d,),
        "time_embed.weight": (cfg.num_timesteps, d),
        "rel_pos_bias.weight": (cfg.rel_pos_buckets, cfg.heads),
        "norm_out.weight": (d,), "norm_out.bias": (d,),
        "project_out.weight": (d, d),
        "rotary_freqs": (cfg.rotary_dim // 2,),
    }
    if cfg.learned_padding:
        shapes["null_text_embed"] = (1, cfg.text_len, d)
    per_layer = {
        "attn.null_kv": (2, cfg.dim_head),
        "attn.norm.weight": (d,), "attn.norm.bias": (d,),
        "attn.to_q.weight": (inner, d),
        "attn.to_kv.weight": (2 * cfg.dim_head, d),
        "attn.to_out.weight": (d, inner),
        "attn.out_norm.weight": (d,), "attn.out_norm.bias": (d,),
        "ff.norm.weight": (d,), "ff.norm.bias": (d,),
        "ff.proj_in.weight": (2 * ff, d),
        "ff.inner_norm.weight": (ff,), "ff.inner_norm.bias": (ff,),
        "ff.proj_out.weight": (d, ff),
    }
    if not cfg.norm_bias:
        per_layer = {k: v for k, v in per_layer.items() if not k.endswith(".bias")}
        del shapes["norm_out.bias"]
    for i in range(cfg.depth):
        shapes.update({f"blocks.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _split_text(path: Path, state: dict, prior_dim: int) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    clip = {k[len("clip.clip."):]: v for k, v in state.items() if k.startswith("clip.clip.")}
    if not clip:
        raise WeightsError(path, "no CLIP weights ('clip.clip.*' tensors) in the file")
    vocab, width = _need(path, clip, "token_embedding.weight").shape
    context = _need(path, clip, "positional_embedding").shape[0]
    projection = _need(path, clip, "text_projection")
    layers = sorted({int(m.group(1)) for k in clip if (m := _TEXT_BLOCK_RE.fullmatch(k))})
    if not layers or layers != list(range(len(layers))):
        raise WeightsError(path, "CLIP text transformer blocks are missing or not numbered 0..n-1")
    if context != TEXT_LEN:
        raise WeightsError(path, f"CLIP context length is {context}, expected {TEXT_LEN}")
    if width % 64:
        raise WeightsError(path, f"CLIP text width {width} is not a multiple of 64 (heads = width // 64)")
    if width != prior_dim:  # the 77 text states are tokens of the prior's sequence
        raise WeightsError(path, f"CLIP text width {width} differs from the prior's width {prior_dim}")
    if tuple(projection.shape) != (width, prior_dim):
        raise WeightsError(path, f"'clip.clip.text_projection' has shape {tuple(projection.shape)}, "
                                 f"expected ({width}, {prior_dim}) to match the prior's width")
    cfg = TextConfig(width=width, layers=len(layers), heads=width // 64, context_length=context,
                     vocab_size=vocab, embed_dim=prior_dim)
    text = {k: v for k, v in clip.items()
            if k in _TEXT_TOP or (_TEXT_BLOCK_RE.fullmatch(k) and not k.startswith("visual."))}
    return cfg, text


def _split_schedule(path: Path, state: dict, num_timesteps: int) -> dict[str, torch.Tensor]:
    stray = next((k for k in state if k.startswith("noise_scheduler.")
                  and k.removeprefix("noise_scheduler.") not in FILE_SCHEDULE_BUFFERS), None)
    if stray is not None:
        raise WeightsError(path, f"unexpected tensor {stray!r} (not a dalle2-pytorch 0.11.5 noise schedule)")
    for name in FILE_SCHEDULE_BUFFERS:  # 13 x T numbers: cheap enough to check every load
        buffer = _need(path, state, f"noise_scheduler.{name}", (num_timesteps,))
        if not torch.isfinite(buffer.float()).all():
            raise WeightsError(path, f"tensor 'noise_scheduler.{name}' contains NaN or Inf")
    schedule = {name: state[f"noise_scheduler.{name}"] for name in SCHEDULE_BUFFERS}
    # Strided sampling recomputes the cosine schedule in float64 (see diffusion.py), so the
    # file's own schedule must be that one, up to its fp16 rounding.
    cosine = cosine_alphas_cumprod(num_timesteps)
    stored = schedule["alphas_cumprod"].double()
    if (stored - cosine).abs().max() > 2e-3:
        raise WeightsError(path, "noise schedule is not dalle2-pytorch's cosine schedule (alphas_cumprod differs)")
    return schedule
