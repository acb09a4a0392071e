#!/usr/bin/env bash
# Set up .venv and embed a prompt; the default weights are fetched first if they are needed and
# not there (after the arguments are checked: --help, a typo or a bad value downloads nothing).
# Usage: scripts/embed.sh "a red cube on a table" --out DIR [more `python -m prior embed` options]
# Run it from any folder: relative paths (--out, --weights) mean the folder you run it from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" runtime
PRIOR_DOWNLOAD=1 exec "$root/.venv/bin/python" -m prior embed "$@"
