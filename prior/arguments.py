"""Command-line options, built from the contract (prior/contract.py).

Every command (`prior embed`, `batch`, `search`, `eval`, `weights`) takes its options from here,
so each flag has one spelling, one bound and one message. A bad value is one line on stderr
naming the flag, the bound and what arrived, exit 2. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from . import contract
from .contract import ArgumentError


class OneLineParser(argparse.ArgumentParser):
    """A bad argument is one line on stderr, exit 2 (argparse's default prints the usage too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(check: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a contract check: its ArgumentError becomes argparse's message."""

    def parse(text: str):
        try:
            return check(text)
        except ArgumentError as e:
            raise argparse.ArgumentTypeError(e.problem) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def int_in(low: int, high: int):
    return _typed(lambda text: contract.parse_int("value", text, low, high))


def float_in(low: float, high: float):
    return _typed(lambda text: contract.parse_float("value", text, low, high))


prompt_text = _typed(lambda text: contract.check_prompt("prompt", text))
sha256_argument = _typed(lambda text: contract.check_sha256("sha256", text))


def folder_path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("must be a folder path, got ''")
    return Path(text)


def file_path(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("must be a file path, got ''")
    return Path(text)


def steps_count(text: str) -> int:
    """--steps as parsed; its upper bound, the checkpoint's timesteps, is checked once it is loaded."""
    if not contract._ASCII_INT.fullmatch(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 1 to the checkpoint's timesteps (1000 for LAION's prior), got {contract.shown(text)}")
    return int(text)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that samples; defaults and bounds from the contract."""
    low, high = contract.CANDIDATES
    scale_low, scale_high = contract.COND_SCALE
    parser.add_argument("--weights", type=file_path, default=None,
                        help="prior_ema_fp16.pth-format file, or its converted .safetensors "
                             f"(default: ${contract.WEIGHTS_ENV}, else {contract.WEIGHTS_NAME} in the weights folder)")
    parser.add_argument("--sha256", type=sha256_argument, default=None, help="refuse the weights unless their SHA-256 is this")
    parser.add_argument("--candidates", type=int_in(low, high), default=contract.DEFAULT_CANDIDATES,
                        help=f"image embeddings sampled per prompt; the one closest to the text is kept "
                             f"({low}..{high}, default {contract.DEFAULT_CANDIDATES})")
    parser.add_argument("--cond-scale", type=float_in(scale_low, scale_high), default=contract.DEFAULT_COND_SCALE,
                        help=f"classifier-free guidance scale; 1 disables guidance ({scale_low:g}..{scale_high:g}, "
                             f"default {contract.DEFAULT_COND_SCALE:g})")
    parser.add_argument("--steps", type=steps_count, default=None,
                        help="sampling steps, 1 to the checkpoint's timesteps (1000 for LAION's); all of them with "
                             "--sampler ddpm is the original's exact sampler "
                             f"(default {contract.DEFAULT_STEPS}, or all if fewer)")
    parser.add_argument("--seed", type=int_in(0, contract.SEED_LIMIT - 1), default=None,
                        help=f"random seed (0..{contract.SEED_LIMIT - 1}); drawn and reported when omitted")
    parser.add_argument("--guidance", choices=contract.GUIDANCE, default=contract.DEFAULT_GUIDANCE,
                        help="'original' reproduces dalle2-pytorch 0.11.5 exactly, its text-mask quirk included; "
                             f"'standard' is textbook classifier-free guidance (default {contract.DEFAULT_GUIDANCE})")
    parser.add_argument("--sampler", choices=contract.SAMPLERS, default=contract.DEFAULT_SAMPLER,
                        help=f"sampling method (default {contract.DEFAULT_SAMPLER}); ddpm at all steps is the original's")
    parser.add_argument("--device", choices=contract.DEVICES, default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", choices=contract.DTYPES, default=None,
                        help="network precision (default: float16 on cuda, float32 on cpu)")


def add_batch_size_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    low, high = contract.BATCH_SIZE
    parser.add_argument("--batch-size", type=int_in(low, high), default=contract.DEFAULT_BATCH_SIZE,
                        help=f"prompts per forward pass ({low}..{high}, default {contract.DEFAULT_BATCH_SIZE}){note}")


def add_trainer_entry_argument(parser: argparse.ArgumentParser) -> None:
    """Which network of a dalle2-pytorch trainer file to read."""
    parser.add_argument("--trainer-entry", choices=contract.TRAINER_ENTRIES, default=None,
                        help="for a dalle2-pytorch trainer file: the network to read, the EMA one "
                             f"('{contract.DEFAULT_TRAINER_ENTRY}', the default) or the online one ('model')")


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """field (an option's dest) -> the flag a user typed (`--cond-scale`, or a positional's METAVAR)."""
    names = {}
    for action in parser._actions:
        if action.option_strings:
            names[action.dest] = action.option_strings[-1] if action.option_strings[-1].startswith("--") \
                else action.option_strings[0]
        else:
            names[action.dest] = action.metavar or action.dest.upper()
    return names


def as_flag_message(error: ArgumentError, parser: argparse.ArgumentParser) -> str:
    """An ArgumentError as argparse words it: 'argument --out: must be ...'."""
    flag = flag_names(parser).get(error.field, error.field)
    return f"argument {flag}: {error.problem}"


# -- what the options resolve to, once parsed (heavy imports happen here, after the checks) ---------


def check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ArgumentError("device", "must be cpu or an available cuda device, got 'cuda' (no CUDA device here)")


def resolve_steps(steps: int | None, num_timesteps: int) -> int:
    """--steps for a loaded checkpoint: DEFAULT_STEPS when not given (all of a shorter schedule),
    else at most the checkpoint's timesteps."""
    if steps is None:
        return min(contract.DEFAULT_STEPS, num_timesteps)
    if steps > num_timesteps:
        raise ArgumentError("steps", f"must be at most {num_timesteps} for this checkpoint, got {steps}")
    return steps


def load_for_sampling(args: argparse.Namespace):
    """The Prior named by add_sampling_arguments' options, with args.steps resolved against it.
    A bad weights file raises WeightsError."""
    from .pipeline import load

    model = load(args.weights, device=args.device, dtype=args.dtype, expected_sha256=args.sha256,
                 trainer_entry=getattr(args, "trainer_entry", None))
    args.steps = resolve_steps(args.steps, model.config.num_timesteps)
    return model


def progress_bar(total: int, disable: bool, desc: str = "sampling", unit: str = "step", initial: int = 0):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False,
                dynamic_ncols=True)
