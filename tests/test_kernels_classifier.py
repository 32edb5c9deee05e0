"""Sharded use at P = 2 through model.classifier with the kernels on equals the reference path, and a
classifier step without overhead.

A real 2-rank Horovod job (gloo) runs the classifier on the shared cases of tests/classifier_problems
in float32 with the reference, chunked and Triton backends (Triton under TRITON_INTERPRET=1 without
CUDA). Errors are max |a - e| / max |e| against the reference backend, tolerance 1e-5. The same job
counts what one Triton step launches (kernels.launches) and runs with Horovod's response cache cut to
four entries, so that collectives without a stable name would evict (its unnamed control shows they do).
"""
from types import SimpleNamespace

import pytest
import torch

from kernels.reference import relative_error
from tests.classifier_problems import CASES
from tests.conftest import WORKERS, run_horovod

pytestmark = pytest.mark.horovod  # every test here starts Horovod jobs

BACKENDS = ["chunked", "triton"]
# The classifier's three collectives and the start-up's allgather_object (two entries) fit, with one to spare;
# Horovod's default is 1024.
CACHE_CAPACITY = 6
EVICTION_WARNING = "A response has been evicted from cache"
# Launches of one classifier forward + backward on the Triton path (the budget is 15): pack, norms,
# forward, merge of the splits, merge of the shards, mean; autograd's seed, 1 / B, norms, dW, dE, the
# target part of dE, the sum of the dE partials, the normalisation backward.
CLASSIFIER_STEP_LAUNCHES = 14


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """What every rank saved, and the job's stderr (all ranks, lines prefixed "[rank]<stderr>:")."""
    out = tmp_path_factory.mktemp("kernels-classifier")
    result = run_horovod(2, WORKERS / "kernels_classifier.py", out, "reference", *BACKENDS,
                         env={"HOROVOD_CACHE_CAPACITY": str(CACHE_CAPACITY)})
    return SimpleNamespace(ranks=[torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))],
                           stderr=result.stderr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_classifier_with_kernels_equals_reference_path(job, name, backend):
    ranks = job.ranks
    assert len(ranks) == 2
    for rank in ranks:
        got, want = rank[(backend, name)], rank[("reference", name)]
        assert torch.equal(got["loss"], ranks[0][(backend, name)]["loss"]), "loss must be bit-identical across ranks"
        assert torch.equal(got["hardest"], want["hardest"])
        for key in ("loss", "features_grad", "weight_grad"):
            assert relative_error(got[key], want[key].double()) < 1e-5, key
        for key in ("ids", "own_is_top1", "hardest"):
            assert torch.equal(got["diagnostics"][key], want["diagnostics"][key]), key
        assert relative_error(got["diagnostics"]["own_probability"], want["diagnostics"]["own_probability"]) < 1e-5


def test_triton_step_has_three_named_collectives_few_launches_and_no_host_sync(job):
    for rank in job.ranks:
        counted = rank["counted"]
        assert counted["collectives"] == ["alltoall classifier.features", "allgather classifier.stats",
                                          "alltoall classifier.grad_features"]
        assert counted["syncs"] == []
        assert len(counted["launches"]) <= CLASSIFIER_STEP_LAUNCHES, counted["launches"]


def test_named_collectives_do_not_evict_from_horovods_cache(job):
    """Every rank's output before the unnamed control is free of the eviction warning; the control,
    twelve collectives without a name, produces it on every rank (so the check can fail)."""
    for rank in range(2):
        lines = [line for line in job.stderr.splitlines() if line.startswith(f"[{rank}]<stderr>:")]
        marker = next(i for i, line in enumerate(lines) if "unnamed control" in line)
        assert not any(EVICTION_WARNING in line for line in lines[:marker])
        assert any(EVICTION_WARNING in line for line in lines[marker:])
