"""The Triton kernels compiled for H100 (sm_90) and A100 (sm_80) at the launches the trainer and the kernels' API
make, on this machine without a GPU (bench/kernel_compile.py, run as `bench/kernel.py compile`), and the
check's verdicts on planted results.

The compile runs in a subprocess: the suite runs Triton under its interpreter (TRITON_INTERPRET=1, tests/conftest.py),
which replaces the JIT. Triton's cache makes a warm run take seconds.
"""
import os
import subprocess
import sys

import pytest

from bench import kernel_compile
from bench.kernel_compile import TARGETS, Compiled
from tests.conftest import ROOT

H100, A100 = TARGETS


def table_rows(output):
    """{(kernel, target): [cells of each row]} of the check's table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| _"):
            rows.setdefault((cells[0], cells[1]), []).append(cells)
    return rows


@pytest.fixture(scope="module")
def compile_check():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel.py"), "compile"], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1800)
    print(result.stdout)  # the table, with `pytest -s`
    return result


@pytest.mark.slow
def test_every_kernel_compiles_for_h100_and_a100_within_their_limits(compile_check):
    assert compile_check.returncode == 0, compile_check.stdout[-6000:] + compile_check.stderr[-6000:]
    rows = table_rows(compile_check.stdout)
    for target in TARGETS:
        for kernel in kernel_compile.project_kernels():
            assert (kernel, target.name) in rows, f"{kernel} on {target.name} missing from the table"


@pytest.mark.slow
def test_launches_specialise_as_on_the_gpu(compile_check):
    """What the capture must see to compile what the trainer runs: the trainer's fp32 views of the exchange
    block and contiguous bf16 give forward kernels of their own, and the merge of one shard (a single GPU,
    the shard-level API) is compiled apart from the merge of 8 shards (the shard count, 1, becomes a constant)."""
    rows = table_rows(compile_check.stdout)
    forward_cases = [cells[7] for cells in rows[("_shard_forward_kernel", "sm_90")]]
    assert forward_cases == ["trainer 512x20k, trainer 4096x160k", "bf16 512x20k, bf16 4096x160k",
                             "fp32 512x20k, fp32 4096x160k"]
    merge_cases = [cells[7] for cells in rows[("_merge_shards_kernel", "sm_90")]]
    assert "trainer 4096x160k" in merge_cases and "trainer 512x20k" in merge_cases
    # No [B, C] buffer: the capture at B = 4096, C = 160,000 stays under the 2.6 GB of fp32 logits.
    peak_mib = float(compile_check.stdout.split("peak memory ")[1].split(" MiB")[0])
    assert peak_mib < 4096 * 160_000 * 4 / 2**20


@pytest.mark.parametrize("planted,target,reason", [
    (dict(error="CompilationError: at 12:4"), A100, "does not compile: CompilationError"),
    (dict(shared=163 * 1024 + 1), A100, "shared memory, over the 166912 B"),
    (dict(spills=8), H100, "spills 8 B per thread")])
def test_check_fails_on(planted, target, reason):
    entry = Compiled("_shard_forward_kernel", target, **planted)
    assert [reason in line for line in entry.failures()] == [True]


@pytest.mark.parametrize("planted,target", [(dict(shared=227 * 1024), H100), (dict(shared=163 * 1024), A100),
                                            (dict(spills=8), A100)])
def test_check_passes_at_the_limits_and_reports_spills_on_a100(planted, target):
    assert Compiled("_shard_forward_kernel", target, **planted).failures() == []


def test_a_kernel_no_case_launches_fails():
    kernels = sorted(kernel_compile.project_kernels())
    assert "_shard_backward_weight_kernel" in kernels and len(kernels) >= 10
    entries = [Compiled(name, target) for name in kernels if name != "_seed_rows_kernel" for target in TARGETS]
    assert kernel_compile.failures(entries) == [f"_seed_rows_kernel on {target.name}: launched by no case"
                                                for target in TARGETS]
