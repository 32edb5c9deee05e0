"""The decisions of .ci/horovod_build_plan.py for given machines, in seconds and without building Horovod.

Made-up machines (`Facts`) go through the pure `plan`; the real one goes through the script and through
`build-horovod.sh --dry-run`, whose cache key must stay the one the CPU build has always used.
"""
import dataclasses
import hashlib
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("horovod_build_plan", ROOT / ".ci" / "horovod_build_plan.py")
build_plan = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_plan)

# Written out, not imported: these are the flags every earlier build used, so the cached wheels' keys.
CPU_FLAGS = {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITHOUT_TENSORFLOW": "1", "HOROVOD_WITHOUT_MXNET": "1",
             "HOROVOD_WITH_GLOO": "1", "HOROVOD_WITHOUT_MPI": "1", "HOROVOD_CPU_OPERATIONS": "gloo"}
ENV = {"HOME": "/home/u", "PATH": "/usr/bin"}
# The development machine: CPU torch, yet nvcc 13 installed.
DEV_MACHINE = build_plan.Facts(
    python_version="3.11.7", torch_version="2.13.0+cpu", torch_cuda=None, gpu_capabilities=[],
    cuda_home="/usr/local/cuda", nvcc_version="13.0", cmake_version="3.25.1", cxx="/usr/bin/c++",
    cxx_needs_includes=False, nccl_wheel=None, nccl_system=False, installed=[])
NCCL_WHEEL = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl"
# The lent H100 of ../shared/horovod-cuda-build.md, building from a carried .whl folder.
H100_MACHINE = dataclasses.replace(
    DEV_MACHINE, python_version="3.12.3", torch_version="2.11.0+cu130", torch_cuda="13.0", gpu_capabilities=["90"],
    cmake_version="4.1.2", cxx_needs_includes=True, nccl_wheel=NCCL_WHEEL, sdist_dir="/w/.whl",
    sdist_sha256=build_plan.SDIST_SHA256,
    offline_wheels=["cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                    "pycparser-3.12-py3-none-any.whl"])


def parse(lines):
    """(exported variables, plain shell variables) of a plan, read as the shell reads them."""
    exported, assigned = {}, {}
    for line in lines:
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        target = exported if words[0] == "export" else assigned
        name, value = words[-1].split("=", 1)
        target[name] = value
    return exported, assigned


def plan_error(facts, env=ENV):
    with pytest.raises(build_plan.PlanError) as error:
        build_plan.plan(facts, env)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_dev_machine_builds_gloo_only_though_nvcc_is_there():
    exported, assigned = parse(build_plan.plan(DEV_MACHINE, ENV))
    assert exported == CPU_FLAGS
    assert assigned["patch_cuda_standard"] == "0" and assigned["nccl_wheel"] == ""
    assert assigned["sdist"] == "" and assigned["offline_installs"] == ""  # pip download, as before


def test_h100_machine_gets_every_fix_of_the_recipe():
    exported, assigned = parse(build_plan.plan(H100_MACHINE, ENV))
    assert exported == {**CPU_FLAGS, "HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_CUDA_HOME": "/usr/local/cuda",
                        "CUDACXX": "/usr/local/cuda/bin/nvcc", "HOROVOD_BUILD_CUDA_CC_LIST": "90",
                        "HOROVOD_NCCL_HOME": "/home/u/.cache/instance-classifier/nccl-from-wheel",
                        "HOROVOD_NCCL_LINK": "SHARED", "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
                        "CXXFLAGS": "-include string -include cstdint -include stdexcept"}
    assert assigned == {"cache_root": "/home/u/.cache/instance-classifier", "sdist_sha256": build_plan.SDIST_SHA256,
                        "sdist": "/w/.whl/horovod-0.28.1.tar.gz", "offline_dir": "/w/.whl",
                        "offline_installs": "cffi pycparser", "nccl_wheel": NCCL_WHEEL, "patch_cuda_standard": "1"}


@pytest.mark.parametrize("cmake_version, expected", [("3.25.1", None), ("3.31.9", None), ("4.0.0", "3.5"),
                                                     ("4.1.2", "3.5")])
def test_cmake_policy_minimum_only_from_cmake_4(cmake_version, expected):
    exported, _ = parse(build_plan.plan(dataclasses.replace(DEV_MACHINE, cmake_version=cmake_version), ENV))
    assert exported.get("CMAKE_POLICY_VERSION_MINIMUM") == expected


def test_missing_includes_only_where_the_compiler_needs_them_and_after_the_users_flags():
    exported, _ = parse(build_plan.plan(DEV_MACHINE, {**ENV, "CXXFLAGS": "-O2"}))
    assert "CXXFLAGS" not in exported  # the user's own flags are left to the environment
    exported, _ = parse(build_plan.plan(dataclasses.replace(DEV_MACHINE, cxx_needs_includes=True),
                                        {**ENV, "CXXFLAGS": "-O2"}))
    assert exported["CXXFLAGS"] == "-O2 -include string -include cstdint -include stdexcept"


def test_include_probe_fails_where_the_compiler_fails_and_the_fix_satisfies_it():
    assert build_plan.needs_includes("false")
    compiler = build_plan.find_cxx(os.environ)
    assert not build_plan.needs_includes(f"{compiler} {build_plan.MISSING_INCLUDES}")


@pytest.mark.parametrize("capabilities, env_list, expected", [
    (["90"], None, "90"), (["80", "90"], None, "80,90"), ([], None, "90"), (["90"], "75,90", "75,90")])
def test_cuda_cc_list_from_visible_gpus_default_or_override(capabilities, env_list, expected):
    env = {**ENV, "HOROVOD_BUILD_CUDA_CC_LIST": env_list} if env_list else ENV
    exported, _ = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, gpu_capabilities=capabilities), env))
    assert exported["HOROVOD_BUILD_CUDA_CC_LIST"] == expected


def test_nccl_source_user_then_wheel_then_system():
    user_env = {**ENV, "HOROVOD_NCCL_HOME": "/opt/nccl"}
    exported, assigned = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, nccl_system=True), user_env))
    assert "HOROVOD_NCCL_HOME" not in exported and assigned["nccl_wheel"] == ""  # the user's stays as it is
    exported, assigned = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, nccl_system=True), ENV))
    assert exported["HOROVOD_NCCL_HOME"].endswith("nccl-from-wheel") and assigned["nccl_wheel"] == NCCL_WHEEL
    exported, assigned = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, nccl_wheel=None, nccl_system=True), ENV))
    assert exported["HOROVOD_GPU_OPERATIONS"] == "NCCL" and "HOROVOD_NCCL_HOME" not in exported
    assert assigned["nccl_wheel"] == "" and assigned["patch_cuda_standard"] == "1"


def test_probe_finds_nccl_in_a_pip_wheel_or_a_cuda_home(tmp_path, monkeypatch):
    wheel = tmp_path / "site" / "nvidia" / "nccl"  # the layout of nvidia-nccl-cu13: a namespace package
    (wheel / "include").mkdir(parents=True)
    (wheel / "lib").mkdir()
    (wheel / "include" / "nccl.h").touch()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert build_plan.find_nccl_wheel() is None  # a header alone is no NCCL
    (wheel / "lib" / "libnccl.so.2").touch()
    assert build_plan.find_nccl_wheel() == str(wheel)
    cuda_home = tmp_path / "cuda"
    (cuda_home / "include").mkdir(parents=True)
    (cuda_home / "lib64").mkdir()
    (cuda_home / "include" / "nccl.h").touch()
    (cuda_home / "lib64" / "libnccl.so").touch()
    assert build_plan.has_system_nccl(str(cuda_home))


def test_nccl_build_fails_in_one_line_when_a_piece_is_missing():
    assert "nccl.h" in plan_error(dataclasses.replace(H100_MACHINE, nccl_wheel=None))
    assert "nvcc" in plan_error(dataclasses.replace(H100_MACHINE, cuda_home=None))
    assert "CPU-only" in plan_error(DEV_MACHINE, {**ENV, "BUILD_NCCL": "1"})
    assert "BUILD_NCCL" in plan_error(DEV_MACHINE, {**ENV, "BUILD_NCCL": "yes"})
    assert "HOROVOD_BUILD_CUDA_CC_LIST" in plan_error(H100_MACHINE, {**ENV, "HOROVOD_BUILD_CUDA_CC_LIST": "sm_90"})
    exported, _ = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, cuda_home=None), {**ENV, "BUILD_NCCL": "0"}))
    assert "HOROVOD_GPU_OPERATIONS" not in exported  # the way out the errors name


def test_offline_build_checks_its_folder_before_any_work(tmp_path):
    def offline(**changes):
        """The H100 building from tmp_path as it is now."""
        sha256, wheels = build_plan.probe_sdist_dir(str(tmp_path))
        probed = dict(sdist_dir=str(tmp_path), sdist_sha256=sha256, offline_wheels=wheels)
        return dataclasses.replace(H100_MACHINE, **{**probed, **changes})

    with pytest.raises(build_plan.PlanError, match="does not exist"):
        build_plan.probe_sdist_dir(str(tmp_path / "absent"))
    assert "no horovod-0.28.1.tar.gz" in plan_error(offline())
    (tmp_path / build_plan.SDIST_NAME).write_bytes(b"not the sdist")
    message = plan_error(offline())
    assert hashlib.sha256(b"not the sdist").hexdigest() in message and build_plan.SDIST_SHA256 in message

    # From here on the sdist counts as the right one; the wheels decide.
    assert "cffi and pycparser" in plan_error(offline(sdist_sha256=build_plan.SDIST_SHA256))
    (tmp_path / "cffi-2.1.1-cp311-cp311-manylinux_2_17_x86_64.whl").touch()
    (tmp_path / "pycparser-3.12-py3-none-any.whl").touch()
    assert "no cffi wheel for Python 3.12" in plan_error(offline(sdist_sha256=build_plan.SDIST_SHA256))
    _, assigned = parse(build_plan.plan(offline(sdist_sha256=build_plan.SDIST_SHA256, python_version="3.11.7"), ENV))
    assert assigned["offline_installs"] == "cffi pycparser"
    installed = offline(sdist_sha256=build_plan.SDIST_SHA256, installed=["cffi", "pycparser"], offline_wheels=[])
    assert parse(build_plan.plan(installed, ENV))[1]["offline_installs"] == ""  # no wheel needed then

    assert "cmake" in plan_error(dataclasses.replace(installed, cmake_version=None))
    _, assigned = parse(build_plan.plan(dataclasses.replace(DEV_MACHINE, cmake_version=None), ENV))
    assert assigned["sdist"] == ""  # online, Horovod's setup.py fetches a CMake itself, as before


def run_script(*command, env_changes=None):
    """Run a command in the repository with an environment free of HOROVOD_* variables (they enter the key)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HOROVOD_", "BUILD_NCCL"))}
    return subprocess.run(command, cwd=ROOT, env={**env, **(env_changes or {})}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the plan of a CPU-only torch; this one has CUDA")
def test_this_cpu_machine_keeps_the_cache_key_of_every_earlier_build():
    result = run_script("bash", ".ci/build-horovod.sh", "--dry-run", sys.executable,
                        env_changes={"HOROVOD_SDIST_DIR": ""})  # a location: it must not enter the key
    assert result.returncode == 0, result.stderr
    exported, assigned = parse(line for line in result.stdout.splitlines()
                               if not line.startswith("cache entry:") and "=" in line)
    assert {name: value for name, value in exported.items() if name.startswith("HOROVOD_")} == CPU_FLAGS
    assert assigned["patch_cuda_standard"] == "0"
    # The key of the script before NCCL builds: torch, python and the sorted flags, hashed.
    flags = "".join(f"{name}={value} " for name, value in sorted(CPU_FLAGS.items()))
    key = hashlib.sha256(f"{torch.__version__} {sys.version.split()[0]} {flags}".encode()).hexdigest()[:16]
    assert f"/horovod-0.28.1-{key} (wheel:" in result.stdout


@pytest.mark.slow
def test_script_errors_are_one_line(tmp_path):
    (tmp_path / build_plan.SDIST_NAME).write_bytes(b"not the sdist")
    result = run_script(sys.executable, ".ci/horovod_build_plan.py", "--sdist-dir", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("build-horovod: ") and result.stderr.count("\n") == 1, result.stderr
    assert "sha256" in result.stderr
