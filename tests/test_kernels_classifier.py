"""Sharded use at P = 2 through model.classifier with the kernels on equals the reference path.

A real 2-rank Horovod job (gloo) runs the classifier on the shared cases of tests/classifier_problems
in float32 with the reference, chunked and Triton backends (Triton under TRITON_INTERPRET=1 without
CUDA). Errors are max |a - e| / max |e| against the reference backend, tolerance 1e-5.
"""
import pytest
import torch

from kernels.reference import relative_error
from tests.classifier_problems import CASES
from tests.conftest import WORKERS, run_horovod

BACKENDS = ["chunked", "triton"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels-classifier")
    run_horovod(2, WORKERS / "kernels_classifier.py", out, "reference", *BACKENDS)
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_classifier_with_kernels_equals_reference_path(ranks, name, backend):
    assert len(ranks) == 2
    for rank in ranks:
        got, want = rank[(backend, name)], rank[("reference", name)]
        assert torch.equal(got["loss"], ranks[0][(backend, name)]["loss"]), "loss must be bit-identical across ranks"
        assert torch.equal(got["hardest"], want["hardest"])
        for key in ("loss", "features_grad", "weight_grad"):
            assert relative_error(got[key], want[key].double()) < 1e-5, key
