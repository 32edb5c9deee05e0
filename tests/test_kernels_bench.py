"""bench/gpu_check.sh and bench/kernel.py: the argument handling that a CPU machine can check.

The full dry run (`bench/gpu_check.sh --dry-run`: the GPU check on CPU under TRITON_INTERPRET=1, then
the sm_90 compile check) takes minutes and is run by hand; see bench/RESULTS.md, Kernels.
"""
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.parametrize("args,message", [(["--bogus"], "usage:"), (["a", "b"], "usage:"),
                                          (["/no/such/wheels"], "wheels folder '/no/such/wheels' does not exist")])
def test_gpu_check_rejects_bad_arguments(args, message):
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_mode_without_cuda_says_what_to_do():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel.py"), "gpu"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "gpu mode needs CUDA (or --dry-run under TRITON_INTERPRET=1)" in result.stderr
