#!/usr/bin/env bash
# A compact influence benchmark on one CUDA GPU (about 5 minutes on an H100), on a randomly initialised
# ~0.45B-parameter Llama (hidden 1536, 16 layers, 32k vocabulary; no other weights exist offline):
# bf16 on two N_train sizes with every method that fits, then fp32 on one size for dynamics and the naive loop.
#   here:  bash benchmarks/gpu_wheels.sh          (peer wheels for Python 3.12 into .whl/)
#   there: bash benchmarks/gpu_check.sh           (with .whl carried; peers are skipped if it is absent)
# Prints the RESULTS tables; files go to $OUT (or /tmp/gpu-bench).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DIR=${OUT:-/tmp/gpu-bench}
mkdir -p "$DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
MODEL=random-llama-1536x16
python3 -m benchmarks.influence --models $MODEL --train 16,64 --tokens "" --base-tokens 128 --probes 8 \
  --device cuda --dtype bfloat16 --cap 60 --json "$DIR/gpu_bf16.json" --results "$DIR/RESULTS_gpu_bf16.md" \
  --figure "$DIR/gpu_bf16.png" --methods "forward+backward (floor),dynamics exact linear,dynamics exact body,\
dynamics projected kron,dynamics projected jl,naive loop linear,torch.func linear,opacus linear,kronfluence linear,\
bergson body,bergson projected per-module,bergson projected global"
python3 -m benchmarks.influence --models $MODEL --train 16 --tokens "" --base-tokens 128 --probes 8 \
  --device cuda --dtype float32 --cap 60 --json "$DIR/gpu_fp32.json" --results "$DIR/RESULTS_gpu_fp32.md" \
  --figure "$DIR/gpu_fp32.png" --methods "forward+backward (floor),dynamics exact linear,naive loop linear"
cat "$DIR/RESULTS_gpu_bf16.md" "$DIR/RESULTS_gpu_fp32.md"
