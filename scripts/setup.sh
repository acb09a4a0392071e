#!/usr/bin/env bash
# Create (or update) the virtualenv at .venv. Usage: scripts/setup.sh [runtime|test]
# Re-running is cheap: pip is skipped while the requirements files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
req=requirements.txt
[ "$kind" = test ] && req=requirements-test.txt
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$kind"
digest=$(cat requirements.txt "$req" pyproject.toml | sha256sum | cut -c1-16)
# the test requirements include the runtime ones (-r requirements.txt): a current test install serves both
test_digest=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)
[ "$kind" = runtime ] && [ "$(cat .venv/.installed-test 2>/dev/null)" = "$test_digest" ] && exit 0
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  # this package itself, so `python -m prior` works from any directory
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
  echo "$digest" > "$stamp"
fi
# the tests' second oracle, dalle2-pytorch 1.1.0, beside the virtualenv (see requirements-oracle-1.1.0.txt)
if [ "$kind" = test ]; then
  oracle=.oracle-1.1.0
  oracle_digest=$(sha256sum requirements-oracle-1.1.0.txt | cut -c1-16)
  if [ "$(cat "$oracle/.installed" 2>/dev/null)" != "$oracle_digest" ]; then
    rm -rf "$oracle"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --target "$oracle" \
      -r requirements-oracle-1.1.0.txt >&2
    echo "$oracle_digest" > "$oracle/.installed"
  fi
fi
