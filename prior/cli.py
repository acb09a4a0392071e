"""Command line: `python -m prior embed|serve ...`.

Exit codes: 0 success; 2 a bad argument (one line on stderr naming it, the bound and the
value); 1 a bad weights file or any other failure (one line naming the file and the problem).
Heavy imports (torch) happen after the arguments are checked, so mistakes are quick.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from . import DEFAULT_STEPS

SEED_LIMIT = 2**32
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "prior_ema_fp16.pth"


class ArgumentError(Exception):
    """A bad argument; the message names it, the bound and what arrived."""


class CommandError(Exception):
    """A failure that is not a bad argument (a bad weights file): one line, exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """Every command's parser (prior.weights' too): a bad argument is one line on stderr, exit 2."""

    def error(self, message: str):  # argparse's default prints the usage too: keep one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in {low}..{high}, got {value}")
        return value

    return parse


def steps_count(text: str) -> int:
    """--steps as parsed; its upper bound, the checkpoint's timesteps, is checked by resolve_steps
    once the checkpoint is loaded."""
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 1 to the checkpoint's timesteps (1000 for LAION's prior), got {text!r}")
    return value


def resolve_steps(steps: int | None, num_timesteps: int) -> int:
    """--steps for a loaded checkpoint: DEFAULT_STEPS when not given (all of a shorter schedule),
    else at most the checkpoint's timesteps."""
    if steps is None:
        return min(DEFAULT_STEPS, num_timesteps)
    if steps > num_timesteps:
        raise ArgumentError(f"argument --steps: must be at most {num_timesteps} for this checkpoint, got {steps}")
    return steps


def float_in(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number in {low:g}..{high:g}, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number in {low:g}..{high:g}, got {text}")
        return value

    return parse


def prompt_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be non-empty text (not only whitespace), got {text!r}")
    return text


def is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def sha256_argument(text: str) -> str:
    """--sha256, for every command that takes one."""
    if not is_sha256(text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits, got {text!r}")
    return text.lower()


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that samples."""
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="prior_ema_fp16.pth-format file, or its converted .safetensors (default: %(default)s)")
    parser.add_argument("--sha256", type=sha256_argument, default=None, help="refuse the weights unless their SHA-256 is this")
    parser.add_argument("--candidates", type=int_in(1, 32), default=2,
                        help="image embeddings sampled per prompt; the one closest to the text is kept (1..32, default 2)")
    parser.add_argument("--cond-scale", type=float_in(0, 5), default=1.0,
                        help="classifier-free guidance scale; 1 disables guidance (0..5, default 1)")
    parser.add_argument("--steps", type=steps_count, default=None,
                        help="sampling steps, 1 to the checkpoint's timesteps (1000 for LAION's); all of them with "
                             f"--sampler ddpm is the original's exact sampler (default {DEFAULT_STEPS}, or all if fewer)")
    parser.add_argument("--seed", type=int_in(0, SEED_LIMIT - 1), default=None,
                        help=f"random seed (0..{SEED_LIMIT - 1}); drawn and reported when omitted")
    parser.add_argument("--guidance", choices=("original", "standard"), default="original",
                        help="'original' reproduces dalle2-pytorch 0.11.5 exactly, its text-mask quirk included; "
                             "'standard' is textbook classifier-free guidance (default original)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm",
                        help="'ddpm' is ancestral sampling as the original; 'ddim' is deterministic given the seed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="network precision (default: float16 on cuda, float32 on cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m prior", description="LAION's diffusion prior: text -> CLIP ViT-L/14 image embedding.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    embed = commands.add_parser("embed", help="embed one prompt and write .npy files and result.json")
    embed.add_argument("prompt", metavar="PROMPT", type=prompt_text, help="the text to turn into an image embedding")
    add_sampling_arguments(embed)
    embed.add_argument("--out", type=Path, required=True, help="directory for the outputs (written only on success)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=run_embed)

    serve = commands.add_parser("serve", help="run cog's HTTP server for predict.py, without Docker")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int_in(1, 65535), default=5000, help="port (default: %(default)s)")
    serve.add_argument("--weights", type=Path, default=None, help="weights file (default: weights/prior_ema_fp16.pth)")
    serve.set_defaults(run=run_serve)

    for name in ("batch", "search"):  # commands that live in their own modules
        module = _optional_command(name)
        if module is not None:
            module.add_parser(commands)
    return parser


def _optional_command(name: str):
    """prior.batch / prior.search: each defines add_parser(commands), which sets `run`."""
    import importlib

    try:
        return importlib.import_module(f"prior.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"prior.{name}":
            raise
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ArgumentError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line; PRIOR_DEBUG=1 shows the traceback
        if os.environ.get("PRIOR_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1


def check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgumentError("argument --device: must be cpu or an available cuda device, got 'cuda' (no CUDA device here)")


def check_output_dir(out: Path) -> None:
    """Fail before any work if `out` could not be written; create nothing."""
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"argument --out: must be a directory, got {str(out)!r} (an existing file)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"argument --out: must be writable, got {str(out)!r} ({str(existing)!r} is not writable)")


def load_for_sampling(args: argparse.Namespace):
    """The Prior named by add_sampling_arguments' options, with args.steps resolved against it.
    A bad weights file raises CommandError."""
    from .checkpoint import WeightsError  # heavy imports only once the arguments are good
    from .pipeline import load

    try:
        model = load(args.weights, device=args.device, dtype=args.dtype, expected_sha256=args.sha256)
    except WeightsError as e:
        raise CommandError(str(e)) from None
    args.steps = resolve_steps(args.steps, model.config.num_timesteps)
    return model


def run_embed(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    check_device(args.device)
    model = load_for_sampling(args)

    bar = _progress_bar(args.steps, disable=args.quiet)
    try:
        result = model.embed(args.prompt, candidates=args.candidates, cond_scale=args.cond_scale, steps=args.steps,
                             seed=args.seed, guidance=args.guidance, sampler=args.sampler,
                             on_step=lambda i, total: bar.update(1))
    finally:
        bar.close()
    write_outputs(args.out, result, model)
    chosen = int(result.chosen[0])
    print(f"wrote {args.out}/ (candidate {chosen} of {args.candidates}, score {result.scores[0, chosen]:.4f}, "
          f"seed {result.seed}{', prompt truncated to 77 tokens' if result.truncated[0] else ''})")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(host=args.host, port=args.port, weights=args.weights)  # replaces this process; returns only by raising
    return 1


def _progress_bar(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, disable=disable, leave=False)


def result_record(result, model, row: int = 0) -> dict:
    """The JSON description of one prompt's result."""
    import numpy
    import torch

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
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "packed_weights": bool(model.packed),  # CPU matmuls on oneDNN-prepacked weights (prior/packed.py)
        "load_seconds": round(model.load_seconds, 4),
        "sample_seconds": round(result.sample_seconds, 4),
        "versions": {
            "conditioned_prior": __version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
    }


def write_outputs(out: Path, result, model, row: int = 0) -> None:
    """Write the .npy files and result.json for one prompt, all or nothing.

    Everything goes to a fresh temporary directory first; only a complete set is moved into
    place. A new `out` is staged beside it and renamed; an existing one (whose parent may be
    read-only, as for --out ~) is staged inside it and its files replaced one by one.
    """
    import numpy as np

    out = Path(out)
    exists = out.is_dir()
    if not exists:
        out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out if exists else out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a new `out` gets the mode any mkdir would give it
    try:
        np.save(staging / "text_tokens.npy", result.tokens[row : row + 1].astype(np.int64))
        np.save(staging / "text_embedding.npy", result.text_embedding[row : row + 1].astype(np.float32))
        np.save(staging / "image_embedding.npy", result.image_embedding[row : row + 1].astype(np.float32))
        np.save(staging / "candidates.npy", result.candidates[row].astype(np.float32))
        (staging / "result.json").write_text(json.dumps(result_record(result, model, row), indent=2) + "\n")
        if not exists:
            staging.rename(out)
            return
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

