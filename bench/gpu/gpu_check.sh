#!/usr/bin/env bash
# The GPU check of the classifier kernels: correctness on the device against the float64 oracle (the
# criterion is bench/kernel.py judge: bf16 near-tie reorders of the top-K pass, wrong picks and wrong
# gradients fail), then forward + backward timings at the trainer's operand dtypes (bench/kernel.py gpu),
# printed as markdown tables for bench/RESULTS.md. Exits non-zero when a case fails the criterion.
#
#   bench/gpu/gpu_check.sh [WHEELS_DIR]     on a CUDA machine; needs only its own python + torch + triton.
#                                       WHEELS_DIR (optional): liger-kernel / cut-cross-entropy wheels,
#                                       installed without network into a temporary folder (--no-deps).
#   bench/gpu/gpu_check.sh --dry-run        on a CPU machine: the same script under TRITON_INTERPRET=1 with
#                                       tiny shapes (bench/gpu/gpu_session.sh --dry-run runs it).
#
# The interpreter cannot tell whether the kernels compile for a GPU: `python bench/kernel.py compile` can,
# without one (minutes of CPU). PYTHON selects the interpreter (default: python3). BUDGET_S (default 330)
# cuts the run; the correctness table comes first, so a cut run still says whether it is right.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-330}

if [[ "${1:-}" == "--dry-run" ]]; then
    TRITON_INTERPRET=1 timeout "$BUDGET_S" "$PYTHON" bench/kernel.py gpu --dry-run
    exit 0
fi

if [[ $# -gt 1 || "${1:-}" == -* ]]; then
    echo "usage: $0 [WHEELS_DIR] | --dry-run" >&2
    exit 2
fi
if [[ $# -eq 1 ]]; then
    if [[ ! -d "$1" ]]; then
        echo "$0: wheels folder '$1' does not exist" >&2
        exit 2
    fi
    # A private target folder: the machine's own site-packages (and its torch) stay untouched.
    extra=$(mktemp -d)
    trap 'rm -rf "$extra"' EXIT
    for package in liger-kernel cut-cross-entropy; do
        "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$1" --target "$extra" "$package" \
            || echo "($package: no wheel in $1, its baseline is skipped)"
    done
    export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
timeout "$BUDGET_S" "$PYTHON" bench/kernel.py gpu
