#!/usr/bin/env bash
# Build Horovod 0.28.1 against the installed torch and install it into the active Python.
#
# PyPI has only the 0.28.1 sdist, which sets C++14; torch >= 2.1 headers need C++17. We check the
# sdist's sha256, patch the two CMake files, and build with gloo (CPU) and NCCL when CUDA is present.
# The built wheel is cached under ~/.cache, keyed by torch version and build flags, because the
# build takes ~10 minutes on 2 cores and a second setup should take seconds.
# Usage: .ci/build-horovod.sh PYTHON
set -euo pipefail
python=${1:?usage: build-horovod.sh PYTHON}
sdist_sha256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0

if "$python" -c 'import horovod.torch' 2>/dev/null; then
  echo "horovod already installed"; exit 0
fi

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
       HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo
torch_version=$("$python" -c 'import torch; print(torch.__version__)')
if "$python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' && command -v nvcc >/dev/null; then
  export HOROVOD_GPU_OPERATIONS=NCCL
fi
flags=$(env | grep '^HOROVOD_' | sort | tr '\n' ' ')
key=$(printf '%s %s %s' "$torch_version" "$("$python" -c 'import sys; print(sys.version.split()[0])')" "$flags" \
      | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/instance-classifier/horovod-0.28.1-$key
if ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "installing cached horovod wheel from $cache"
  "$python" -m pip install -q "$cache"/horovod-*.whl
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building horovod 0.28.1 for torch $torch_version ($flags) — about 10 minutes on 2 cores"
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" horovod==0.28.1
echo "$sdist_sha256  $work/horovod-0.28.1.tar.gz" | sha256sum -c --quiet
tar -xzf "$work/horovod-0.28.1.tar.gz" -C "$work"
src=$work/horovod-0.28.1
for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "unexpected $f: no C++14 line to patch"; exit 1; }
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
done
"$python" -m pip install -q setuptools wheel
MAKEFLAGS=-j$(nproc) "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$src"
mkdir -p "$cache"
cp "$work"/dist/horovod-*.whl "$cache"/
"$python" -m pip install -q "$cache"/horovod-*.whl
"$python" -c 'import horovod, horovod.torch as hvd; print("horovod", horovod.__version__, "built with gloo:", hvd.gloo_built())'
