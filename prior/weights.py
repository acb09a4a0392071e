"""Fetch, check and convert the prior's weights file.

    python -m prior.weights download [--dest DIR] [--revision REV]   fetch prior_ema_fp16.pth into weights/
    python -m prior.weights verify [PATH] [--sha256 HEX]             check a file's SHA-256
    python -m prior.weights convert [SRC] [DST] [--dtype D]          write the .safetensors copy that loads faster

The download comes from Hugging Face (laion/DALLE2-PyTorch) through huggingface_hub, at a
pinned revision. Partial data is kept under DIR/.download/, so an interrupted download
resumes where it stopped, in the same run (dropped connections) or the next one. The file
reaches DIR/prior_ema_fp16.pth only once it is complete and its SHA-256 is the published one.

verify without --sha256 checks a .safetensors against the `.sha256` sidecar convert wrote
beside it, and any other file against the published prior_ema_fp16.pth's SHA-256; it also names
the layout it finds (which dalle2-pytorch network, plain state dict, trainer file or converted).

Exit 0 on success; 2 with one line on stderr for a bad argument; 1 with one line on stderr
when the network, the file or the disk fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from . import contract
from .arguments import (
    OneLineParser,
    add_trainer_entry_argument,
    as_flag_message,
    file_path,
    folder_path,
    sha256_argument,
)
from .contract import PRIOR_EMA_FP16_SHA256, ArgumentError, PriorError, WeightsError, sha256_of

HF_REPO = "laion/DALLE2-PyTorch"
HF_FILENAME = contract.WEIGHTS_NAME
# The commit that added the file ("add slim fp16 ema weights for prior"). Only its short
# hash is known; the SHA-256 check below pins the content whatever the revision resolves to.
HF_REVISION = "f19c9b6"
STAGING_NAME = ".download"  # under the destination directory: same disk, so the final move is a rename


class WeightsFileError(PriorError):
    """Downloading or checking failed; the message is one line for the user."""


def hub_url(revision: str = HF_REVISION, endpoint: str | None = None) -> str:
    """The file's address; `endpoint` defaults to $HF_ENDPOINT, else huggingface.co."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(HF_REPO, HF_FILENAME, revision=revision, endpoint=endpoint)


def verify(path: str | Path, expected_sha256: str | None = None) -> str:
    """Return the file's SHA-256 if it is the expected one; else raise WeightsFileError.

    With no expected hash, a .safetensors is checked against its `.sha256` sidecar (the
    converted file is not the published one) and any other file against the published
    prior_ema_fp16.pth's (contract.required_sha256). Always hashes the whole file, whatever a
    `.verified` stamp says.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: {'not a regular file' if path.exists() else 'file not found'}")
    try:
        expected = contract.required_sha256(path, expected_sha256, published=True)
    except WeightsError as e:
        raise WeightsFileError(str(e)) from None
    if expected is None:
        raise WeightsFileError(f"{path}: no {contract.sidecar_path(path).name} sidecar to check it against "
                               "(convert writes one; or give --sha256 HEX)")
    actual = sha256_of(path)
    if actual != expected:
        from_sidecar = expected_sha256 is None and path.suffix == ".safetensors"
        why = f" (from {contract.sidecar_path(path).name}): corrupted or changed since it was converted" if from_sidecar else ""
        raise WeightsFileError(f"{path}: SHA-256 is {actual}, expected {expected}{why}")
    return actual


def layout(path: str | Path) -> str:
    """The network layout and container of a weights file, in words (checkpoint.describe), or
    why none is recognised: verify reports it beside the hash, whose check it does not change."""
    from . import checkpoint

    try:
        return checkpoint.describe(path)
    except WeightsError as e:
        return f"not recognised ({e.problem})"


def download(dest: str | Path | None = None, revision: str = HF_REVISION,
             expected_sha256: str = PRIOR_EMA_FP16_SHA256, endpoint: str | None = None) -> Path:
    """Fetch prior_ema_fp16.pth into `dest` (resuming a partial download) and verify it.

    Returns the final path. A file already there with the right SHA-256 is kept as is.
    `dest` defaults to the weights folder (contract.weights_dir()).
    """
    dest = Path(dest) if dest is not None else contract.weights_dir()
    created = contract.missing_folders(dest)
    try:
        return _download(dest, revision, expected_sha256, endpoint)
    except BaseException:  # Ctrl-C included: a folder made for nothing is not left behind
        contract.remove_empty(created)
        raise


def fetch_default_weights(weights: Path | None) -> None:
    """With $PRIOR_DOWNLOAD=1 (scripts/embed.sh sets it) and no --weights, download the default
    weights file when it is missing; otherwise do nothing. Called once the arguments are checked."""
    if weights is not None or os.environ.get(contract.DOWNLOAD_ENV) != "1":
        return
    default = contract.default_weights()
    if contract.resolve_weights(default).exists() or default.name != contract.WEIGHTS_NAME:
        return
    try:
        download(default.parent)
    except WeightsFileError as e:
        raise WeightsFileError(f"{e}; pass --weights FILE, or fetch {contract.WEIGHTS_NAME} (1.35 GB) with "
                               f"`python -m prior.weights download` where there is a network and copy it to "
                               f"{default}") from None


def _download(dest: Path, revision: str, expected_sha256: str, endpoint: str | None) -> Path:
    final = dest / HF_FILENAME
    if final.is_file():
        try:
            verify(final, expected_sha256)
            print(f"{final} is already there and verified", file=sys.stderr)
            return final
        except WeightsFileError as e:
            print(f"replacing {e}", file=sys.stderr)
    staging = dest / STAGING_NAME
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsFileError(f"{dest}: cannot write there ({e.strerror or e})") from None

    url = hub_url(revision, endpoint)
    print(f"downloading {url}", file=sys.stderr)
    try:
        fetched = _fetch(url, staging)
    except Exception as e:  # network, HTTP, offline mode, disk: whatever it is, one line and no traceback
        if revision == HF_REVISION and _is_not_found(e):
            # Only the pinned commit's short hash is known; if the Hub does not resolve it,
            # main serves the same file, and the SHA-256 check below still pins the content.
            print(f"revision {revision} not found ({_reason(e)}); trying main", file=sys.stderr)
            return _download(dest, "main", expected_sha256, endpoint)
        _remove_if_nothing_to_resume(staging)
        raise WeightsFileError(f"cannot download {url}: {_reason(e)}") from None

    try:
        verify(fetched, expected_sha256)
    except WeightsFileError as e:
        fetched.unlink(missing_ok=True)  # never resume from, or keep, a wrong file
        _remove_if_nothing_to_resume(staging)
        raise WeightsFileError(f"downloaded file rejected and deleted: {e}") from None
    os.replace(fetched, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def _is_not_found(error: Exception) -> bool:
    """An HTTP 404 (or huggingface_hub's revision/entry-not-found errors), not a network failure."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) == 404 or isinstance(error, RevisionNotFoundError | EntryNotFoundError)


def _fetch(url: str, staging: Path) -> Path:
    """Download `url` into `staging`, continuing from the bytes a previous run left there.

    huggingface_hub's own hf_hub_download resumes a dropped connection within one run but
    deletes its partial file when the run fails, so a 1.35 GB download interrupted at 90%
    would start over. Here the partial file is ours: named by the file's ETag (so bytes of a
    different upload are never continued) and kept until the file is complete.
    """
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    # One quick look first, without retries: "no network at all" fails in a second instead
    # of after huggingface_hub's retry schedule.
    meta = get_hf_file_metadata(url)
    tag = "".join(c for c in meta.etag or "unknown" if c.isalnum())[:64]
    partial = staging / f"{HF_FILENAME}.{tag}.part"
    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have > meta.size:
        partial.unlink()
        have = 0
    if have:
        print(f"resuming from byte {have:,}", file=sys.stderr)
    with open(partial, "ab") as out:  # http_get asks for the rest with a Range header and shows a progress bar
        http_get(meta.location, out, resume_size=have, headers=build_hf_headers(), expected_size=meta.size,
                 displayed_filename=HF_FILENAME)
    return partial


def _reason(error: BaseException) -> str:
    """One line: the innermost cause is the telling one ("Connection refused",
    "offline mode is enabled", "Revision Not Found")."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _remove_if_nothing_to_resume(staging: Path) -> None:
    """Keep partial data for the next try; drop the folder if it holds none."""
    if not any(p.suffix == ".part" and p.stat().st_size > 0 for p in staging.glob("*")):
        shutil.rmtree(staging, ignore_errors=True)


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created (see _missing_folders)."""
    created = contract.missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        contract.remove_empty(created)
        raise WeightsFileError(f"{folder}: cannot create the folder ({e.strerror or e})") from None
    return created


def convert(src: str | Path, dst: str | Path | None = None, dtype: str | None = None,
            done: Callable[[], None] | None = None, trainer_entry: str | None = None) -> Path:
    """Write a safetensors copy of `src` (default: beside it, .safetensors) that loads faster,
    creating `dst`'s folder if needed (removed again if the conversion fails).
    dtype "float32" suits CPU inference (no conversion at load); default keeps float16.
    A `dst` that is `src` itself, or not named .safetensors (nothing would read it), is an
    ArgumentError: the source is never touched. `done` runs once the file and its sidecar are
    in place, before a held back Ctrl-C lands. From a dalle2-pytorch trainer file, the network
    `trainer_entry` names is converted (default its EMA network)."""
    src = Path(src)
    dst = src.with_suffix(".safetensors") if dst is None else Path(dst)
    if dst.suffix != ".safetensors":
        raise ArgumentError("dst", f"must end in .safetensors (what loaders recognise), got {repr(str(dst))}")
    if dst.resolve() == src.resolve() or (dst.exists() and src.exists() and dst.samefile(src)):
        raise ArgumentError("dst", f"must differ from SRC, got {repr(str(dst))} (it would overwrite the source)")
    if dtype is not None:
        contract.check_choice("dtype", dtype, CONVERT_DTYPES)
    if trainer_entry is not None:
        contract.check_choice("trainer_entry", trainer_entry, contract.TRAINER_ENTRIES)
    import torch

    from . import checkpoint

    created = _make_folder(dst.parent)
    try:
        checkpoint.convert_to_safetensors(src, dst, dtype=getattr(torch, dtype) if dtype else None, done=done,
                                          trainer_entry=trainer_entry)
    except BaseException as e:  # Ctrl-C included: nothing is left behind, not even the folder
        contract.remove_empty(created)
        if isinstance(e, WeightsError):
            raise WeightsFileError(str(e)) from None
        raise
    return dst


CONVERT_DTYPES = ("float16", "float32", "bfloat16")


def build_parser(prog: str = "python -m prior.weights") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="Fetch, check and convert the prior's weights.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    default = contract.default_weights()

    fetch = commands.add_parser("download", help=f"fetch {HF_FILENAME} from Hugging Face {HF_REPO} and verify it")
    fetch.add_argument("--dest", type=folder_path, default=None,
                       help=f"folder for the file (default: {contract.weights_dir()})")
    fetch.add_argument("--revision", default=HF_REVISION, help="Hugging Face revision (default: %(default)s)")

    check = commands.add_parser("verify", help="check a weights file's SHA-256")
    check.add_argument("path", nargs="?", type=file_path, default=default, help="default: %(default)s")
    check.add_argument("--sha256", type=sha256_argument, default=None,
                       help="expected SHA-256 (default: a .safetensors file's .sha256 sidecar, else the published .pth's)")

    conv = commands.add_parser("convert", help="write a .safetensors copy that loads faster")
    conv.add_argument("src", metavar="SRC", nargs="?", type=file_path, default=default, help="default: %(default)s")
    conv.add_argument("dst", metavar="DST", nargs="?", type=file_path, default=None,
                      help="default: SRC with the suffix .safetensors")
    conv.add_argument("--dtype", choices=CONVERT_DTYPES, default=None,
                      help="precision to store (default: the source's, float16); the one inference runs in loads fastest "
                           "(float32 or bfloat16 on a CPU)")
    add_trainer_entry_argument(conv)
    parser.commands = dict(commands.choices)  # each command's parser, for naming flags in errors
    return parser


INTERRUPTED = {  # only a download keeps what it had, to resume from
    "download": "interrupted; run the same command again to resume",
    "verify": "interrupted",
    "convert": "interrupted; nothing was written",
}


def main(argv: list[str] | None = None, prog: str = "python -m prior.weights") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    interrupted = INTERRUPTED[args.command]

    def converted() -> None:  # runs with Ctrl-C held back: one landing now says what is on disk
        nonlocal interrupted
        interrupted = "interrupted; the converted file and its sidecar were written"

    try:
        with contract.sigterm_as_interrupt():
            if args.command == "download":
                path = download(args.dest, args.revision)
                print(f"{path}: OK (SHA-256 {PRIOR_EMA_FP16_SHA256})")
            elif args.command == "verify":
                print(f"{args.path}: OK (SHA-256 {verify(args.path, args.sha256)}); layout: {layout(args.path)}")
            else:
                print(f"wrote {convert(args.src, args.dst, args.dtype, done=converted, trainer_entry=args.trainer_entry)}")
    except ArgumentError as e:
        print(f"{prog} {args.command}: error: {as_flag_message(e, parser.commands[args.command])}", file=sys.stderr)
        return 2
    except PriorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, contract.Terminated) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
