"""The `prior` command (also `python -m prior`): embed, serve, batch, search, eval, weights.

Only the entry point lives here; nothing imports this module. Options come from
prior/arguments.py, their bounds from prior/contract.py.

Exit codes: 0 success; 2 a bad argument (one line on stderr naming it, the bound and the
value); 1 a bad weights file or any other failure (one line naming the file and the problem);
130 / 143 interrupted by Ctrl-C / SIGTERM (the line says what was left on disk).
Heavy imports (torch) happen after the arguments are checked, so mistakes are quick.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from . import batch, contract, evaluate, search, weights
from .arguments import (
    OneLineParser,
    add_sampling_arguments,
    add_trainer_entry_argument,
    as_flag_message,
    check_device,
    folder_path,
    int_in,
    load_for_sampling,
    progress_bar,
    prompt_text,
)
from .contract import ArgumentError, PriorError


def build_parser(prog: str = "prior") -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each command's own parser (for naming flags in errors)."""
    parser = OneLineParser(prog=prog, description="LAION's diffusion prior: text -> CLIP ViT-L/14 image embedding.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    embed = commands.add_parser("embed", help="embed one prompt and write .npy files and result.json")
    embed.add_argument("prompt", metavar="PROMPT", type=prompt_text, help="the text to turn into an image embedding")
    add_sampling_arguments(embed)
    add_trainer_entry_argument(embed)
    embed.add_argument("--out", type=folder_path, required=True, help="folder for the outputs (written only on success)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=run_embed)

    serve = commands.add_parser("serve", help="run cog's HTTP server for prior/predictor.py, without Docker")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int_in(1, 65535), default=5000, help="port (default: %(default)s)")
    serve.add_argument("--weights", default=None,
                       help=f"weights file (default: ${contract.WEIGHTS_ENV}, else {contract.WEIGHTS_NAME} "
                            "in the weights folder)")
    serve.add_argument("--max-concurrency", type=int_in(1, 1024), default=contract.MAX_CONCURRENCY,
                       help="predictions run at once, sampled together; above it requests get 409 "
                            "(default: %(default)s, as cog.yaml)")
    serve.set_defaults(run=run_serve)

    weights = commands.add_parser("weights", help="download, verify or convert the weights (prior weights --help)",
                                  add_help=False)
    weights.add_argument("rest", nargs=argparse.REMAINDER)
    weights.set_defaults(run=run_weights, prog=prog)

    batch.add_parser(commands)
    search.add_parser(commands)
    evaluate.add_parser(commands)
    return parser, dict(commands.choices)


def main(argv: list[str] | None = None, prog: str = "prior") -> int:
    """The `prior` command; `python -m prior` calls it with that prog name."""
    parser, commands = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        with contract.sigterm_as_interrupt():
            return args.run(args)
    except ArgumentError as e:
        print(f"{parser.prog} {args.command}: error: {as_flag_message(e, commands[args.command])}", file=sys.stderr)
        return 2
    except PriorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(getattr(args, "interrupted", "interrupted; nothing was written"), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, contract.Terminated) else signal.SIGINT)
    except Exception as e:  # one readable line; PRIOR_DEBUG=1 shows the traceback
        if os.environ.get("PRIOR_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}".splitlines()[0][:500], file=sys.stderr)
        return 1


def run_embed(args: argparse.Namespace) -> int:
    from .pipeline import result_record

    contract.check_output_folder("out", args.out)
    check_device(args.device)
    weights.fetch_default_weights(args.weights)  # only with $PRIOR_DOWNLOAD=1, as scripts/embed.sh sets it
    model = load_for_sampling(args)
    bar = progress_bar(args.steps, disable=args.quiet)
    try:
        result = model.embed(args.prompt, candidates=args.candidates, cond_scale=args.cond_scale, steps=args.steps,
                             seed=args.seed, guidance=args.guidance, sampler=args.sampler,
                             on_step=lambda i, total: bar.update(1))
    finally:
        bar.close()
    def written() -> None:  # runs with Ctrl-C held back: one landing now says what is on disk
        args.interrupted = f"interrupted; {args.out}/ holds the complete new outputs"

    contract.write_result(args.out, result, record=result_record(result, model), done=written)
    chosen = int(result.chosen[0])
    print(f"wrote {args.out}/ (candidate {chosen} of {args.candidates}, score {result.scores[0, chosen]:.4f}, "
          f"seed {result.seed}{', prompt truncated to 77 tokens' if result.truncated[0] else ''})")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(host=args.host, port=args.port, weights=args.weights, max_concurrency=args.max_concurrency)
    return 0


def run_weights(args: argparse.Namespace) -> int:
    return weights.main(args.rest, prog=f"{args.prog} weights")
