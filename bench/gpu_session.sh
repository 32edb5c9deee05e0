#!/usr/bin/env bash
# Everything a lent GPU machine (one H100/H200, CUDA torch + Triton, no DALI, no Horovod, no network) should
# measure for this project, in one command that finishes inside the 10-minute limit of one call:
#
#   1. setup            bench/gpu_setup.sh: Horovod 0.28.1 with NCCL built from .whl/ and checked (~2 min);
#   2. classifier_step  bench/classifier_step.py cuda: the classifier step alone (P = 1, B = 128, C = 20,019
#                       and 1,281,167): ms, GPU kernels that ran, launches (issue 8 target: <= 1 ms at 20,019);
#   3. train_step       bench/train_step.py gpu: ResNet-50, 224 px, 64 images x 2 views, bf16 autocast, the
#                       1000-way linear head vs the instance classifier with 20,019 and 1,281,167 rows
#                       (targets: adds <= 5% and <= 10%);
#   4. trainer          trainer.py --data synthetic at P = 1 for a few dozen steps with all 1,281,167 rows:
#                       the real training loop, checkpoint and metrics on a GPU (its first run there);
#   5. kernels          bench/gpu_check.sh: the Triton kernels against the float64 oracle, then their timings.
#
# Each step has its own time budget and log in $OUT (default runs/gpu-session); a step that fails or runs
# over is reported and the next one still runs (but 2-4 need step 1). $OUT/summary.txt lists them all.
#
#   run(command="bench/gpu_session.sh", carry=[".whl"], timeout_s=600)   # the device tool, one call
#   bench/gpu_session.sh --dry-run                                       # here: what it would run
#
# .whl/ comes from bench/fetch_gpu_wheels.sh (where there is network). Copy the tables of the logs into
# bench/RESULTS.md with the device line of the setup log, the date and the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-session}
WHEELS=${WHEELS:-.whl}
RUN_DIR=$(mktemp -d)  # the trainer's checkpoints (1.3 GB with all rows) stay on the machine
trap 'rm -rf "$RUN_DIR"' EXIT

# name, seconds, command...
STEPS=(
    "setup 180 bash bench/gpu_setup.sh $WHEELS"
    "classifier_step 50 $PYTHON bench/classifier_step.py cuda"
    "train_step 120 $PYTHON bench/train_step.py gpu"
    "trainer 70 $PYTHON trainer.py --data synthetic --out $RUN_DIR/run --epochs 1 --warmup-epochs 0 --steps-per-epoch 40 --log-every 10"
    "kernels 130 env BUDGET_S=120 bash bench/gpu_check.sh $WHEELS"
)

if [[ "${1:-}" == "--dry-run" ]]; then
    total=0
    for step in "${STEPS[@]}"; do
        read -r name seconds command <<<"$step"
        echo "$name (at most $seconds s): $command"
        total=$((total + seconds))
    done
    echo "at most $total s in all"
    bash bench/gpu_setup.sh --dry-run "$WHEELS"
    exit
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
fi

mkdir -p "$OUT"
{ date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD 2>/dev/null || echo "commit unknown";
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; } > "$OUT/summary.txt"
failed=0
horovod_built=0  # the setup step succeeded: the steps that need Horovod can run
for step in "${STEPS[@]}"; do
    read -r name seconds command <<<"$step"
    if [[ $name != setup && $name != kernels && $horovod_built -eq 0 ]]; then
        echo "$name: skipped (no Horovod: the setup failed)" | tee -a "$OUT/summary.txt"
        continue
    fi
    echo "== $name: $command (budget $seconds s)"
    started=$SECONDS
    # shellcheck disable=SC2086  # the command is split on purpose
    timeout "$seconds" $command > "$OUT/$name.log" 2>&1
    status=$?
    echo "$name: exit $status in $((SECONDS - started)) s$([[ $status -eq 124 ]] && echo ' (over its budget)')" \
        | tee -a "$OUT/summary.txt"
    tail -n 30 "$OUT/$name.log"
    if [[ $status -ne 0 ]]; then failed=1; elif [[ $name == setup ]]; then horovod_built=1; fi
done
cp "$RUN_DIR/run/metrics.jsonl" "$RUN_DIR/run/config.json" "$OUT/" 2>/dev/null
exit $failed
