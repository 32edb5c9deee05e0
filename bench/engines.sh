#!/usr/bin/env bash
# The engines side by side, in one run, on this machine's CPU (gloo): what `--engine` costs.
#
#   bash bench/engines.sh [BEFORE_TREE [REPEATS]]   # ~10 minutes on 2 cores, +2 per repeat; prints markdown for
#                                                   # bench/RESULTS.md
#
# 1. the classifier step (bench/classifier_step.py overhead: forward + backward, N = 10,000) and the training
#    step (bench/train_step.py cpu: linear-1000 vs the instance classifier) at P = 1, single vs horovod;
# 2. the same at P = 2, horovod vs torch, and what each collective of the step costs (bench/collectives.py);
# 3. with BEFORE_TREE (a checkout of the code before the process-group seam), the P = 2 Horovod runs of that
#    tree and of this one, alternating, REPEATS times (default 3), at one HOROVOD_CYCLE_TIME: whether the seam
#    slowed the Horovod path, with the run-to-run spread beside it.
# Nothing else should run meanwhile: every number is a wall-clock median.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute but not resolved: the venv's python
before=${1:-}
repeats=${2:-3}
export OMP_NUM_THREADS=1

"$PY" -c 'from bench.harness import provenance; print(provenance())'
echo
# A bench script under an engine at P ranks, through the one launcher (run/launch.py): at P = 1 one plain process
# whose --engine names the process group, under the engine's launcher otherwise.
launch() {
    local engine=$1 ranks=$2
    shift 2
    if [[ $ranks == 1 ]]; then
        "$PY" -m run.launch single 1 "$@" --engine "$engine"
    else
        "$PY" -m run.launch "$engine" "$ranks" "$@"
    fi
}

for ranks in 1 2; do
    if [[ $ranks == 1 ]]; then engines="single horovod"; else engines="horovod torch"; fi
    echo "### Classifier step, P = $ranks"
    for engine in $engines; do "$PY" bench/classifier_step.py overhead --np "$ranks" --engine "$engine"; done
    echo
    echo "### Training step, P = $ranks"
    for engine in $engines; do launch "$engine" "$ranks" bench/train_step.py cpu; done
    echo
done
echo "### The step's collectives, P = 2"
for engine in horovod torch; do launch "$engine" 2 bench/collectives.py; done
if [[ -n $before ]]; then
    # Both trees at the same cycle (the old train_step.py left it at Horovod's own default), alternating, so that
    # a drift of the machine falls on both.
    export HOROVOD_CYCLE_TIME=${HOROVOD_CYCLE_TIME:-5}
    for run in $(seq "$repeats"); do
        echo
        echo "### Run $run of $repeats, P = 2, Horovod, HOROVOD_CYCLE_TIME=$HOROVOD_CYCLE_TIME: before the seam ($(git -C "$before" rev-parse --short HEAD)), then after"
        (cd "$before" && "$PY" bench/classifier_step.py overhead --np 2)
        launch horovod 2 "$before/bench/train_step.py" cpu  # its own tree's modules: it runs from anywhere
        "$PY" bench/classifier_step.py overhead --np 2 --engine horovod
        launch horovod 2 bench/train_step.py cpu
    done
fi
