#!/usr/bin/env bash
# The CUDA tests, then a compact influence benchmark on one CUDA GPU (about 7 minutes), on a randomly
# initialised ~0.45B-parameter Llama (hidden 1536, 16 layers, 32k vocabulary; no other weights exist offline),
# in runs ordered so that what matters most finishes first (RUNS picks some): bf16 first calls at N_train 16 and
# 64 against the floor and the fastest exact peers, with cuDNN attention and bf16 products as variants; the same
# at N_train 64 timing second calls; fp32 at 64; the other peers and the per-layer projections at 16. Not in the
# default: `global` (the global projections at 16) and `grouped` (ghost layers contracted in same-shape groups
# against one at a time, at 64).
#   here:  bash benchmarks/gpu_wheels.sh          (peer wheels for Python 3.12 into .whl/)
#   there: bash benchmarks/gpu_check.sh           (with .whl carried; peers are skipped if it is absent)
# JSON files go to $OUT (or /tmp/gpu-bench); `--report-only` on them rebuilds the tables anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DIR=${OUT:-/tmp/gpu-bench}
MD=/tmp/gpu-md  # tables and figures: rebuilt here from the JSON files (a device call returns at most 8 files)
mkdir -p "$DIR" "$MD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
# the CUDA cases of the influence tests (kernel against the brute force on the device, projections' bounds)
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_influence.py -k cuda 2>&1 | tail -15
MODEL=${MODEL:-random-llama-1536x16} DEVICE=${DEVICE:-cuda}
bench() {  # name dtype train methods [more options]
  python3 -m benchmarks.influence --models $MODEL --train "$3" --tokens "" --base-tokens 128 --probes 8 \
    --device "$DEVICE" --dtype "$2" --cap 45 --json "$DIR/gpu_$1.json" --results "$MD/RESULTS_gpu_$1.md" \
    --figure "$MD/gpu_$1.png" --methods "$4" "${@:5}"
}
for run in ${RUNS-bf16 warm fp32 peers}; do
  case $run in
    # first calls in a process, as a CLI user gets them; `cudnn` = attention as torch picks it (before e87623b)
    bf16) bench bf16 bfloat16 16,64 "forward+backward (floor),dynamics exact linear,dynamics exact linear cudnn,\
dynamics exact linear model-dtype,opacus linear,torch.func linear" ;;
    # second calls, as a long job gets them: one-time costs (kernel and graph builds) left out
    warm) bench warm bfloat16 64 "forward+backward (floor),dynamics exact linear,dynamics exact linear model-dtype,\
opacus linear" --warm ;;
    fp32) bench fp32 float32 64 "forward+backward (floor),dynamics exact linear,opacus linear" ;;
    peers) bench peers bfloat16 16 "naive loop linear,kronfluence linear,dynamics exact body,bergson body,\
dynamics projected kron,bergson projected per-module" ;;
    global) bench global bfloat16 16 "dynamics exact body,dynamics projected jl,bergson projected global" ;;
    grouped) for dt in bfloat16 float32; do  # same-shape layers contracted together against one at a time
      bench "grouped_$dt" $dt 64 "forward+backward (floor),dynamics exact linear,dynamics exact linear per-layer,\
dynamics exact linear ghost,dynamics exact linear model-dtype,opacus linear" --repeat 3; done ;;
  esac
done
