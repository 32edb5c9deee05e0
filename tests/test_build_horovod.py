"""The decisions of .ci/horovod_build_plan.py for given machines, in seconds and without building Horovod.

Made-up machines (`Facts`) go through the pure `plan`; made-up CUDA toolkits and torch installs (folders in tmp_path)
go through the probes that find them; the real machine goes through the script and through
`build-horovod.sh --dry-run`, whose cache key must stay the one the CPU build has always used. The real NCCL build
is bench/gpu/nccl_build.sh (minutes, not part of the suite).
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
# A CPU machine: CPU torch, yet nvcc 13 installed.
DEV_MACHINE = build_plan.Facts(
    python_version="3.11.7", torch_version="2.13.0+cpu", torch_cuda=None, gpu_capabilities=[], torch_cxx_standard=17,
    cuda_home="/usr/local/cuda", cuda_search="TOP of /usr/local/bin/nvcc -v --dryrun", nvcc_version="13.0",
    cmake_version="3.25.1", cxx="/usr/bin/c++", cxx_needs_includes=False, nccl_wheel=None, nccl_system=False,
    installed=[], strip="/usr/bin/strip")
NCCL_WHEEL = "/venv/lib/python3.12/site-packages/nvidia/nccl"
# A GPU machine without network (CUDA 13, CMake 4, a recent GCC, NCCL from its pip wheel), building from a .whl folder.
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
    assert assigned["cxx_standard"] == "17" and assigned["cuda_standard"] == "" and assigned["nccl_wheel"] == ""
    assert assigned["cache_key_extra"] == ""  # the key string of every earlier CPU build
    assert assigned["sdist"] == "" and assigned["offline_installs"] == ""  # pip download, as before


def test_h100_machine_gets_every_fix_of_the_recipe():
    exported, assigned = parse(build_plan.plan(H100_MACHINE, ENV))
    assert exported == {**CPU_FLAGS, "HOROVOD_GPU_OPERATIONS": "NCCL", "HOROVOD_CUDA_HOME": "/usr/local/cuda",
                        "CUDA_HOME": "/usr/local/cuda", "CUDACXX": "/usr/local/cuda/bin/nvcc",
                        "HOROVOD_BUILD_CUDA_CC_LIST": "90",
                        "HOROVOD_NCCL_HOME": "/home/u/.cache/instance-classifier/nccl-from-wheel",
                        "HOROVOD_NCCL_LINK": "SHARED", "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
                        "CXXFLAGS": "-include string -include cstdint -include stdexcept"}
    assert assigned == {"cache_root": "/home/u/.cache/instance-classifier", "sdist_sha256": build_plan.SDIST_SHA256,
                        "sdist": "/w/.whl/horovod-0.28.1.tar.gz", "offline_dir": "/w/.whl",
                        "offline_installs": "cffi pycparser", "nccl_wheel": NCCL_WHEEL, "cxx_standard": "17",
                        "cuda_standard": "17", "strip": "/usr/bin/strip", "cache_key_extra": "nvcc 13.0"}


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
    assert assigned["nccl_wheel"] == "" and assigned["cuda_standard"] == "17"


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


# What nvcc's verbose dry run says of where it lives (`#$ TOP=...`), computed as nvcc does: from its own file,
# links resolved. A silent one stands for an nvcc that cannot be asked.
NVCC_ANSWERING = '#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\necho "#\\$ _HERE_=$here" >&2\necho "#\\$ TOP=$here/.." >&2\n'
NVCC_SILENT = "#!/bin/sh\nexit 1\n"


def executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_toolkit(home, nvcc=NVCC_ANSWERING):
    """A folder laid out as a CUDA toolkit: bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so.13."""
    executable(home / "bin" / "nvcc", nvcc)
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").touch()
    (home / "lib64").mkdir()
    (home / "lib64" / "libcudart.so.13").touch()
    return home


def wrapper_on_path(folder, toolkit):
    """A wrapper's layout: FOLDER/bin/nvcc is a script outside the toolkit that runs its nvcc."""
    executable(folder / "bin" / "nvcc", f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    return {"PATH": str(folder / "bin")}


def test_cuda_home_behind_a_wrapper_script_is_where_nvcc_says_it_lives(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0")
    home, origin = build_plan.find_cuda_home(wrapper_on_path(tmp_path / "usr-local", toolkit), usual_homes=())
    assert home == str(toolkit) and "TOP of" in origin  # not usr-local, whose bin/nvcc is the wrapper


def test_cuda_home_behind_a_symlinked_nvcc_is_where_the_link_leads(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-13.0", nvcc=NVCC_SILENT)  # resolved, not asked
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    home, origin = build_plan.find_cuda_home({"PATH": str(tmp_path / "bin")}, usual_homes=())
    assert home == str(toolkit) and origin.endswith("resolved")


def test_cuda_home_from_a_usual_place_when_the_wrapper_cannot_be_asked(tmp_path):
    fake_toolkit(tmp_path / "cuda-12.8")
    newer = fake_toolkit(tmp_path / "cuda-13.0")
    env = wrapper_on_path(tmp_path / "usr-local", tmp_path / "gone")  # runs no nvcc: nothing answers
    home, origin = build_plan.find_cuda_home(env, usual_homes=(str(tmp_path / "absent"), str(tmp_path / "cuda-*")))
    assert home == str(newer) and origin.endswith("a usual place")  # versioned folders newest first


def test_cuda_home_from_the_variables_first_set_first(tmp_path):
    on_path = wrapper_on_path(tmp_path / "usr-local", fake_toolkit(tmp_path / "cuda-on-path"))
    given = str(fake_toolkit(tmp_path / "cuda-given"))
    assert build_plan.find_cuda_home({**on_path, "CUDA_HOME": given}, usual_homes=()) == (given, "$CUDA_HOME")
    other = str(fake_toolkit(tmp_path / "cuda-other"))
    env = {**on_path, "HOROVOD_CUDA_HOME": given, "CUDA_HOME": other, "CUDA_PATH": other}
    assert build_plan.find_cuda_home(env, usual_homes=()) == (given, "$HOROVOD_CUDA_HOME")


def test_a_bin_nvcc_alone_is_no_cuda_home_and_a_wrong_variable_is_reported(tmp_path):
    executable(tmp_path / "nvcc-only" / "bin" / "nvcc", NVCC_SILENT)
    on_path = wrapper_on_path(tmp_path / "usr-local", fake_toolkit(tmp_path / "cuda-13.0"))
    home, searched = build_plan.find_cuda_home({**on_path, "CUDA_HOME": str(tmp_path / "nvcc-only")}, usual_homes=())
    assert home is None  # the variable decides, as in torch: not passed over for the nvcc on PATH
    assert searched == f"{tmp_path}/nvcc-only ($CUDA_HOME, no include/cuda_runtime.h, libcudart.so)"


def test_no_cuda_home_says_what_was_looked_at(tmp_path):
    executable(tmp_path / "usr-local" / "bin" / "nvcc", NVCC_SILENT)  # a wrapper of nothing: neither asked nor resolved
    env = {"PATH": str(tmp_path / "usr-local" / "bin")}
    home, searched = build_plan.find_cuda_home(env, usual_homes=(str(tmp_path / "cuda"),))
    assert home is None
    assert searched == (f"{tmp_path}/usr-local ({tmp_path}/usr-local/bin/nvcc resolved, no include/cuda_runtime.h, "
                        f"libcudart.so); {tmp_path}/cuda ({tmp_path}/cuda, a usual place, absent)")
    home, searched = build_plan.find_cuda_home({"PATH": str(tmp_path / "empty")}, usual_homes=())
    assert (home, searched) == (None, "no nvcc on PATH")


def test_this_machines_cuda_home_is_a_toolkit_or_none():
    home, searched = build_plan.find_cuda_home(os.environ)
    assert home is None or build_plan.toolkit_lacks(home) == "", (home, searched)


# The guard atop ATen/ATen.h, as each torch ships it (2.11 and 2.13: C++17 or later; 2.14: C++20 or later).
ATEN_GUARD = {17: "#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17 or later compatible compiler is "
                  "required to use ATen.\n#endif\n",
              20: "#if !defined(_MSC_VER) && __cplusplus < 202002L\n#error C++20 or later compatible compiler is "
                  "required to use ATen.\n#endif\n"}


def fake_torch(folder, aten_h=None, torch_config=None):
    for path, text in (("include/ATen/ATen.h", aten_h), ("share/cmake/Torch/TorchConfig.cmake", torch_config)):
        if text is not None:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text(text)
    return str(folder)


@pytest.mark.parametrize("torch_version, torch_cuda, cxx_standard", [
    ("2.11.0+cu130", "13.0", 17), ("2.11.0+cpu", None, 17), ("2.13.0+cu130", "13.0", 17), ("2.13.0+cpu", None, 17),
    ("2.14.1+cu130", "13.0", 20), ("2.14.1+cpu", None, 20), ("2.15.0+cu130", "13.0", 20)])
def test_cxx_standard_from_torchs_headers_cuda_standard_17(tmp_path, torch_version, torch_cuda, cxx_standard):
    # The guard is read, not the version: TorchConfig.cmake's CXX_STANDARD 20 (2.13 already) does not override it.
    torch_dir = fake_torch(tmp_path, "#pragma once\n\n" + ATEN_GUARD[cxx_standard], "    CXX_STANDARD 20\n")
    facts = dataclasses.replace(H100_MACHINE, torch_version=torch_version, torch_cuda=torch_cuda, nccl_wheel=None,
                                nccl_system=True, torch_cxx_standard=build_plan.torch_cxx_standard(torch_dir))
    exported, assigned = parse(build_plan.plan(facts, ENV))
    assert assigned["cxx_standard"] == str(cxx_standard)
    assert assigned["cuda_standard"] == ("17" if torch_cuda else "")  # 17 for CMake 3.18+ and nvcc 11+; CUDA 20 not
    assert ("HOROVOD_GPU_OPERATIONS" in exported) == bool(torch_cuda)


def test_cxx_standard_from_torchs_cmake_config_without_a_guard_else_one_line(tmp_path):
    assert build_plan.torch_cxx_standard(fake_torch(tmp_path, "#pragma once\n", "    CXX_STANDARD 23\n)\n")) == 23
    with pytest.raises(build_plan.PlanError, match="cannot tell which C.. standard") as error:
        build_plan.torch_cxx_standard(fake_torch(tmp_path / "bare"))
    assert "\n" not in str(error.value)


def test_the_pinned_torch_needs_cxx17():
    # The standard of the cached CPU wheel: were it another, that wheel would no longer be what its key promises.
    assert build_plan.torch_cxx_standard(os.path.dirname(torch.__file__)) == 17


def test_cache_key_extra_names_the_toolkit_of_an_nccl_build_only():
    _, assigned = parse(build_plan.plan(dataclasses.replace(H100_MACHINE, nvcc_version="12.8"), ENV))
    assert assigned["cache_key_extra"] == "nvcc 12.8"
    _, assigned = parse(build_plan.plan(H100_MACHINE, {**ENV, "BUILD_NCCL": "0"}))
    assert assigned["cache_key_extra"] == "" and assigned["cuda_standard"] == ""


def test_strip_only_where_there_is_one():
    lines = build_plan.plan(dataclasses.replace(DEV_MACHINE, strip=None), ENV)
    assert parse(lines)[1]["strip"] == "" and any("keeps RelWithDebInfo's debug info" in line for line in lines)


def test_nccl_build_fails_in_one_line_when_a_piece_is_missing():
    assert "nccl.h" in plan_error(dataclasses.replace(H100_MACHINE, nccl_wheel=None))
    searched = "/usr/local (/usr/local/bin/nvcc resolved, no include/cuda_runtime.h, libcudart.so)"
    message = plan_error(dataclasses.replace(H100_MACHINE, cuda_home=None, cuda_search=searched))
    assert "no CUDA toolkit" in message and searched in message  # says what was looked at
    assert "3.18" in plan_error(dataclasses.replace(H100_MACHINE, cmake_version="3.17.5"))  # no CUDA 17 before it
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
    assert assigned["cxx_standard"] == "17" and assigned["cuda_standard"] == "" and assigned["cache_key_extra"] == ""
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
