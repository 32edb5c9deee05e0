"""How to build Horovod 0.28.1 on this machine: the fixes it needs, printed as shell lines for build-horovod.sh.

The environment is read once into `Facts` (`probe`); `plan` turns facts into lines and is pure, so
tests/test_build_horovod.py checks it on made-up machines without building. Each fix, the machines that need
it and what the cache key holds: .ci/README.md. A machine that cannot build says why in one line
(`PlanError`) before any work. Run it with the Python that will hold Horovod:

    python .ci/horovod_build_plan.py [--sdist-dir DIR] [--facts JSON]   the plan, as shell lines
    python .ci/horovod_build_plan.py --verify DIR                       DIR holds what an offline build needs

BUILD_NCCL=auto|1|0 (default auto: NCCL exactly when torch has CUDA), HOROVOD_BUILD_CUDA_CC_LIST and
HOROVOD_CUDA_HOME / CUDA_HOME (the toolkit) override.
"""
import argparse
import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

SDIST_NAME = "horovod-0.28.1.tar.gz"
SDIST_SHA256 = "92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0"
# The flags of every build; the cache key hashes the HOROVOD_* variables, so these names and values must not
# change: the CPU build's cached wheel is found by them.
BASE_EXPORTS = {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITHOUT_TENSORFLOW": "1", "HOROVOD_WITHOUT_MXNET": "1",
                "HOROVOD_WITH_GLOO": "1", "HOROVOD_WITHOUT_MPI": "1", "HOROVOD_CPU_OPERATIONS": "gloo"}
DEFAULT_CUDA_CC = "90"  # Hopper, the GPU this project is tuned for
CMAKE_MIN_VERSION = (3, 13)  # below it Horovod's setup.py pip-installs a CMake (needs network)
# The includes of horovod/common/group_table.h (0.28.1) and what it and its neighbours use from elsewhere.
INCLUDE_PROBE = """#include <mutex>
#include <queue>
#include <unordered_map>
#include <vector>
int32_t group_id(const std::string& name) { if (name.empty()) throw std::runtime_error(name); return 0; }
"""
MISSING_INCLUDES = "-include string -include cstdint -include stdexcept"
OFFLINE_WHEELS = ("cffi", "pycparser")  # cffi needs pycparser
CUDA_STANDARD = 17  # what every CMake and nvcc that can build for a CUDA torch accept (.ci/README.md)
CMAKE_CUDA17_VERSION = (3, 18)  # the first CMake that passes a CUDA 17 flag to nvcc
# Where toolkits install when neither a variable nor the nvcc on PATH names one (the installers' /usr/local/cuda
# link, its versioned folders, Arch's /opt/cuda); versioned folders newest first.
USUAL_CUDA_HOMES = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")
CUDA_HOME_VARIABLES = ("HOROVOD_CUDA_HOME", "CUDA_HOME", "CUDA_PATH")


class PlanError(Exception):
    """This machine cannot build Horovod as asked; the message says what is missing, in one line."""


@dataclasses.dataclass
class Facts:
    python_version: str
    torch_version: str
    torch_cuda: str | None           # torch.version.cuda: None for a CPU-only torch
    gpu_capabilities: list[str]      # visible GPUs' compute capabilities, e.g. ["90"]; [] when none
    torch_cxx_standard: int          # the C++ standard torch's headers require (`torch_cxx_standard`), e.g. 17
    cuda_home: str | None            # the CUDA toolkit (`find_cuda_home`); None when none was found
    cuda_search: str                 # how cuda_home was found, or where a toolkit was looked for in vain
    nvcc_version: str | None         # e.g. "13.0"
    cmake_version: str | None        # of the cmake Horovod's setup.py will run
    cxx: str | None                  # the C++ compiler CMake will pick
    cxx_needs_includes: bool         # its standard library does not give group_table.h what it uses
    nccl_wheel: str | None           # the nvidia-nccl pip package's folder (include/nccl.h, lib/libnccl.so.2)
    nccl_system: bool                # nccl.h and libnccl.so / libnccl_static.a where Horovod's finder looks
    installed: list[str]             # which of OFFLINE_WHEELS are importable
    strip: str | None                # the strip tool, None when absent
    sdist_dir: str | None = None     # the local folder to build from (offline), if any
    sdist_sha256: str | None = None  # of SDIST_NAME in sdist_dir, None when absent
    offline_wheels: list[str] = dataclasses.field(default_factory=list)  # *.whl names in sdist_dir


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text or "")[:2])


def run_text(command):
    """stdout and stderr of `command`, "" when it cannot run."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr
    except (OSError, subprocess.SubprocessError):
        return ""


def toolkit_lacks(home):
    """What `home` lacks of the CUDA toolkit CMake's FindCUDAToolkit needs, as a phrase; "" for a toolkit."""
    if not os.path.isdir(home):
        return "absent"
    lacks = [piece for piece, present in (
        ("bin/nvcc", os.path.isfile(f"{home}/bin/nvcc") and os.access(f"{home}/bin/nvcc", os.X_OK)),
        ("include/cuda_runtime.h", os.path.isfile(f"{home}/include/cuda_runtime.h")),
        ("libcudart.so", any(glob.glob(f"{home}/{lib}/libcudart.so*") for lib in ("lib64", "lib", "targets/*/lib"))),
    ) if not present]
    return f"no {', '.join(lacks)}" if lacks else ""


def nvcc_homes(nvcc):
    """[(home, origin)] for the nvcc at `nvcc` on PATH: where it says it lives, then where its links lead. A wrapper
    script outside the toolkit answers from the real nvcc it runs, whose verbose dry run prints TOP (above its bin)."""
    answer = run_text([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull])
    told = re.findall(r"^#\$ TOP=(.+?)\s*$", answer, re.MULTILINE)[:1]
    return ([(os.path.realpath(top), f"TOP of {nvcc} -v --dryrun") for top in told]
            + [(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"{nvcc} resolved")])


def find_cuda_home(env, usual_homes=USUAL_CUDA_HOMES):
    """(the CUDA toolkit or None, how it was found or where it was looked for), in torch.utils.cpp_extension's order:
    the variables (the first one set decides: a wrong one is reported, not passed over), the nvcc on PATH (asked, then
    resolved), the usual places. A home holds the toolkit (`toolkit_lacks`), not merely a bin/nvcc."""
    given = next((name for name in CUDA_HOME_VARIABLES if env.get(name)), None)
    if given:
        lacks = toolkit_lacks(env[given])
        return (None, f"{env[given]} (${given}, {lacks})") if lacks else (env[given], f"${given}")
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates = nvcc_homes(nvcc) if nvcc else []
    for pattern in usual_homes:
        found = sorted(glob.glob(pattern), key=lambda home: version_tuple(os.path.basename(home)), reverse=True)
        candidates += [(os.path.realpath(home), f"{home}, a usual place") for home in found or [pattern]]
    looked_at, seen = [] if nvcc else ["no nvcc on PATH"], set()
    for home, origin in candidates:
        if home in seen:
            continue
        seen.add(home)
        lacks = toolkit_lacks(home)
        if not lacks:
            return home, origin
        looked_at.append(f"{home} ({origin}, {lacks})")
    return None, "; ".join(looked_at)


def torch_cxx_standard(torch_dir):
    """The C++ standard the torch installed at `torch_dir` requires: the lowest one the guard atop ATen/ATen.h
    accepts (`__cplusplus < 202002L`: the standard's year and month, 2020 for C++20), else the CXX_STANDARD its
    CMake config sets for its users; PlanError when torch says neither."""
    def read(path):
        try:
            with open(f"{torch_dir}/{path}") as file:
                return file.read()
        except OSError:
            return ""

    guard = re.search(r"__cplusplus\s*<\s*(\d{4})\d{2}L", read("include/ATen/ATen.h"))
    if guard:
        return int(guard.group(1)) - 2000
    declared = re.search(r"\bCXX_STANDARD\s+(\d+)", read("share/cmake/Torch/TorchConfig.cmake"))
    if declared:
        return int(declared.group(1))
    raise PlanError(f"cannot tell which C++ standard the torch in {torch_dir} needs: no __cplusplus guard in "
                    "include/ATen/ATen.h and no CXX_STANDARD in share/cmake/Torch/TorchConfig.cmake")


def find_cxx(env):
    """CMake's choice: $CXX, else the first of c++, g++, clang++ on PATH."""
    if env.get("CXX"):
        return env["CXX"]
    return next(filter(None, (shutil.which(name, path=env.get("PATH")) for name in ("c++", "g++", "clang++"))), None)


def needs_includes(cxx):
    result = subprocess.run([*shlex.split(cxx), "-std=c++17", "-fsyntax-only", "-x", "c++", "-"],
                            input=INCLUDE_PROBE, capture_output=True, text=True, timeout=120)
    return result.returncode != 0


def find_nccl_wheel():
    """nvidia/nccl under an entry of sys.path: looked for, not imported, because `nvidia` is a namespace
    package that another distribution (DALI) can make a regular one elsewhere on the path."""
    for entry in sys.path:
        folder = os.path.join(os.path.abspath(entry or "."), "nvidia", "nccl")
        if os.path.exists(f"{folder}/include/nccl.h") and glob.glob(f"{folder}/lib/libnccl.so*"):
            return folder
    return None


def has_system_nccl(cuda_home):
    roots = [cuda_home] if cuda_home else []
    includes = [f"{root}/include" for root in [*roots, "/usr", "/usr/local"]]
    libs = [f"{root}/{sub}" for root in [*roots, "/usr", "/usr/local"] for sub in ("lib64", "lib", "lib/x86_64-linux-gnu")]
    return (any(os.path.exists(f"{folder}/nccl.h") for folder in includes)
            and any(os.path.exists(f"{folder}/{name}") for folder in libs for name in ("libnccl.so", "libnccl_static.a")))


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_sdist_dir(sdist_dir):
    """(sha256 of the sdist or None, the wheel file names) of a local build folder."""
    if not os.path.isdir(sdist_dir):
        raise PlanError(f"sdist folder '{sdist_dir}' does not exist")
    sdist = os.path.join(sdist_dir, SDIST_NAME)
    return (sha256_of(sdist) if os.path.exists(sdist) else None,
            sorted(os.path.basename(path) for path in glob.glob(os.path.join(sdist_dir, "*.whl"))))


def probe(env, sdist_dir=None):
    """Read the facts `plan` decides on from this Python, its torch and the tools on PATH."""
    try:
        import torch
    except ImportError:
        raise PlanError(f"torch is not installed in {sys.executable}: install the requirements first") from None
    cuda_home, cuda_search = find_cuda_home(env)
    cmake = env.get("HOROVOD_CMAKE") or shutil.which("cmake", path=env.get("PATH"))  # what setup.py runs
    cxx = find_cxx(env)
    capabilities = []
    if torch.version.cuda and torch.cuda.is_available():
        capabilities = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    sdist_dir = sdist_dir and os.path.abspath(sdist_dir)  # the plan then reads the same from any folder
    sdist_sha256, offline_wheels = probe_sdist_dir(sdist_dir) if sdist_dir else (None, [])
    return Facts(
        python_version=sys.version.split()[0], torch_version=torch.__version__, torch_cuda=torch.version.cuda,
        gpu_capabilities=capabilities, torch_cxx_standard=torch_cxx_standard(os.path.dirname(torch.__file__)),
        cuda_home=cuda_home, cuda_search=cuda_search,
        nvcc_version=(re.findall(r"release (\d+\.\d+)", run_text([f"{cuda_home}/bin/nvcc", "--version"]))
                      or [None])[0] if cuda_home else None,
        cmake_version=(re.findall(r"version\s*([\d.]+)", run_text([cmake, "--version"])) or [None])[0] if cmake else None,
        cxx=cxx, cxx_needs_includes=bool(cxx) and needs_includes(cxx),
        nccl_wheel=find_nccl_wheel(), nccl_system=has_system_nccl(cuda_home),
        installed=[name for name in OFFLINE_WHEELS if importlib.util.find_spec(name)],
        strip=shutil.which("strip", path=env.get("PATH")),
        sdist_dir=sdist_dir, sdist_sha256=sdist_sha256, offline_wheels=offline_wheels)


def wants_nccl(facts, env):
    choice = env.get("BUILD_NCCL", "auto")
    if choice not in ("auto", "1", "0"):
        raise PlanError(f"BUILD_NCCL={choice!r}: use auto, 1 or 0")
    if choice == "1" and not facts.torch_cuda:
        raise PlanError(f"BUILD_NCCL=1 but torch {facts.torch_version} is CPU-only: install a CUDA torch first")
    return choice == "1" or (choice == "auto" and bool(facts.torch_cuda))


def wheel_fits(wheel, name, python_version):
    """Is `wheel` (a file name) one of `name`'s, for `python_version` ("3.12"; None: for any Python)?"""
    parts = wheel[:-len(".whl")].split("-")  # name-version[-build]-pythontags-abi-platform
    if parts[0].lower() != name:
        return False
    if python_version is None:
        return True
    major, minor = python_version.split(".")[:2]
    return bool({f"cp{major}{minor}", f"py{major}", f"py{major}{minor}"} & set(parts[-3].split(".")))


def check_offline_dir(sdist_sha256, wheel_names, sdist_dir, needed, python_version=None):
    """The one-line error for a local build folder that lacks the sdist, has a wrong one, or lacks a wheel."""
    if sdist_sha256 is None:
        raise PlanError(f"no {SDIST_NAME} in '{sdist_dir}' (offline build): run bench/gpu/fetch_gpu_wheels.sh where "
                        "there is network and copy the folder here")
    if sdist_sha256 != SDIST_SHA256:
        raise PlanError(f"{sdist_dir}/{SDIST_NAME} has sha256 {sdist_sha256}, expected {SDIST_SHA256}: "
                        "a corrupt or different file")
    missing = [name for name in needed if not any(wheel_fits(wheel, name, python_version) for wheel in wheel_names)]
    if missing:
        for_python = f" for Python {python_version}" if python_version else ""
        raise PlanError(f"{' and '.join(missing)} not installed and no {'/'.join(missing)} wheel{for_python} in "
                        f"'{sdist_dir}': Horovod's setup.py needs cffi to build (bench/gpu/fetch_gpu_wheels.sh fetches "
                        "them for Python 3.12)")


def nccl_exports(facts, env, cache_root):
    """(lines, NCCL wheel folder to link or None) for an NCCL build; PlanError when a piece is missing."""
    if not facts.cuda_home:
        raise PlanError(f"torch {facts.torch_version} has CUDA {facts.torch_cuda} but no CUDA toolkit (bin/nvcc, "
                        f"include/cuda_runtime.h, libcudart.so) was found; looked at {facts.cuda_search}: install "
                        "the toolkit, set CUDA_HOME to it, or BUILD_NCCL=0 for a CPU-only Horovod")
    if facts.cmake_version and version_tuple(facts.cmake_version) < CMAKE_CUDA17_VERSION:
        raise PlanError(f"cmake {facts.cmake_version} cannot compile CUDA {CUDA_STANDARD} (3.18 or newer can): install "
                        "a newer cmake (or point $HOROVOD_CMAKE at one), or BUILD_NCCL=0 for a CPU-only Horovod")
    cc_list = env.get("HOROVOD_BUILD_CUDA_CC_LIST") or ",".join(facts.gpu_capabilities) or DEFAULT_CUDA_CC
    if not re.fullmatch(r"\d+(,\d+)*", cc_list):
        raise PlanError(f"HOROVOD_BUILD_CUDA_CC_LIST={cc_list!r}: want compute capabilities like 90 or 80,90")
    cc_origin = ("$HOROVOD_BUILD_CUDA_CC_LIST" if env.get("HOROVOD_BUILD_CUDA_CC_LIST")
                 else "the visible GPUs" if facts.gpu_capabilities else "default: no GPU visible")
    lines = [f"# torch {facts.torch_version} has CUDA {facts.torch_cuda}, nvcc {facts.nvcc_version} in "
             f"{facts.cuda_home} ({facts.cuda_search}): NCCL operations, CUDA {CUDA_STANDARD}, code for compute "
             f"capability {cc_list} ({cc_origin})",
             export("HOROVOD_GPU_OPERATIONS", "NCCL"), export("HOROVOD_CUDA_HOME", facts.cuda_home),
             export("CUDA_HOME", facts.cuda_home), export("CUDACXX", f"{facts.cuda_home}/bin/nvcc"),
             export("HOROVOD_BUILD_CUDA_CC_LIST", cc_list)]
    if any(env.get(name) for name in ("HOROVOD_NCCL_HOME", "HOROVOD_NCCL_INCLUDE", "HOROVOD_NCCL_LIB")):
        return lines + ["# NCCL: where $HOROVOD_NCCL_HOME / _INCLUDE / _LIB say"], None
    if facts.nccl_wheel:
        return lines + [f"# NCCL from the pip wheel {facts.nccl_wheel}: linked as lib/libnccl.so in a folder of its own",
                        export("HOROVOD_NCCL_HOME", f"{cache_root}/nccl-from-wheel"),
                        export("HOROVOD_NCCL_LINK", "SHARED")], facts.nccl_wheel
    if facts.nccl_system:
        return lines + ["# NCCL: the system's, found by Horovod's finder"], None
    raise PlanError(f"NCCL requested (torch has CUDA {facts.torch_cuda}) but no nccl.h + libnccl found (pip wheel "
                    f"nvidia-nccl-cu{facts.torch_cuda.split('.')[0]}, {facts.cuda_home}, /usr): install one, set "
                    "HOROVOD_NCCL_HOME, or BUILD_NCCL=0 for a CPU-only Horovod")


def export(name, value):
    return f"export {name}={shlex.quote(value)}"


def assign(name, value):
    return f"{name}={shlex.quote(str(value))}"


def plan(facts, env):
    """Shell lines for build-horovod.sh: comments saying why, exports, and the variables it acts on."""
    cache_root = f"{env.get('XDG_CACHE_HOME') or env.get('HOME', '') + '/.cache'}/instance-classifier"
    offline = facts.sdist_dir is not None
    to_install = [name for name in OFFLINE_WHEELS if name not in facts.installed] if offline else []
    if offline:
        check_offline_dir(facts.sdist_sha256, facts.offline_wheels, facts.sdist_dir, to_install,
                          ".".join(facts.python_version.split(".")[:2]))
    cmake = version_tuple(facts.cmake_version)
    if offline and cmake < CMAKE_MIN_VERSION:
        raise PlanError(f"cmake >= 3.13 not found (found: {facts.cmake_version or 'none'} on PATH or $HOROVOD_CMAKE), "
                        "and without network Horovod's setup.py cannot fetch one: install cmake")
    if not facts.cxx:
        raise PlanError("no C++ compiler ($CXX, c++, g++, clang++): install g++")
    lines = [f"# python {facts.python_version}, torch {facts.torch_version}, cmake {facts.cmake_version}, {facts.cxx}",
             *(export(name, value) for name, value in BASE_EXPORTS.items()),
             f"# torch {facts.torch_version}'s headers require C++{facts.torch_cxx_standard}: the C++ standard of both "
             "CMake files"]
    nccl_wheel = None
    build_nccl = wants_nccl(facts, env)
    if build_nccl:
        nccl_lines, nccl_wheel = nccl_exports(facts, env, cache_root)
        lines += nccl_lines
    else:
        lines.append(f"# torch {facts.torch_version}: {'CPU-only' if not facts.torch_cuda else 'BUILD_NCCL=0'}, gloo only "
                     "(no NCCL, whatever nvcc is on PATH)")
    if cmake >= (4,):
        lines += ["# CMake >= 4 refuses the cmake_minimum_required(VERSION 2.8.12) of gloo and flatbuffers",
                  export("CMAKE_POLICY_VERSION_MINIMUM", "3.5")]
    if facts.cxx_needs_includes:
        lines += ["# this C++ library does not give group_table.h std::string and int32_t through its includes",
                  export("CXXFLAGS", f"{env.get('CXXFLAGS', '')} {MISSING_INCLUDES}".strip())]
    lines.append(f"# debug info stripped from the built libraries by {facts.strip}" if facts.strip
                 else "# no strip on PATH: the wheel keeps RelWithDebInfo's debug info")
    lines += [f"# sdist: {f'{facts.sdist_dir}/{SDIST_NAME} (offline)' if offline else 'pip download'}"
              f"{'; installs ' + ', '.join(to_install) + ' from there' if to_install else ''}",
              assign("cache_root", cache_root), assign("sdist_sha256", SDIST_SHA256),
              assign("sdist", os.path.join(facts.sdist_dir, SDIST_NAME) if offline else ""),
              assign("offline_dir", facts.sdist_dir or ""), assign("offline_installs", " ".join(to_install)),
              assign("nccl_wheel", nccl_wheel or ""), assign("cxx_standard", facts.torch_cxx_standard),
              assign("cuda_standard", CUDA_STANDARD if build_nccl else ""), assign("strip", facts.strip or ""),
              assign("cache_key_extra", f"nvcc {facts.nvcc_version}" if build_nccl else "")]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdist-dir", help="folder holding the sdist and the cffi/pycparser wheels: build offline "
                                            "from it (default: none, pip downloads the sdist)")
    parser.add_argument("--facts", help="JSON object of Facts fields that replace what was probed, to see the plan "
                                        "of another machine (default: none)")
    parser.add_argument("--verify", metavar="DIR", help="only check that DIR holds the sdist (sha256) and the "
                                                        "cffi and pycparser wheels (default: plan)")
    args = parser.parse_args()
    try:
        if args.verify:
            check_offline_dir(*probe_sdist_dir(args.verify), args.verify, OFFLINE_WHEELS)
            print(f"{args.verify}: {SDIST_NAME} (sha256 ok), {' and '.join(OFFLINE_WHEELS)} wheels")
            return
        facts = probe(os.environ, args.sdist_dir)
        if args.facts:
            facts = dataclasses.replace(facts, **json.loads(args.facts))
        print("\n".join(plan(facts, os.environ)))
    except PlanError as error:
        sys.exit(f"build-horovod: {error}")


if __name__ == "__main__":
    main()
