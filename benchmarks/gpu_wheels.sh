#!/usr/bin/env bash
# Wheels of the peer libraries (and their light dependencies missing from the GPU image) for Python 3.12 on
# x86-64, into .whl/ (git-ignored), for a GPU machine that cannot reach a package index:
#   bash benchmarks/gpu_wheels.sh       # here;  then run benchmarks/gpu_check.sh there with .whl carried along
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d .whl opacus==1.6.0 bergson==2.5.1 kronfluence==1.0.1 datasets dill multiprocess natsort petname \
  simple-parsing docstring-parser torchopt optree einconv
ls .whl
