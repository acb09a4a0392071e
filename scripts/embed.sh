#!/usr/bin/env bash
# Set up .venv, fetch the real weights if they are not there, and embed a prompt.
# Usage: scripts/embed.sh "a red cube on a table" [--out DIR] [more `python -m prior embed` options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh runtime
[ -f weights/prior_ema_fp16.pth ] || .venv/bin/python -m prior.weights download
exec .venv/bin/python -m prior embed "$@"
