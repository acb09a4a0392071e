#!/usr/bin/env bash
# The whole GPU benchmark on a fresh GPU machine, in one go (target: under 6 minutes).
#
#   bench/gpu.sh                  # on the GPU machine, from a copy of this repository
#   bench/gpu.sh --fetch-wheels   # here, with PyPI: save the wheels that machine lacks
#
# The GPU machine is x86-64 with Python 3.12 and, usually, torch with CUDA preinstalled,
# and no internet. So:
# 1. python3 with its CUDA torch as it is; the oracle (dalle2-pytorch 0.11.5 and friends)
#    and ftfy, which the image lacks, go to bench/cache/site on PYTHONPATH,
#    from the wheels in bench/cache/wheels when present (copy that folder along), else
#    from the index. Nothing is installed when they all import already;
# 2. without a CUDA torch: a venv in bench/cache/venv with requirements-test.txt from the index;
# 3. the full-size random checkpoint, built into bench/cache (about a minute);
# 4. python -m bench.gpu, which writes its JSON and the table under $OUT;
# 5. only with WITH_SAMPLERS=1: python -m bench.mixture real, the default sampler against the
#    1000-step DDPM prompt by prompt (SAMPLER_WEIGHTS, default the random checkpoint: point it at
#    the trained weights for a measurement that means something; SAMPLER_PROMPTS, SAMPLER_SAMPLES).
# Everything goes to $OUT/gpu-bench.log as well; $OUT defaults to bench/cache/gpu-out.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=bench/cache/wheels
# Pure-Python packages (wcwidth is abi3) the GPU image lacks, at the pins of requirements-test.txt.
oracle_pins=(dalle2-pytorch==0.11.5 rotary-embedding-torch==0.1.5 clip-anytorch==2.4.0 einops==0.4.1
  einops-exts==0.0.3 x-clip==0.7.0 coca-pytorch==0.0.6 ema-pytorch==0.0.8 vector-quantize-pytorch==0.7.3
  kornia==0.6.5 setuptools==80.9.0 ftfy==6.3.1 wcwidth==0.9.4 resize-right==0.0.2)
# What `prior serve` needs on that machine (bench/serve.py); coglet is abi3, the rest pure Python.
serve_pins=(cog==0.23.1 coglet==0.23.1 structlog==26.1.0)

if [ "${1:-}" = --fetch-wheels ]; then
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels" "${oracle_pins[@]}" "${serve_pins[@]}"
  ls -l "$wheels"
  exit 0
fi

OUT="${OUT:-$PWD/bench/cache/gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-bench.log") 2>&1
started=$(date +%s)
stamp() { echo "[gpu.sh +$(( $(date +%s) - started )) s] $*"; }

stamp "machine: $(uname -m), $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
py=$(command -v python3)  # on a GPU machine image, the python3 that holds PyTorch
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  # That python is often itself a venv, whose packages a new venv's
  # --system-site-packages would not see: add ours in a folder on PYTHONPATH instead.
  stamp "torch with CUDA found in $py: missing packages go to bench/cache/site"
  site="$PWD/bench/cache/site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  install=("$py" -m pip install --quiet --disable-pip-version-check --no-compile --target "$site")
else
  stamp "no CUDA torch in $py: a venv with requirements-test.txt from the index (needs the network)"
  "$py" -m venv bench/cache/venv
  py="$PWD/bench/cache/venv/bin/python"
  "$py" -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
  install=("$py" -m pip install --quiet --disable-pip-version-check)
fi

# What the benchmark imports: install the pins only if one of them does not import.
if ! "$py" -c 'import dalle2_pytorch, clip, ftfy, rotary_embedding_torch, pkg_resources' 2>/dev/null; then
  if [ -d "$wheels" ]; then
    stamp "installing the oracle from $wheels"
    "${install[@]}" --no-index --no-deps "$wheels"/*.whl
  else
    stamp "installing the oracle from the index"
    "${install[@]}" "${oracle_pins[@]}"
  fi
fi
"$py" - <<'EOF'
import warnings
warnings.filterwarnings("ignore")
import torch, dalle2_pytorch, prior  # noqa: F401  (fails loudly here, not half-way)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}; "
      f"prior {prior.__version__}")
EOF
"$py" -m pip freeze --all > "$OUT/pip-freeze.txt" 2>/dev/null || true

stamp "building the full-size random checkpoint (cached in bench/cache)"
"$py" -W ignore -c 'from bench.common import full_checkpoint; print(full_checkpoint())'

stamp "running bench/gpu.py"
# What is left of the 6 minutes, less a margin for writing the results.
budget=$(( 330 - ($(date +%s) - started) ))
[ "$budget" -lt 120 ] && budget=120
PYTHONUNBUFFERED=1 "$py" -W ignore -m bench.gpu --out-dir "$OUT" --budget-s "$budget"

# The HTTP service under load (1 to 32 concurrent clients against one at a time), if time is left.
if "$py" -c 'import cog, coglet' 2>/dev/null && [ $(( $(date +%s) - started )) -lt 420 ]; then
  stamp "running bench/serve.py"
  PATH="$(dirname "$py"):$PATH" PYTHONUNBUFFERED=1 timeout 240 "$py" -W ignore -m bench.serve --device cuda \
    --out "$OUT/serve-gpu.json" || stamp "bench/serve.py did not finish"
else
  stamp "skipping bench/serve.py (cog not importable, or no time left)"
fi
if [ "${WITH_SAMPLERS:-0}" = 1 ]; then
  stamp "running bench/mixture.py real: the default sampler against the 1000-step DDPM, prompt by prompt"
  PYTHONUNBUFFERED=1 "$py" -W ignore -m bench.mixture real --weights "${SAMPLER_WEIGHTS:-bench/cache/full-seed0.pth}" \
    --prompts "${SAMPLER_PROMPTS:-4}" --samples "${SAMPLER_SAMPLES:-256}" --out-dir "$OUT"
fi
stamp "done"
