#!/usr/bin/env bash
# Set up .venv, fetch the real weights if they are needed and not there, and embed a prompt.
# Usage: scripts/embed.sh "a red cube on a table" [--out DIR] [more `python -m prior embed` options]
# Run it from any folder: relative paths (--out, --weights) mean the folder you run it from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/setup.sh" runtime
own_weights=no
for arg in "$@"; do
  case "$arg" in --weights|--weights=*) own_weights=yes ;; esac
done
if [ "$own_weights" = no ] && [ ! -f "$root/weights/prior_ema_fp16.pth" ]; then
  "$root/.venv/bin/python" -m prior.weights download --dest "$root/weights"
fi
exec "$root/.venv/bin/python" -m prior embed "$@"
