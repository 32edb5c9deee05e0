#!/usr/bin/env bash
# The real NCCL build of Horovod 0.28.1, on any machine with a CUDA torch and a CUDA toolkit, GPU or not: the
# project's own .ci/build-horovod.sh with BUILD_NCCL=1 into PYTHON, with a cache folder of its own (so no cached
# wheel is reused and the user's cache is left alone), then hvd.nccl_built() and the wheel's size. NCCL cannot
# run without a GPU: bench/gpu/gpu_setup.sh runs it where there is one. Too slow for the test suite.
#
#   bench/gpu/nccl_build.sh PYTHON [SDIST_DIR]     about 4 minutes on 2 idle cores (bench/RESULTS.md)
#
# PYTHON must not hold Horovod yet (a scratch venv: Horovod is installed into it), e.g.
#   python3 -m venv /tmp/cu13 && /tmp/cu13/bin/pip install torch nvidia-nccl-cu13 cffi pycparser numpy setuptools wheel
# SDIST_DIR as for build-horovod.sh (a folder with the sdist: no download). The wheel and the build log stay in
# the cache folder it prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
    echo "usage: $0 PYTHON [SDIST_DIR]" >&2
    exit 2
fi
python=$1
die() { echo "nccl_build: $*" >&2; exit 1; }
"$python" -c 'import sys, torch; torch.version.cuda or sys.exit(1)' \
    || die "$python has no CUDA torch (pip install torch from a cu* index into a scratch venv)"
if "$python" -c 'import horovod' 2>/dev/null; then
    die "$python already holds Horovod: use a scratch venv without it (this build installs into it)"
fi
cache=$(mktemp -d /tmp/nccl-build-XXXXXX)
start=$SECONDS
XDG_CACHE_HOME=$cache BUILD_NCCL=1 bash .ci/build-horovod.sh "$python" "${@:2}"
elapsed=$((SECONDS - start))
"$python" - <<'EOF'
import horovod
import horovod.torch as hvd

nccl_version = hvd.nccl_built()  # NCCL_VERSION_CODE it was built against, 0 without NCCL
assert nccl_version, "horovod was built without NCCL"
print(f"horovod {horovod.__version__}: nccl_built {nccl_version}, cuda_built {hvd.cuda_built()}, "
      f"gloo_built {hvd.gloo_built()}")
EOF
echo "nccl_build: built and checked in ${elapsed} s on $(nproc) cores; wheel and log in $cache/instance-classifier"
