#!/usr/bin/env bash
# Everything a GPU machine (one GPU, CUDA torch + Triton, no Horovod, no DALI, no network) measures for this
# project, in one command with a budget per step, short enough to leave time for a second try.
#
#   bench/gpu/gpu_session.sh [--with-horovod] [--commit SHA] [--steps NAME,...] [--budget SECONDS] [--dry-run]
#
# The default session runs at P = 1 with the single engine (run/distributed.py), so nothing is built before the
# first number. Steps in order; budget = where `timeout` cuts the step, estimate = what it should take on the GPU
# (a guess from the code, until a session measures it):
#
#   step             budget  estimate  what
#   smoke              30 s   10-20 s  bench/gpu/triton_smoke.py: every Triton kernel of a training step (loss, glue,
#                                      seeding) compiled and run at a small shape against its torch twin
#   classifier_step    60 s   35-55 s  bench/classifier_step.py cuda: the classifier step alone, B = 128,
#                                      C = 20,019 and 1,281,167 (rows drawn on the CPU), profiler kernel count
#   train_step         70 s   30-55 s  bench/train_step.py gpu: ResNet-50 at 224 px, 64 images x 2 views, bf16;
#                                      linear-1000 vs the instance classifier with 20,019 and 1,281,167 rows
#   trainer            55 s   25-45 s  trainer.py --data synthetic --engine single, all 1,281,167 rows, 30 steps:
#                                      the real loop, raw init, checkpoint (1.3 GB) and metrics on a GPU
#   kernels           135 s  90-130 s  bench/gpu/gpu_check.sh: correctness against the float64 oracle (~25 Triton
#                                      specialisations from a cold cache), then timings at the trainer's dtypes
#                                      (torch.compile last: its two builds are the part most likely cut); read
#                                      the bf16 weight-gradient kernel's time against its GEMM floor: at 253
#                                      registers x 256 threads it runs one block per SM (bench/kernel.py compile),
#                                      so a time far above the floor points at occupancy (ncu --section Occupancy)
#   torchrun_trainer   35 s   15-30 s  torchrun --nproc_per_node 1 (NCCL, no build): the synthetic trainer,
#                                      100,000 rows, 10 steps: host tensors on gloo beside NCCL
#   collectives        20 s    5-15 s  bench/collectives.py under that torchrun: each collective of the step
#                                      on GPU tensors through NCCL, the stop check on the host
#   data               40 s    20-30 s  bench/data.py: DALI's GPU decoding at 224 px against the CPU's, where DALI
#                                      is installed (not on the lent machine: skipped there, and said so)
# --with-horovod adds, last (they check the build; the speed was measured above):
#   horovod_setup     180 s 165-185 s  bench/gpu/gpu_setup.sh: Horovod 0.28.1 + NCCL built from .whl/ (the build
#                                      alone ~2 min on 16 cores), the wheel installed, a one-process NCCL
#                                      allreduce and allgather
#   horovod_trainer    30 s   20-30 s  horovodrun --gloo -np 1: the synthetic trainer, 100,000 rows, 10 steps
#
# The session's budget is 420 s (620 s with --with-horovod; --budget overrides): each step is cut at its own
# budget or at the session's end, whichever comes first, so when earlier steps overrun it is the last ones, the
# Horovod steps, that are cut. A cut step counts as failed and keeps what it printed.
#
# Results: $OUT (default runs/gpu-session) gets at most 4 files: summary.md (the commit, the device, and each
# step's status line and tables, appended as the step ends), session.log (all output, unbuffered), and the
# trainer runs' metrics.jsonl (trainer-metrics.jsonl, horovod-trainer-metrics.jsonl). Exit 0 when every step
# that ran passed. The copied tree has no .git: pass the commit.
#
#   bench/gpu/gpu_session.sh --commit SHA                                # on the GPU machine, .whl/ copied beside it
#   OUT=DIR PYTHON=.venv/bin/python bench/gpu/gpu_session.sh --dry-run   # anywhere: every step on the CPU, tiny sizes
#
# --dry-run runs the same steps and control flow on the CPU at tiny sizes, the Triton kernels under the
# interpreter (TRITON_INTERPRET=1), one torch thread, every budget x DRY_RUN_BUDGET_SCALE; --with-horovod's
# build becomes the build plan's dry run (.ci/build-horovod.sh --dry-run) and its trainer runs on the CPU
# through the Horovod already installed.
# tests/test_gpu_session.py runs it. .whl/ comes from bench/gpu/fetch_gpu_wheels.sh (where there is network).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-session}
WHEELS=${WHEELS:-.whl}
MIN_STEP_S=5  # a step left less than this by the session's budget is not started
# The dry run's budgets are the GPU's times this: the interpreter on a CPU shared with other jobs can be slower
# at tiny sizes than the GPU at full ones, and a dry run must not be cut where the GPU would not be.
DRY_RUN_BUDGET_SCALE=4

usage() {
    echo "usage: $0 [--with-horovod] [--commit SHA] [--steps NAME,...] [--budget SECONDS] [--dry-run]" >&2
    exit 2
}
dry_run=0 with_horovod=0 commit="" only="" budget=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --with-horovod) with_horovod=1 ;;
        --commit) [[ $# -ge 2 ]] || usage; commit=$2; shift ;;
        --steps) [[ $# -ge 2 ]] || usage; only=$2; shift ;;
        --budget) [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage; budget=$2; shift ;;
        *) usage ;;
    esac
    shift
done
budget=${budget:-$((with_horovod ? 620 : 420))}
scale=$((dry_run ? DRY_RUN_BUDGET_SCALE : 1))
budget=$((budget * scale))
commit=${commit:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git: pass --commit SHA)")}

export PYTHONUNBUFFERED=1  # every line reaches the log as it is printed: a step killed at its budget keeps them
RUN_DIR=$(mktemp -d)  # the trainer runs' checkpoints (1.3 GB with all rows) stay on the machine
trap 'rm -rf "$RUN_DIR"' EXIT
tiny=()  # the dry run's sizes, appended to the trainer's flags (argparse: the last value wins)
if [[ $dry_run == 1 ]]; then
    export TRITON_INTERPRET=1  # the Triton kernels on CPU tensors; read when triton is first imported
    export OMP_NUM_THREADS=1   # tiny shapes: more threads only spin on a shared CPU
    tiny=(--instances 64 --steps-per-epoch 7 --image-size 32 --arch resnet18 --width 8 --small-stem
          --hidden-dim 32 --feat-dim 16 --batch-size 8 --kernel-backend triton)
fi
dry() { [[ $dry_run == 1 ]] && echo "$@"; }  # the argument in a dry run, nothing on the GPU
wheels=(); [[ -d $WHEELS ]] && wheels=("$WHEELS")  # gpu_check.sh: the optional baselines' wheels, when carried

mkdir -p "$OUT"
rm -f "$OUT/summary.md" "$OUT/session.log" "$OUT"/*-metrics.jsonl
if [[ $dry_run == 1 ]]; then
    device="CPU (dry run: tiny sizes, Triton interpreter)"
else
    device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null) \
        || device="no GPU found (nvidia-smi failed)"
fi
{ echo "# GPU session$([[ $dry_run == 1 ]] && echo ' (dry run)')"; echo
  echo "commit $commit; $(date -u +'%Y-%m-%d %H:%M UTC'); $device; budget $budget s$( ((scale > 1)) && echo " (the GPU's x $scale)")$([[ $with_horovod == 1 ]] && echo ', with Horovod')"
} > "$OUT/summary.md"
cat "$OUT/summary.md"

failed=0 passed=0 deadline=$budget step_log="$RUN_DIR/step.log"
# The lines of a step's output that go into summary.md: its markdown tables with the line before each (the caption),
# and the lines that carry a result (start-up line, epoch throughput, Horovod check, kernel targets). USDT lines
# are the profiler's start/stop notes on stderr, which land between a table's rows.
summarise() {
    awk '/^USDT:/ { next }
         /^\|/ { if (!in_table && caption != "") print caption; print; in_table = 1; caption = ""; next }
         { in_table = 0; caption = "" }
         /^(\[[0-9]+\]<stdout>:)?(engine |epoch [0-9]+: loss|horovod .* with NCCL|gpu_setup: done|Targets:|GEMM floor:|K = [0-9]+:|launched:|cache entry:)/ { print; next }
         NF { caption = $0 }' "$1"
}
run_step() {  # NAME BUDGET COMMAND...: run it under min(BUDGET, what the session has left), then summarise it
    local name=$1 step_budget=$(($2 * scale)); shift 2
    if [[ -n $only && ",$only," != *",$name,"* ]]; then return 0; fi
    local left=$((deadline - SECONDS)) limit=$step_budget status started=$SECONDS verdict
    (( left < limit )) && limit=$left
    if (( limit < MIN_STEP_S )); then
        printf '\n## %s: CUT before it started (%d s of the session budget left; counts as failed)\n' "$name" "$left" \
            | tee -a "$OUT/summary.md"
        failed=$((failed + 1))
        return 1
    fi
    local note=""; (( limit < step_budget )) && note=", cut to $limit s by the session budget"
    echo "== $name (budget $step_budget s$note): $*" | tee -a "$OUT/session.log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/session.log" "$step_log"
    status=${PIPESTATUS[0]}
    if (( status == 124 || status == 137 )); then
        verdict="CUT at $limit s (counts as failed; its output so far is kept)"
    elif (( status != 0 )); then
        verdict="FAILED (exit $status)"
    else
        verdict="passed"
    fi
    (( status == 0 )) && passed=$((passed + 1)) || failed=$((failed + 1))
    { printf '\n## %s: %s in %d s (budget %d s)\n\n' "$name" "$verdict" $((SECONDS - started)) "$step_budget"
      summarise "$step_log"
      (( status != 0 )) && { echo; echo "last lines:"; echo '```'; tail -n 8 "$step_log"; echo '```'; }
    } >> "$OUT/summary.md"
    echo "== $name: $verdict in $((SECONDS - started)) s" | tee -a "$OUT/session.log"
    rm -f "$step_log"
    return "$status"
}
keep_metrics() {  # RUN NAME: the trainer run's metrics.jsonl into $OUT, also after a failure or a cut
    [[ -f $RUN_DIR/$1/metrics.jsonl ]] && cp "$RUN_DIR/$1/metrics.jsonl" "$OUT/$2-metrics.jsonl"
}

echo "commit $commit"
run_step smoke 30 "$PYTHON" bench/gpu/triton_smoke.py $(dry --dry-run)
run_step classifier_step 60 "$PYTHON" bench/classifier_step.py cuda $(dry --dry-run)
run_step train_step 70 "$PYTHON" bench/train_step.py gpu $(dry --dry-run)
run_step trainer 55 "$PYTHON" trainer.py --data synthetic --engine single --out "$RUN_DIR/single" --resume none \
    --epochs 1 --steps-per-epoch 30 --log-every 5 "${tiny[@]}"
keep_metrics single trainer
if [[ $dry_run == 1 ]]; then
    run_step kernels 135 bash bench/gpu/gpu_check.sh --dry-run
else
    run_step kernels 135 bash bench/gpu/gpu_check.sh "${wheels[@]}"
fi
torchrun=("$PYTHON" -m run.launch torch 1)  # the project's launcher: torchrun's module, one rank
run_step torchrun_trainer 35 "${torchrun[@]}" trainer.py --data synthetic --engine torch --out "$RUN_DIR/torchrun" \
    --resume none --instances 100000 --epochs 1 --steps-per-epoch 10 --log-every 5 "${tiny[@]}"
keep_metrics torchrun torchrun-trainer
run_step collectives 20 "${torchrun[@]}" bench/collectives.py $(dry --repeats 5 --warmup 1)
# DALI's GPU decoding (bench/data.py) runs only where DALI is installed, which the lent GPU machine is not.
if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then
    run_step data 40 "$PYTHON" bench/data.py --sizes 224 --seconds 3 --photos 64 --index-files 0 \
        $(dry --dry-run --sizes 32 --seconds 1 --devices cpu --threads 1 --batch-size 32)
elif [[ -z $only || ",$only," == *",data,"* ]]; then
    printf '\n## data: skipped (no DALI on this machine: its GPU decoding stays unmeasured)\n' | tee -a "$OUT/summary.md"
fi
if [[ $with_horovod == 1 ]]; then
    if [[ $dry_run == 1 ]]; then
        run_step horovod_setup 180 bash .ci/build-horovod.sh --dry-run "$PYTHON"
    else
        run_step horovod_setup 180 bash bench/gpu/gpu_setup.sh "$WHEELS"
    fi
    built=$?
    if [[ $built -eq 0 ]]; then  # (also when --steps left the build out: Horovod is there already)
        # The project's launcher, as the torchrun steps: horovodrun as run/horovodrun.py under $PYTHON.
        run_step horovod_trainer 30 "$PYTHON" -m run.launch horovod 1 \
            trainer.py --data synthetic --engine horovod --out "$RUN_DIR/horovod" --resume none \
            --instances 100000 --epochs 1 --steps-per-epoch 10 --log-every 5 "${tiny[@]}"
        keep_metrics horovod horovod-trainer
    elif [[ -z $only || ",$only," == *",horovod_trainer,"* ]]; then
        printf '\n## horovod_trainer: skipped (the Horovod build failed)\n' | tee -a "$OUT/summary.md"
    fi
fi
printf '\n## session: %d passed, %d failed, %d s of %d s\n' "$passed" "$failed" "$SECONDS" "$budget" \
    >> "$OUT/summary.md"
echo; cat "$OUT/summary.md"  # last, so that the tail of the output, all a cut call returns, holds it
exit $((failed > 0))
