#!/usr/bin/env bash
# Build Horovod 0.28.1 against the installed torch and install it into PYTHON.
#
# PyPI has only the 0.28.1 sdist, which sets C++14: we check its sha256, patch the two CMake files to the
# standard torch's headers require, build with gloo (plus NCCL when torch has CUDA), strip the libraries' debug
# info and cache the wheel under ~/.cache/instance-classifier, so that a second setup takes seconds. What else
# this machine needs is decided by .ci/horovod_build_plan.py; .ci/README.md says what each fix is for and what
# the cache key holds. pip's output goes to a log beside the cache entry, which a failure names.
#
# Usage: .ci/build-horovod.sh [--dry-run] PYTHON [SDIST_DIR]
#   SDIST_DIR (or $HOROVOD_SDIST_DIR): build without network from the sdist and the cffi/pycparser wheels
#   there (bench/gpu/fetch_gpu_wheels.sh fills one). --dry-run: print the plan and the cache entry, build nothing.
#   BUILD_NCCL=auto|1|0 and HOROVOD_BUILD_CUDA_CC_LIST override the plan's choices.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
python=${1:?usage: build-horovod.sh [--dry-run] PYTHON [SDIST_DIR]}
sdist_dir=${2:-${HOROVOD_SDIST_DIR:-}}
unset HOROVOD_SDIST_DIR  # a location, not a build flag: it stays out of the cache key below
die() { echo "build-horovod: $*" >&2; exit 1; }

if [[ $dry_run == 0 ]] && "$python" -c 'import horovod.torch' 2>/dev/null; then
  echo "horovod already installed"; exit 0
fi

plan=$("$python" "$(dirname "$0")/horovod_build_plan.py" ${sdist_dir:+--sdist-dir "$sdist_dir"}) || exit 1
eval "$plan"
echo "$plan"
pip_offline=()
if [[ -n $offline_dir ]]; then pip_offline=(--no-index --find-links "$offline_dir"); fi

torch_version=$("$python" -c 'import torch; print(torch.__version__)')
# LC_ALL=C: the same order as the C.UTF-8 locale the first keys were made in, whatever the user's locale.
flags=$(env | grep '^HOROVOD_' | LC_ALL=C sort | tr '\n' ' ')
# cache_key_extra is empty for a CPU build, whose key string is then the one of every earlier build.
key=$(printf '%s %s %s%s' "$torch_version" "$("$python" -c 'import sys; print(sys.version.split()[0])')" "$flags" \
      "$cache_key_extra" | sha256sum | cut -c1-16)
cache=$cache_root/horovod-0.28.1-$key
log=$cache.log
if [[ $dry_run == 1 ]]; then
  hit=$(ls "$cache"/horovod-*.whl 2>/dev/null || echo "none yet")
  echo "cache entry: $cache (wheel: $hit)"; exit 0
fi
if ls "$cache"/horovod-*.whl >/dev/null 2>&1; then
  echo "installing cached horovod wheel from $cache"
  "$python" -m pip install -q "${pip_offline[@]}" "$cache"/horovod-*.whl
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building horovod 0.28.1 for torch $torch_version ($flags) — about 10 minutes on 2 cores, 2 on 16; log: $log"
if [[ -n $sdist ]]; then
  cp "$sdist" "$work/"
else
  "$python" -m pip download -q --no-deps --no-binary :all: -d "$work" horovod==0.28.1 \
    || die "no sdist: pip download horovod==0.28.1 failed (no network?); put horovod-0.28.1.tar.gz and the cffi/pycparser wheels in a folder (bench/gpu/fetch_gpu_wheels.sh) and pass it as SDIST_DIR"
fi
echo "$sdist_sha256  $work/horovod-0.28.1.tar.gz" | sha256sum -c --quiet \
  || die "horovod-0.28.1.tar.gz does not have sha256 $sdist_sha256: a corrupt or different download"
tar -xzf "$work/horovod-0.28.1.tar.gz" -C "$work"
src=$work/horovod-0.28.1
patch_line() {  # FILE FROM TO: the sdist is pinned by its sha256, so a missing line means a different file
  grep -q "$2" "$1" || die "unexpected $1: no '$2' line to patch"
  sed -i "s/$2/$3/" "$1"
}
for f in "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"; do
  patch_line "$f" 'set(CMAKE_CXX_STANDARD 14)' "set(CMAKE_CXX_STANDARD $cxx_standard)"
done
if [[ -n $cuda_standard ]]; then
  patch_line "$src/horovod/common/ops/cuda/CMakeLists.txt" 'set(CMAKE_CUDA_STANDARD 11)' "set(CMAKE_CUDA_STANDARD $cuda_standard)"
fi
if [[ -n $nccl_wheel ]]; then
  # Horovod's finder wants lib/libnccl.so; the wheel has lib/libnccl.so.2 only.
  rm -rf "$HOROVOD_NCCL_HOME"
  mkdir -p "$HOROVOD_NCCL_HOME/lib"
  ln -s "$nccl_wheel/include" "$HOROVOD_NCCL_HOME/include"
  for lib in "$nccl_wheel"/lib/libnccl.so*; do ln -s "$lib" "$HOROVOD_NCCL_HOME/lib/"; done
  [[ -e $HOROVOD_NCCL_HOME/lib/libnccl.so ]] || ln -s "$lib" "$HOROVOD_NCCL_HOME/lib/libnccl.so"
fi
if [[ -n $offline_installs ]]; then
  # setup.py lists cffi in setup_requires: setuptools would fetch it from the network if it were missing.
  # shellcheck disable=SC2086
  "$python" -m pip install -q "${pip_offline[@]}" $offline_installs
fi
"$python" -m pip install -q "${pip_offline[@]}" setuptools wheel
mkdir -p "$cache_root"
# -v: CMake's own lines, which say what it found (NCCL, the toolkit), are in the log even when the build succeeds.
MAKEFLAGS=-j$(nproc) "$python" -m pip wheel -v --no-deps --no-build-isolation "${pip_offline[@]}" -w "$work/dist" \
  "$src" >"$log" 2>&1 || die "building the wheel failed: see $log (the last lines say where)"
megabytes() { stat -c %s "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
wheel=$(echo "$work"/dist/horovod-*.whl)
size="$(megabytes "$wheel")"
if [[ -n $strip ]]; then
  # setup.py hard-codes RelWithDebInfo; its debug info is most of the wheel and no instruction, so the key stays.
  "$python" -m wheel unpack -d "$work/unpacked" "$wheel" >>"$log"
  find "$work/unpacked" -name '*.so' -exec "$strip" --strip-debug {} +
  mkdir "$work/stripped"
  "$python" -m wheel pack -d "$work/stripped" "$work"/unpacked/horovod-* >>"$log"
  wheel=$(echo "$work"/stripped/horovod-*.whl)
  size="$(megabytes "$wheel") ($size before strip)"
fi
mkdir -p "$cache"
cp "$wheel" "$cache"/
echo "built $(basename "$wheel"): $size"
"$python" -m pip install -q "${pip_offline[@]}" "$cache"/horovod-*.whl
"$python" -c 'import horovod, horovod.torch as hvd; print("horovod", horovod.__version__, "built with gloo:", hvd.gloo_built(), "nccl:", hvd.nccl_built())'
if [[ -n ${HOROVOD_GPU_OPERATIONS:-} ]] && ! "$python" -c 'import horovod.torch as hvd, sys; sys.exit(not hvd.nccl_built())'; then
  rm -rf "$cache"  # not the wheel this key promises
  die "the plan asked for NCCL but CMake built without it: see CMake's NCCL lines in $log"
fi
