"""The contract every edge shares: bounds, defaults, choices, errors, files.

The CLI, the Python API, the cog predictor, the batch job and search all read from here:
- what a request may ask for (bounds, defaults, choices) and how a value is checked;
- the error types (a message is one line for a user: the field or file, the bound, what arrived);
- where the default weights live, and which file a weights path resolves to;
- the SHA-256 a weights file must have;
- how files are written: whole or not at all (`atomic_path`, `write_folder`), and the result files.

Nothing here imports torch, so a command checks its arguments in milliseconds, before the
heavy imports. prior/predictor.py spells its `Input(...)` bounds as literals (cog's static parser
reads that file without running it); tests/test_cog.py checks that they equal these.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

# -- what a request may ask for -------------------------------------------------------------------

CANDIDATES = (1, 32)  # image embeddings sampled per prompt (inclusive bounds)
DEFAULT_CANDIDATES = 2
COND_SCALE = (0.0, 5.0)  # classifier-free guidance scale; 1 = none
DEFAULT_COND_SCALE = 1.0
DEFAULT_STEPS = 64  # sampling steps when none are given; all of a shorter schedule
BATCH_SIZE = (1, 65536)  # prompts per forward pass of the batch and eval commands (inclusive bounds)
DEFAULT_BATCH_SIZE = 64
SEED_LIMIT = 2**32  # seeds are 0 .. SEED_LIMIT - 1
# "original": dalle2-pytorch 0.11.5 exactly, its in-place text-mask quirk included (see README);
# "standard": textbook classifier-free guidance.
GUIDANCE = ("original", "standard")
DEFAULT_GUIDANCE = "original"
# prior.diffusion.SAMPLERS maps each name to its function. "ddpm" over all T steps is 0.11.5's
# own sampler (the parity tests' and the oracle's); the default keeps its distribution in 64
# steps, where the respaced DDPM shrinks it (bench/mixture.py, README "Samplers").
SAMPLERS = ("ddpm", "ddim", "sde-dpmpp-2m", "dpmpp-2m")
DEFAULT_SAMPLER = "sde-dpmpp-2m"
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
MAX_CONCURRENCY = 32  # predictions a server runs at once (cog.yaml's concurrency.max): see README "Serving"
PROMPT_MAX_CHARS = 10_000  # the HTTP API's bound on a prompt (prior/predictor.py's max_length); CLIP reads 77 tokens
SHORTENED = 80  # a value longer than this is shortened in messages (a SHA-256 is not)


# -- errors ---------------------------------------------------------------------------------------


class PriorError(Exception):
    """Base of the errors this package raises on purpose; the message is one line for a user."""


class ArgumentError(PriorError, ValueError):
    """A bad argument. `field` is its name as the caller passed it (`candidates`, `out`, `prompt`);
    the message names it, the bound and what arrived. The CLI shows the matching flag instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class WeightsError(PriorError, ValueError):
    """A weights file that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


class OutputError(PriorError):
    """Outputs that could not be written (disk full, no permission, an entry in the way).
    Nothing was changed: a folder holds its old files or the complete new set."""

    def __init__(self, path: str | Path, problem: str, reason: str | None = None):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.reason = str(path), problem, reason or problem


def shown(value: object) -> str:
    """repr(value), shortened to SHORTENED characters for messages."""
    text = repr(value)
    return text if len(text) <= SHORTENED else text[: SHORTENED - 5] + "...'" + f" ({len(str(value)):,} characters)"


def os_reason(error: OSError) -> str:
    """The OS's words for a failed file operation ("No space left on device")."""
    return error.strerror or type(error).__name__


# -- checking values --------------------------------------------------------------------------------

_ASCII_INT = re.compile(r"[+-]?[0-9]{1,30}")
_ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")


def parse_int(field: str, text: str, low: int, high: int) -> int:
    """Text as typed on a command line: plain ASCII decimal digits only (no '1_0', no other
    scripts' digits, no spaces), in low..high."""
    if not _ASCII_INT.fullmatch(text):
        raise ArgumentError(field, f"must be an integer in {low}..{high}, got {shown(text)}")
    if not low <= int(text) <= high:
        raise ArgumentError(field, f"must be an integer in {low}..{high}, got {text}")
    return int(text)


def parse_float(field: str, text: str, low: float, high: float) -> float:
    """Text as typed on a command line: a plain ASCII decimal number, in low..high; -0 is 0."""
    if not _ASCII_FLOAT.fullmatch(text) or not low <= float(text) <= high:
        raise ArgumentError(field, f"must be a finite number in {low:g}..{high:g}, got {shown(text)}")
    return float(text) + 0.0  # -0.0 + 0.0 is 0.0


def is_integer(value: object) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_int(field: str, value: object, low: int, high: int) -> int:
    if not is_integer(value) or not low <= value <= high:
        raise ArgumentError(field, f"must be an integer in {low}..{high}, got {shown(value)}")
    return int(value)


def check_real(field: str, value: object, low: float, high: float) -> float:
    """Any real number type (int, float, numpy, Fraction) as a float; -0.0 becomes 0.0."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ArgumentError(field, f"must be a finite number in {low:g}..{high:g}, got {shown(value)}")
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise ArgumentError(field, f"must be a finite number in {low:g}..{high:g}, got {shown(value)}")
    return number + 0.0  # -0.0 + 0.0 is 0.0


def check_choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(field, f"must be one of {', '.join(choices)}, got {shown(value)}")
    return value


# Characters that show nothing: every character str.isspace() calls whitespace, the C0 and C1
# controls (NUL included), and the invisible formatting characters (soft hyphen, zero-width
# space and joiners, direction marks, word joiner, BOM, variation selectors, Hangul fillers).
# Spelled as explicit ranges, so that cog's HTTP validator (Rust regex) reads PROMPT_PATTERN as
# Python does; prior/predictor.py's `regex=` literal must equal PROMPT_PATTERN (tests/test_cog.py).
INVISIBLE = (r"\x00-\x20\x7f-\xa0\xad\u034f\u061c\u115f\u1160\u1680\u17b4\u17b5\u180b-\u180f\u2000-\u200f"
             r"\u2028-\u202f\u205f-\u206f\u3000\u3164\ufe00-\ufe0f\ufeff\uffa0")
# A prompt must hold a character outside INVISIBLE. Anchored at both ends, so that search, match
# and fullmatch agree, and a search stays linear.
PROMPT_PATTERN = rf"^[\s\S]*[^{INVISIBLE}][\s\S]*$"
_INVISIBLE = re.compile(f"[{INVISIBLE}]*")


def check_prompt(field: str, value: object) -> str:
    """Text holding at least one visible character (PROMPT_PATTERN). Any length: a long prompt
    costs a scan of its leading whitespace and invisible characters, a piece at a time (no copy
    of the whole text; str.isspace in C before the regex)."""
    if not isinstance(value, str) or not any(not piece.isspace() and not _INVISIBLE.fullmatch(piece)
                                             for piece in (value[i : i + 65_536] for i in range(0, len(value), 65_536))):
        raise ArgumentError(field, f"must be non-empty text (not only whitespace or invisible characters), got {shown(value)}")
    return value


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def check_sha256(field: str, value: object) -> str | None:
    """None, or 64 hexadecimal digits (returned lower-case)."""
    if value is None:
        return None
    if not is_sha256(value):
        raise ArgumentError(field, f"must be 64 hexadecimal digits, got {shown(value)}")
    return value.lower()


# -- weights: where they live, which file a path means, which hash it must have ---------------------

WEIGHTS_NAME = "prior_ema_fp16.pth"  # LAION's file
WEIGHTS_ENV = "PRIOR_WEIGHTS"  # a weights file to use instead of the default
CACHE_ENV = "PRIOR_CACHE"  # a folder for the default weights outside a source checkout
DOWNLOAD_ENV = "PRIOR_DOWNLOAD"  # "1": `prior embed` downloads the default weights when they are missing
# sha256 of LAION's file (huggingface.co/laion/DALLE2-PyTorch, prior_ema_fp16.pth)
PRIOR_EMA_FP16_SHA256 = "b7d6ec6be12f285c0cd128655974b544885a49a3ff17feb5346226fea59757fa"
CONVERTED_FORMAT = "conditioned-prior/1"  # the metadata tag of our converted .safetensors files
# A dalle2-pytorch trainer file (DiffusionPriorTrainer.save) holds the EMA network and the online one;
# which to read (default: the EMA one, what LAION's published files are).
TRAINER_ENTRIES = ("ema_model", "model")
# The network layouts a weights file may hold, named by the dalle2-pytorch versions that wrote them.
LAYOUT_0_11_5 = "dalle2-pytorch 0.11.5"  # prior_ema_fp16.pth, prior_aes_finetune.pth
LAYOUT_LATER = "dalle2-pytorch 0.23.1-1.8.x"  # prior/latest.pth, prior/best.pth, aesthetic/best.pth
LAYOUTS = (LAYOUT_0_11_5, LAYOUT_LATER)
LATER_CONFIG_NAME = "prior_config.json"  # read beside a later-layout file when present
DEFAULT_TRAINER_ENTRY = "ema_model"


def weights_dir() -> Path:
    """Where the default weights go: `weights/` of a source checkout; installed as a package,
    $PRIOR_CACHE, else $XDG_CACHE_HOME/conditioned-prior (~/.cache/conditioned-prior); never
    inside site-packages."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "weights" / "README.md").is_file():
        return checkout / "weights"
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "conditioned-prior"


def default_weights() -> Path:
    """$PRIOR_WEIGHTS, else prior_ema_fp16.pth in weights_dir()."""
    return Path(os.environ.get(WEIGHTS_ENV) or weights_dir() / WEIGHTS_NAME)


def resolve_weights(path: str | Path | None = None, expected_sha256: str | None = None,
                    trainer_entry: str | None = None) -> Path:
    """The file to load for `path` (None: default_weights()).

    A `.pth` with a `.safetensors` beside it that was converted from it as it is now (its size
    and mtime as recorded at conversion, else its SHA-256) means that `.safetensors`, which
    loads faster. A stale one, left from a replaced `.pth`, is ignored with a warning on
    stderr. With an expected SHA-256 the named file itself is loaded: the hash pins it. So is
    a trainer file whose conversion holds another entry than `trainer_entry`.
    """
    path = Path(path) if path is not None else default_weights()
    converted = path.with_suffix(".safetensors")
    if expected_sha256 is not None or path.suffix == ".safetensors" or not converted.is_file():
        return path
    if not converted_entry_matches(safetensors_metadata(converted) or {}, trainer_entry):
        return path
    if not path.exists() or converted_from(converted, path):
        return converted
    print(f"warning: ignoring {converted.name}: not converted from {path.name} as it is now; loading {path.name} "
          "(run `prior weights convert` again to load faster)", file=sys.stderr)
    return path


def safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The `__metadata__` of a .safetensors file's header, read without torch; None if the file
    is not a readable safetensors file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def converted_entry_matches(metadata: dict[str, str], trainer_entry: str | None) -> bool:
    """Whether a converted file (its metadata) holds the network `trainer_entry` asks for: the
    conversion of a trainer file records the entry it took; that of a plain state dict none,
    and it answers only when no entry is asked for."""
    recorded = metadata.get("trainer_entry")
    if recorded is None:
        return trainer_entry is None
    return recorded == (trainer_entry or DEFAULT_TRAINER_ENTRY)


def converted_from(converted: str | Path, source: str | Path) -> bool:
    """Whether `converted` was written by `prior weights convert` from `source` as it is now:
    cheap when the source's size and mtime are those recorded; when only the mtime differs
    (a copy, a touch) the source's SHA-256 decides."""
    metadata = safetensors_metadata(converted)
    try:
        stat = Path(source).stat()
    except OSError:
        return False
    if not metadata or metadata.get("format") != CONVERTED_FORMAT or metadata.get("source_size") != str(stat.st_size):
        return False
    if metadata.get("source_mtime_ns") == str(stat.st_mtime_ns):
        return True
    return metadata.get("source_sha256") == sha256_of(source)


def sha256_of(path: str | Path, chunk: int = 1 << 24) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sidecar_sha256(path: str | Path) -> str | None:
    """The SHA-256 in `path`'s `.sha256` sidecar ("HEX  NAME", as sha256sum writes it), or None
    when there is no sidecar. A sidecar that cannot be read or holds no hash is a WeightsError
    naming the sidecar."""
    sidecar = sidecar_path(path)
    try:
        data = sidecar.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise WeightsError(sidecar, f"cannot read ({os_reason(e)})") from None
    fields = data[:200].split()
    recorded = fields[0].decode("ascii", errors="replace") if fields else ""
    if not is_sha256(recorded):
        raise WeightsError(sidecar, "does not hold a SHA-256 (64 hexadecimal digits)")
    return recorded.lower()


def required_sha256(path: str | Path, given: str | None = None, published: bool = False) -> str | None:
    """The SHA-256 `path` must have: `given`, else a `.safetensors` file's sidecar, else (with
    `published`, as `verify` asks) LAION's published hash for any other file, else None (not
    checked: a .pth is checked by its zip records' CRC-32 instead; a .safetensors without a
    sidecar has nothing to be checked against)."""
    if given is not None:
        return given.lower()
    if Path(path).suffix == ".safetensors":
        return sidecar_sha256(path)
    return PRIOR_EMA_FP16_SHA256 if published else None


# -- writing files whole ----------------------------------------------------------------------------


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a container stopping), raised like Ctrl-C so the same clean-up runs."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _in_main_thread(apply: Callable[[], object], undo: Callable[[object], object]) -> Iterator[None]:
    """apply() before the body and undo(what it returned) after; nothing outside the main
    thread, where signal handlers and masks cannot be changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = apply()
    try:
        yield
    finally:
        undo(previous)


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """While the body runs (in the main thread), SIGTERM raises Terminated, a KeyboardInterrupt."""
    return _in_main_thread(lambda: signal.signal(signal.SIGTERM, _raise_terminated),
                           lambda previous: signal.signal(signal.SIGTERM, previous))


def signals_deferred() -> contextlib.AbstractContextManager[None]:
    """Hold SIGINT and SIGTERM back while the body runs (a few renames), so that a Ctrl-C or a
    kill lands before or after them, never between: what is on disk is then the old state or the
    new one, and the message printed says which. Only the main thread can do this."""
    held = {signal.SIGINT, signal.SIGTERM}
    return _in_main_thread(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, held),
                           lambda previous: signal.pthread_sigmask(signal.SIG_SETMASK, previous))


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o666, done: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` (named `.STEM.*SUFFIX.partial`, which readers' globs skip:
    write it through an open file, as np.save would append .npy to a bare path); once the body
    has written it, it is flushed to disk and renamed to `path` (`mode` under the umask). If the
    body fails, Ctrl-C included, the temporary file is removed and `path` is untouched. Write
    failures are OutputError naming `path`. `done` runs right after the rename, before a held
    back Ctrl-C lands: it records that the file is written (for the message an interruption prints)."""
    with atomic_paths([path], mode, done) as (partial,):
        yield partial


@contextlib.contextmanager
def atomic_paths(paths: list[str | Path], mode: int = 0o666,
                 done: Callable[[], None] | None = None) -> Iterator[list[Path]]:
    """atomic_path for several files that belong together (a file and its sidecar): all are
    renamed into place, in the given order, with Ctrl-C and SIGTERM held back across the
    renames and `done`, or none is."""
    paths = [Path(p) for p in paths]
    partials: list[Path] = []
    try:
        for path in paths:
            handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.partial", dir=path.parent)
            os.close(handle)
            partials.append(Path(name))
        yield partials
        for partial in partials:
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(partial, mode & ~umask())
        with signals_deferred():
            for partial, path in zip(partials, paths, strict=True):
                os.replace(partial, path)
            if done is not None:
                done()
    except OSError as e:
        failed = paths[min(len(partials), len(paths) - 1)] if len(partials) < len(paths) else paths[0]
        raise OutputError(failed, f"cannot write ({os_reason(e)})", os_reason(e)) from None
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


def write_folder(out: str | Path, writers: dict[str, Callable[[Path], None]], field: str = "out",
                 done: Callable[[], None] | None = None) -> None:
    """Write the files named by `writers` (name -> function writing that file at a path) into
    the folder `out`, all or nothing.

    Everything is written to a staging folder first. A new `out` is that folder, renamed; in an
    existing one (whose parent may be read-only, as for --out ~) the files are renamed into
    place one by one, the last name last, with Ctrl-C and SIGTERM held back meanwhile, after
    checking that nothing stands in their way. On any failure nothing in `out` has changed and
    no staging folder is left. OutputError (or ArgumentError for `out` itself) names the folder.
    `done` runs once the files are in place, before a held back Ctrl-C lands (see atomic_path).
    """
    out = Path(out)
    check_output_folder(field, out)
    exists = out.is_dir()
    for name in writers if exists else ():
        target = out / name
        if (target.exists() or target.is_symlink()) and not target.is_file():
            raise OutputError(out, f"holds {name!r}, which is not a regular file, where an output file goes")
    created = missing_folders(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out if exists else out.parent))
    except OSError as e:
        remove_empty(created)
        raise OutputError(out, f"cannot write ({os_reason(e)})") from None
    try:
        staging.chmod(0o777 & ~umask())  # mkdtemp makes 0700; a new `out` gets the mode any mkdir would give it
        for name, write in writers.items():
            write(staging / name)
        with signals_deferred():
            if not exists:
                staging.rename(out)
            else:
                for name in writers:
                    os.replace(staging / name, out / name)
            if done is not None:
                done()
    except OSError as e:
        raise OutputError(out, f"cannot write ({os_reason(e)})", os_reason(e)) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not out.exists():
            remove_empty(created)


def check_output_folder(field: str, out: Path) -> None:
    """Fail before any work if the folder `out` could not be written; create nothing."""
    if out.is_symlink() and not out.exists():
        raise ArgumentError(field, f"must be a folder, got {repr(str(out))} (a symbolic link to nothing, or a loop)")
    if out.exists() and not out.is_dir():
        raise ArgumentError(field, f"must be a folder, got {repr(str(out))} (an existing file)")
    existing = out
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(field, f"must be writable, got {repr(str(out))} ({repr(str(existing))} is not writable)")


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what a command
    that fails may remove again."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders (deepest first) while they are empty; one holding anything is
    kept, and so are its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def read_manifest(path: Path, kind: str, field: str = "out") -> dict | None:
    """A run folder's JSON record of its settings (`kind`: "batch", "eval"), or None when there
    is none. Anything but a JSON object is an ArgumentError for `field`, the folder."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArgumentError(field, f"{str(path)!r} is not a readable {kind} manifest ({e})") from None
    if not isinstance(record, dict):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ArgumentError(field, f"{str(path)!r} is not {article} {kind} manifest (holds a {type(record).__name__}, "
                                   "not an object); remove it or choose another --out")
    return record


def check_same_run(out: Path, previous: dict | None, record: dict, keys: tuple[str, ...], stray: Path | None,
                   parts: str, manifest: str, keys_are: str = "settings") -> None:
    """Refuse to mix two runs' `parts` ("shards", "chunks") in the folder `out`: a previous
    manifest whose `keys` (what they are, for the message: "settings") differ from `record`'s,
    or a part (`stray`) with no manifest to say which run wrote it. ArgumentError for --out."""
    if previous is None:
        if stray is not None:
            raise ArgumentError("out", f"{str(out)!r} holds {parts} ({str(stray)!r}) but no {manifest} to say which "
                                       "run wrote them; remove them or choose another --out")
        return
    differing = [k for k in keys if previous.get(k) != record[k]]
    if differing:
        shown = "; ".join(f"{k}: {previous.get(k)!r} there, {record[k]!r} now" for k in differing[:3])
        raise ArgumentError("out", f"{str(out)!r} holds a run with other {keys_are} ({shown}); "
                                   "repeat them to resume it, or choose another --out")


# -- the result files -------------------------------------------------------------------------------

RESULT_FILES = ("text_tokens.npy", "text_embedding.npy", "image_embedding.npy", "candidates.npy")


def result_arrays(result, row: int = 0) -> dict[str, object]:
    """One prompt's arrays of an EmbedResult, as the files hold them: tokens int64 (1, 77),
    text and image embedding float32 (1, D), candidates float32 (N, D)."""
    import numpy as np

    return {
        "text_tokens.npy": result.tokens[row : row + 1].astype(np.int64),
        "text_embedding.npy": result.text_embedding[row : row + 1].astype(np.float32),
        "image_embedding.npy": result.image_embedding[row : row + 1].astype(np.float32),
        "candidates.npy": result.candidates[row].astype(np.float32),
    }


def write_result(out: str | Path, result, row: int = 0, record: dict | None = None,
                 done: Callable[[], None] | None = None) -> None:
    """Write one prompt's .npy files (and result.json when `record` is given) into `out`, all
    or nothing (write_folder, which runs `done` once they are in place)."""
    import numpy as np

    def saver(array):
        return lambda path: np.save(path, array, allow_pickle=False)

    writers: dict[str, Callable[[Path], None]] = {name: saver(a) for name, a in result_arrays(result, row).items()}
    if record is not None:
        text = json.dumps(record, indent=2) + "\n"
        writers["result.json"] = lambda path: path.write_text(text)
    write_folder(out, writers, done=done)
