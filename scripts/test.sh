#!/usr/bin/env bash
# Set up .venv with the test requirements, lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
