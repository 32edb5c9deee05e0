"""bench/gpu/gpu_check.sh and bench/kernel.py: the argument handling, and the GPU check's correctness
criterion (bench/kernel.py judge) on CPU under TRITON_INTERPRET=1: a legitimate bf16 near-tie reorder
passes, planted bugs (a wrong pick at a clear gap, invalid ids, a wrong gradient or loss) fail.

`bench/gpu/gpu_check.sh --dry-run` (the GPU check on the CPU) runs in the GPU session's dry run
(tests/test_gpu_session.py); the compile check (`bench/kernel.py compile`) in tests/test_kernels_compile.py.
"""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import kernel as bench
from kernels import reference
from tests.conftest import ROOT

# B, C, D, K, alpha, tau, dtype, products' dtype: with make_inputs(seed=B), bf16 rounding of the normalized
# features swaps near-ties across the K-th place in two rows (found by search; asserted below).
NEAR_TIE_CASE = bench.DRY_RUN_CASES[-1]
# The trainer's operands on a GPU: fp32 features and rows, rounded to bf16 inside the kernels.
TRAINER_DTYPES_CASE = next(case for case in bench.DRY_RUN_CASES if case[-2:] == (torch.float32, torch.bfloat16))
GRADIENT_CHECKS = ("dE row", "dE norm", "dW row", "dW norm")


@pytest.mark.parametrize("args,message", [(["--bogus"], "usage:"), (["a", "b"], "usage:"),
                                          (["/no/such/wheels"], "wheels folder '/no/such/wheels' does not exist")])
def test_gpu_check_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu" / "gpu_check.sh"), *args], capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_mode_without_cuda_says_what_to_do():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel.py"), "gpu"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "gpu mode needs CUDA (or --dry-run under TRITON_INTERPRET=1)" in result.stderr


def test_oracle_at_given_ids_is_the_reference_loss():
    """At its own ids the oracle is kernels.reference.topk_smoothed_xent; at other ids it uses them."""
    generator = torch.Generator().manual_seed(0)
    # Rows of four +-1 entries: normalized exactly (entries +-1/2) in fp32, so the kernels' operands are
    # the exact normalized features and the oracle on them must equal the reference to rounding.
    features = torch.zeros(6, 16, dtype=torch.float64)
    for row in features:
        signs = torch.randint(0, 2, (4,), generator=generator).double() * 2 - 1
        row[torch.randperm(16, generator=generator)[:4]] = signs
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 50, (6,), generator=generator)
    options = dict(temperature=0.15, k=3, alpha=0.2)
    oracle = bench.float64_oracle(features, weight, labels, **options)
    at_own_ids = bench.oracle_at_ids(oracle, oracle.hardest)

    features, weight = features.requires_grad_(True), weight.requires_grad_(True)
    loss = reference.topk_smoothed_xent(features, weight, labels, **options)
    loss.backward()
    assert abs(float(at_own_ids.loss - loss.detach())) < 1e-12
    for name, grad in (("dE", features.grad), ("dW", weight.grad)):
        assert float((sum(at_own_ids.parts[name]) - grad).abs().max()) < 1e-12, name

    # Row 0 takes its (K+1)-th class instead of its K-th: the loss grows by alpha / K / B times their gap.
    ranked = reference.hardest_classes(oracle.logits, labels, 4)
    other = oracle.hardest.clone()
    other[0, -1] = ranked[0, -1]
    gap = oracle.logits[0, ranked[0, -2]] - oracle.logits[0, ranked[0, -1]]
    assert abs(float(bench.oracle_at_ids(oracle, other).loss - loss.detach() - 0.2 / 3 / 6 * gap)) < 1e-12


@pytest.fixture(scope="module")
def near_tie():
    """The Triton outputs of NEAR_TIE_CASE under the interpreter and the float64 oracle of its inputs."""
    return case_outputs_and_oracle(NEAR_TIE_CASE)


def case_outputs_and_oracle(case):
    batch, num_rows, dim, k, alpha, temperature, dtype, compute_dtype = case
    inputs = bench.make_inputs(batch, num_rows, dim, dtype, torch.device("cpu"), seed=batch)
    options = dict(temperature=temperature, k=k, alpha=alpha, compute_dtype=compute_dtype)
    return bench.triton_outputs(*inputs, **options), bench.float64_oracle(*inputs, **options)


def planted(outputs, **changes):
    return SimpleNamespace(**{**vars(outputs), **changes})


def test_near_tie_reorder_in_bf16_passes(near_tie):
    outputs, oracle = near_tie
    verdict = bench.judge(outputs, oracle)
    assert verdict.ok, verdict.failures
    assert verdict.rows_with_other_ids >= 1 and 0 < verdict.worst_gap <= verdict.gap_tolerance
    # The reorder matters: at the oracle's own ids, the rows of the swapped classes are far off.
    softmax_part, target_part = bench.oracle_at_ids(oracle, oracle.hardest).parts["dW"]
    assert bench.row_relative_error(outputs.grad_weight, softmax_part, target_part) > 10 * verdict.tolerances["dW row"]


def test_wrong_pick_at_a_clear_gap_fails(near_tie):
    """Row 0 takes the class with its lowest logit; loss and gradients are those of that pick, so the
    gap is the only thing that can tell."""
    outputs, oracle = near_tie
    ids = outputs.ids.clone()
    ids[0, -1] = oracle.logits[0].argmin()
    expected = bench.oracle_at_ids(oracle, ids)
    consistent = planted(outputs, ids=ids, loss=expected.loss.float(),
                         grad_features=sum(expected.parts["dE"]).to(outputs.grad_features.dtype),
                         grad_weight=sum(expected.parts["dW"]).to(outputs.grad_weight.dtype))
    verdict = bench.judge(consistent, oracle)
    assert verdict.worst_gap > 10 * verdict.gap_tolerance
    assert verdict.failures == [next(line for line in verdict.failures if "wrong pick" in line)]


@pytest.mark.parametrize("plant", ["out of range", "duplicate", "the target"])
def test_invalid_ids_fail(near_tie, plant):
    outputs, oracle = near_tie
    ids = outputs.ids.clone()
    ids[3, 1] = {"out of range": len(oracle.weight), "duplicate": ids[3, 0], "the target": oracle.labels[3]}[plant]
    verdict = bench.judge(planted(outputs, ids=ids), oracle)
    assert not verdict.ok and "not K distinct non-target classes" in verdict.failures[0]


def untargeted_class(oracle, ids):
    """A class that is no row's label nor top-K: its dW row is a thin softmax part only."""
    targeted = set(oracle.labels.tolist()) | set(ids.flatten().tolist())
    return next(j for j in range(len(oracle.weight)) if j not in targeted)


@pytest.mark.parametrize("plant,caught_by", [
    ("dE scaled by 1.01", "dE norm"), ("dW scaled by 1.01", "dW norm"),
    ("one dE row scaled by 1.05", "dE row"), ("one dE row replaced by its neighbour", "dE row"),
    ("dW row of an untargeted class zeroed", "dW row")])
def test_wrong_gradient_fails(near_tie, plant, caught_by):
    outputs, oracle = near_tie
    grad_features, grad_weight = outputs.grad_features.clone(), outputs.grad_weight.clone()
    if plant == "dE scaled by 1.01":
        grad_features *= 1.01
    elif plant == "dW scaled by 1.01":
        grad_weight *= 1.01
    elif plant == "one dE row scaled by 1.05":
        grad_features[5] *= 1.05
    elif plant == "one dE row replaced by its neighbour":
        grad_features[5] = grad_features[6]
    else:
        grad_weight[untargeted_class(oracle, outputs.ids)] = 0
    verdict = bench.judge(planted(outputs, grad_features=grad_features, grad_weight=grad_weight), oracle)
    failed = [name for name in GRADIENT_CHECKS if verdict.errors[name] > verdict.tolerances[name]]
    assert caught_by in failed, verdict.errors


def test_wrong_loss_fails(near_tie):
    outputs, oracle = near_tie
    verdict = bench.judge(planted(outputs, loss=outputs.loss * (1 + 1e-4)), oracle)
    assert verdict.errors["loss"] > verdict.tolerances["loss"] and len(verdict.failures) == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", bench.DRY_RUN_CASES[:-1], ids=str)
def test_dry_run_cases_pass_the_check(case):
    """check_case as `gpu --dry-run` runs it: outputs judged, rerun bitwise equal (the near-tie case's
    outputs are judged above)."""
    verdict = bench.check_case(*case, torch.device("cpu"))
    assert verdict.ok and verdict.deterministic, verdict.failures


def test_rows_rounded_in_the_kernels_are_the_oracles_operands():
    """fp32 rows with bf16 products: the kernels round W as they multiply, so the oracle must take the rounded
    rows too: judged against the raw fp32 rows instead, the same outputs fail (the loss by over 3x its tolerance)."""
    outputs, oracle = case_outputs_and_oracle(TRAINER_DTYPES_CASE)
    assert oracle.rows_rounded and not torch.equal(oracle.weight_operands, oracle.weight)
    verdict = bench.judge(outputs, oracle)
    assert verdict.ok, verdict.failures
    raw_rows = SimpleNamespace(**{**vars(oracle), "weight_operands": oracle.weight})
    wrong = bench.judge(outputs, raw_rows)
    assert not wrong.ok and wrong.errors["loss"] > 3 * wrong.tolerances["loss"] > 300 * verdict.errors["loss"]


@pytest.mark.slow
def test_classifier_step_overhead_runs_its_worker_and_counts_the_three_collectives():
    """bench/classifier_step.py starts its measuring workers through run.launch and reads back what they wrote."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "classifier_step.py"), "overhead", "--np", "1",
                             "--engine", "single", "--instances", "100", "--steps", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 100 |"))
    assert ("alltoall classifier.features, allgather classifier.stats, alltoall classifier.grad_features" in row
            and row.rstrip().endswith("| 0 |")), row  # three collectives and no host sync per step
