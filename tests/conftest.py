"""Shared test helpers: launching real multi-process Horovod and torchrun jobs (gloo, localhost, no ssh)."""
import fcntl
import functools
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from run.launch import launch

# Without CUDA the Triton kernels run on CPU tensors through Triton's interpreter, which has to be
# chosen before triton is first imported (torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
WORKERS = ROOT / "tests" / "workers"


# Markers (pytest.ini): `horovod` on every test that starts a Horovod job and `torchrun` on every test that
# starts a torchrun job (enforced: horovod_job fails a test without it), `slow` on those (added here) and on the
# tests that take seconds on 2 CPU cores anyway. `pytest -m "not slow" tests` is the fast subset,
# `-m "not horovod and not torchrun"` skips the multi-process jobs; CI runs all.
_running = None  # the test being set up or run: module-scoped fixtures start their jobs inside its setup


def pytest_runtest_setup(item):
    global _running
    _running = item


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("horovod") or item.get_closest_marker("torchrun"):
            item.add_marker(pytest.mark.slow)


def horovod_job(num_ranks, script, *args, env=None, launcher="horovod", **options):
    """run/launch.py's (command, environment) of `python script args` as `num_ranks` Horovod ranks, or as one
    plain `python` process (num_ranks=None), a 1-rank job, used to check that path too; launcher="torchrun": as
    num_ranks torchrun workers, their output prefixed "[defaultR]:" per local rank R. options: launch()'s
    placement (hosts, nodes, rendezvous, max_restarts). env entries set to None are unset."""
    marker = {"horovod": "horovod", "torchrun": "torchrun"}[launcher]
    if _running is not None and _running.get_closest_marker(marker) is None:
        pytest.fail(f"{_running.nodeid} starts a {launcher} job: mark it @pytest.mark.{marker} (tests/conftest.py)")
    engine = "torch" if launcher == "torchrun" else "single" if num_ranks is None else "horovod"
    # One intra-op thread per rank: 2 cores shared by up to 3 ranks would otherwise thrash.
    return launch(engine, num_ranks or 1, script, *args, tee=engine == "torch", **options,
                  env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def run_horovod(num_ranks, script, *args, timeout=600, check=True, **options):
    """Run a horovod_job (or a torchrun one) to its end; with check, fail the test with the output on a non-zero
    exit."""
    command, full_env = horovod_job(num_ranks, script, *args, **options)
    result = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def horovod():
    """Fixture form of run_horovod, so tests read `horovod(2, WORKERS / "x.py", out)`."""
    return run_horovod


@pytest.fixture
def no_launcher(monkeypatch):
    """This process's environment as started without a launcher: none of the variables that horovodrun, mpirun
    or torchrun set (run/distributed.py reads them to choose the engine)."""
    from run import distributed
    for name in (*distributed.TORCH_LAUNCH_VARIABLES, "TORCHELASTIC_RUN_ID",
                 *(name for pair in distributed.HOROVOD_LAUNCH_VARIABLES for name in pair if name)):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def single_engine(monkeypatch):
    """The single-process engine as this test process's process group (run/distributed.py): what the modules
    that ask for the started engine get, without start()'s process-wide hooks (excepthook, threads)."""
    from run import distributed
    engine = distributed.SingleProcess()
    engine.threads = torch.get_num_threads()  # start() would share the cores out; this process keeps its own
    monkeypatch.setattr(distributed, "_started", engine)
    return engine


def built_once(tmp_path_factory, name, build):
    """build(directory) -> value, run once per test session by whichever pytest-xdist worker asks first: the
    others wait for it (a file lock) and get the same directory and value (pickled), instead of building their own.
    A build that raises leaves no pickle, so the next worker to ask builds again, in an emptied directory (and fails
    the same way)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    built = root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        if not built.exists():
            directory = root / name
            shutil.rmtree(directory, ignore_errors=True)  # what a failed build left
            directory.mkdir()
            built.write_bytes(pickle.dumps(build(directory)))
        return pickle.loads(built.read_bytes())


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """12 train and 4 val images per digit of the built-in data (tests/trainer_runs.py), one copy that every test
    reads and none writes into: the run directories of reference_run index it."""
    from tests.trainer_runs import copy_tiny_dataset  # trainer_runs imports this module
    return built_once(tmp_path_factory, "tiny", lambda directory: copy_tiny_dataset(directory / "data"))


@pytest.fixture(scope="session")
def reference_run(tiny_dataset, tmp_path_factory):
    """reference_run(launcher) -> (run directory, its CompletedProcess): trainer.py's TWO_EPOCHS run on the
    tiny_dataset at P = 2 under horovodrun ("horovod") or torchrun ("torchrun"), uninterrupted, trained once per
    session when a test first asks for it: what interrupted, killed and resumed runs must reproduce. Tests copy
    the directory; none writes into it."""
    from tests.trainer_runs import TWO_EPOCHS, trainer

    def train(launcher, directory):
        out = directory / "run"
        return out, trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, launcher=launcher)
    # functools.cache: this worker reads the shared result once, not at every test that asks
    return functools.cache(lambda launcher: built_once(tmp_path_factory, f"{launcher}-reference",
                                                       lambda directory: train(launcher, directory)))


def load_bench_script(name):
    """bench/NAME.py as a module (the scripts are run by path, not imported as a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
