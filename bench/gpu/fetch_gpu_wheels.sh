#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu/gpu_setup.sh needs on a GPU machine without network:
# the Horovod 0.28.1 sdist and cp312 manylinux wheels of cffi + pycparser (Horovod's setup.py needs cffi to
# build), and the kernel check's baselines. Everything else the project runs there (a CUDA torch, triton, numpy,
# rich, pillow, pytest, cmake, nvidia-nccl-cu13) must be on that machine already; DALI is not fetched.
# About 4 MB; run it here, where pip reaches PyPI:
#
#   bench/gpu/fetch_gpu_wheels.sh [DIR]        DIR: where to put them (default: .whl)
#
# PYTHON selects the interpreter that runs pip (default: python3; any version: the wheels are for cp312).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
python=${PYTHON:-python3}
# cffi >= 1.4 is all setup.py asks; pinned so that two fetches give the same folder. liger-kernel and
# cut-cross-entropy (pure Python, ~1 MB) are bench/gpu/gpu_check.sh's optional baselines.
wheels=(cffi==2.1.1 pycparser==3.12 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)

mkdir -p "$dest"
"$python" -m pip download -q --no-deps --no-binary :all: -d "$dest" horovod==0.28.1
# Wheels for the GPU machine's Python (3.12) and platforms, whatever this machine is.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
"$python" .ci/horovod_build_plan.py --verify "$dest"
du -sh "$dest"
