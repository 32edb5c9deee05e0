#!/usr/bin/env bash
# One command that readies a GPU machine (CUDA torch preinstalled, no network) for this project: builds
# Horovod 0.28.1 with NCCL from what bench/gpu/fetch_gpu_wheels.sh put in .whl/ (carried along), installs it into
# the machine's Python, then checks it: hvd.nccl_built(), and a one-process hvd.init() with an allreduce and
# an allgather of a CUDA tensor.
#
#   bench/gpu/gpu_setup.sh [WHEELS_DIR]            on the GPU machine (WHEELS_DIR default: .whl); the build takes
#                                              about 2 minutes on 16 cores
#   bench/gpu/gpu_setup.sh --dry-run [WHEELS_DIR]  anywhere: check the folder, print the build plan for this machine
#
# PYTHON selects the interpreter (default: python3, the one holding CUDA torch there); Horovod, cffi and
# pycparser are installed into it (the machine is given back afterwards). numpy, rich, pillow and pytest are
# in that machine's image; NVIDIA DALI is not, so only what runs without it can run there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=(--dry-run); shift; fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    echo "usage: $0 [--dry-run] [WHEELS_DIR]" >&2
    exit 2
fi
wheels=${1:-.whl}
if [[ ! -d "$wheels" ]]; then
    echo "$0: wheels folder '$wheels' does not exist: run bench/gpu/fetch_gpu_wheels.sh where there is network, and carry it" >&2
    exit 2
fi
"$PYTHON" .ci/horovod_build_plan.py --verify "$wheels"
missing=$("$PYTHON" -c 'import importlib.util as u; print(" ".join(m for m in ("numpy", "rich", "PIL", "pytest") if not u.find_spec(m)))')
[[ -z $missing ]] || echo "note: $PYTHON lacks $missing (the project needs them; fetch their cp312 wheels into $wheels)"

if [[ ${#dry_run[@]} -gt 0 ]]; then
    bash .ci/build-horovod.sh --dry-run "$PYTHON" "$wheels"
    exit 0
fi
"$PYTHON" -c 'import sys, torch; torch.cuda.is_available() or sys.exit(f"gpu_setup: torch {torch.__version__} sees no CUDA device")'
start=$SECONDS
bash .ci/build-horovod.sh "$PYTHON" "$wheels"
"$PYTHON" - <<'EOF'
import horovod
import horovod.torch as hvd
import torch

nccl_version = hvd.nccl_built()  # NCCL_VERSION_CODE it was built against, 0 without NCCL
assert nccl_version, "horovod was built without NCCL"
hvd.init()  # one process, no horovodrun
x = torch.arange(1, 5, dtype=torch.float32, device="cuda")
total = hvd.allreduce(x, op=hvd.Sum, name="gpu_setup.allreduce")
gathered = hvd.allgather(x, name="gpu_setup.allgather")
# One rank: the sum and the gather of x are x itself.
assert total.is_cuda and torch.equal(total, x), total
assert gathered.is_cuda and torch.equal(gathered, x), gathered
print(f"horovod {horovod.__version__} with NCCL {nccl_version} on {torch.cuda.get_device_name()}: "
      f"rank {hvd.rank()} of {hvd.size()}, allreduce and allgather of a CUDA tensor ok")
EOF
echo "gpu_setup: done in $((SECONDS - start)) s"
