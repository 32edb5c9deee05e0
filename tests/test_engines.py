"""The process-group seam (run/distributed.py): which engine a launch gets, the one-line errors of the
combinations that cannot run, the single engine on a machine without Horovod, the same numbers as a 1-rank
Horovod job, checkpoints that move between engines, and the layers of the packages."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from run import distributed
from run.errors import UsageError
from run.step_counter import StepCounter
from tests.conftest import ROOT
from tests.test_torch_engine import TORCHRUN_VARIABLES
from tests.trainer_runs import (SMALL, assert_checkpoints_bitwise_equal, main_in_process, read_metrics, step_losses,
                                trainer)

ONE_EPOCH = [*SMALL, "--epochs", "1", "--warmup-epochs", "0", "--log-every", "1", "--knn-every", "0"]
@pytest.fixture(scope="module")
def without_horovod(tmp_path_factory):
    """A PYTHONPATH on which `import horovod` fails, as on a machine where it was never built."""
    fake = tmp_path_factory.mktemp("no-horovod") / "horovod"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("No module named horovod (hidden by the test)")\n')
    return {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}


@pytest.fixture(scope="module")
def single_run(tiny_dataset, without_horovod, tmp_path_factory):
    """(run directory, its CompletedProcess) of ONE_EPOCH as one plain process, without Horovod. Tests copy it."""
    out = tmp_path_factory.mktemp("single") / "run"
    return out, trainer("--data", tiny_dataset, "--out", out, *ONE_EPOCH, num_ranks=None, env=without_horovod)


@pytest.mark.parametrize("requested, environment, expected", [
    ("auto", {}, "single"),
    ("auto", {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "horovod"),
    ("auto", {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, "horovod"),
    ("single", {}, "single"),
    ("single", {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "1"}, "single"),  # horovodrun -np 1: one process anyway
    ("horovod", {}, "horovod"),  # a 1-rank Horovod job without a launcher
])
def test_the_engine_a_launch_gets(requested, environment, expected, no_launcher, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert distributed.resolve_engine(requested) == expected


@pytest.mark.parametrize("environment", [{"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"},
                                         {"PMI_RANK": "0", "PMI_SIZE": "3"}])
def test_single_under_a_launcher_of_more_ranks_is_one_line(environment, no_launcher, monkeypatch):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    size = int(list(environment.values())[1])
    with pytest.raises(UsageError, match=f"--engine single: this process was launched as one of {size} ranks; "
                                         "drop --engine single under a launcher"):
        distributed.resolve_engine("single")


def test_horovod_without_horovod_is_one_line(no_launcher, monkeypatch):
    monkeypatch.setitem(sys.modules, "run.horovod_engine", None)  # its import fails as without horovod
    with pytest.raises(UsageError, match=r"--engine horovod: Horovod cannot be imported .*`make setup` builds it, "
                                         r"or run without a launcher: python trainer.py --engine single"):
        distributed.resolve_engine("horovod")
    assert distributed.resolve_engine("auto") == "single"  # auto never asks for it without a launcher


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction op must be one of"):
        distributed.SingleProcess().allreduce(__import__("torch").ones(1), op="product")


def test_single_engine_collectives_are_copies_over_one_rank():
    import torch
    world, tensor = distributed.SingleProcess(), torch.arange(6.0).view(3, 2)
    with StepCounter() as counted:
        results = [world.allreduce(tensor, op="average", name="a"), world.allgather(tensor, name="b"),
                   world.alltoall(tensor, splits=[3], name="c")[0], *world.grouped_allreduce([tensor], name="d")]
    assert all(torch.equal(result, tensor) and result.data_ptr() != tensor.data_ptr() for result in results)
    assert counted.collectives == ["allreduce a", "allgather b", "alltoall c", "grouped_allreduce d"]
    assert world.alltoall(tensor, splits=[3])[1].tolist() == [3]
    assert world.allgather_object("x") == ["x"] and world.broadcast_object(5) == 5
    with pytest.raises(ValueError, match="alltoall over one rank sends all 3 rows to itself"):
        world.alltoall(tensor, splits=[2])


@pytest.mark.parametrize("engine, environment, message", [
    ("horovod", {}, "--engine horovod: Horovod cannot be imported"),
    ("single", {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"}, "--engine single: this process was launched as one of 2 "
                                                           "ranks"),
    ("torch", {}, "--engine torch: this process was not started by torchrun"),
    ("horovod", TORCHRUN_VARIABLES, "--engine horovod: this process was started by torchrun"),
])
def test_bad_engine_combinations_stop_the_trainer_with_one_line(engine, environment, message, no_launcher,
                                                                monkeypatch, capsys, tmp_path):
    """trainer.py's main() in this process, Horovod hidden as on a machine without it: no launch here needs it."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, "run.horovod_engine", None)  # its import fails as without horovod
    monkeypatch.setattr(distributed, "_started", None)  # the engine is chosen, and refused, as the run starts
    result = main_in_process(monkeypatch, capsys, "--engine", engine, "--out", tmp_path / "never")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "never").exists()  # nothing was started, nothing written


@pytest.mark.horovod
def test_single_engine_trains_and_evaluates_without_horovod(single_run, without_horovod, tmp_path):
    out, result = tmp_path / "single", single_run[1]
    shutil.copytree(single_run[0], out)
    assert result.stdout.startswith("engine single: 1 rank; rank 0 cpu; torch threads 1 (OMP_NUM_THREADS)")
    assert len(step_losses(read_metrics(out), 1)) == 30  # 120 images / 4 per step
    linear = trainer("linear", "--ckpt", out, "--epochs", "1", "--batch-size", "32", num_ranks=None,
                     env=without_horovod)
    knn = trainer("knn", "--ckpt", out, num_ranks=None, env=without_horovod)
    assert "engine single" in linear.stdout and "engine single" in knn.stdout
    evaluations = [record for record in read_metrics(out) if "epoch" not in record]
    assert "pretrained/linear_top1" in evaluations[0] and "pretrained/knn20_top1" in evaluations[1]


@pytest.mark.horovod
def test_single_engine_computes_what_a_one_rank_horovod_job_computes(single_run, tiny_dataset, tmp_path):
    runs = {"single": single_run[0], "horovod": tmp_path / "horovod"}
    result = trainer("--data", tiny_dataset, "--out", runs["horovod"], *ONE_EPOCH, num_ranks=1)
    for name, output in (("single", single_run[1].stdout), ("horovod", result.stdout)):
        assert f"engine {name}: 1 rank;" in output.splitlines()[0]  # horovodrun prefixes "[0]<stdout>:"
    losses = {name: step_losses(read_metrics(out), 1) for name, out in runs.items()}
    assert len(losses["single"]) == 30 and losses["single"] == losses["horovod"]  # bitwise
    assert_checkpoints_bitwise_equal(runs["single"] / "checkpoint-0001", runs["horovod"] / "checkpoint-0001")


@pytest.mark.horovod
def test_a_single_engine_checkpoint_resumes_under_horovodrun(single_run, tiny_dataset, tmp_path):
    """The other way (horovodrun -np 2 -> single) is tests/test_trainer.py's one-rank resume."""
    out = tmp_path / "moved"
    shutil.copytree(single_run[0], out)
    result = trainer("--data", tiny_dataset, "--out", out, *ONE_EPOCH, "--epochs", "2", num_ranks=2)
    assert "engine horovod: 2 ranks" in result.stdout and "written by 1 ranks" in result.stdout
    assert sorted(p.name for p in (out / "checkpoint-0002").iterdir()) == ["shard-0.pt", "shard-1.pt", "state.pt"]
    assert [m["epoch"] for m in read_metrics(out) if "epoch_loss" in m] == [1, 2]


# -------------------------------------------------------------------------------- layers
PACKAGES = ("kernels", "run", "data", "model")
# What each layer must not import: kernels/ is reused alone, run/ is below the network and the data, and the
# data know nothing of the network.
FORBIDDEN = {"kernels": {"run", "data", "model", "settings", "trainer"}, "run": {"data", "model", "settings", "trainer"},
             "data": {"model", "settings", "trainer"}, "model": {"settings", "trainer"}}
HOROVOD_IMPORTERS = ["run/horovod_engine.py", "run/horovodrun.py"]  # the engine, and the launcher run/launch.py starts


def imported_modules(path):
    """The top-level names of every module `path` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def project_files():
    return [*sorted(p for package in (*PACKAGES, "bench") for p in (ROOT / package).rglob("*.py")),
            ROOT / "trainer.py", ROOT / "settings.py"]


def test_no_layer_imports_one_above_it():
    violations = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imported_modules(path):
                if name.split(".")[0] in FORBIDDEN[package]:
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert violations == []


def run_modules_imported(path):
    """The modules of run/ that `path` imports, at any depth of its code (a function's import is a dependency too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "run":
            names.update(f"run.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.startswith("run.")}


def test_the_modules_of_run_import_each_other_without_a_circle():
    imports = {f"run.{path.stem}": run_modules_imported(path) for path in (ROOT / "run").glob("*.py")}
    placed, remaining = [], dict(imports)
    while remaining:  # Kahn's order: a module is placed once everything it imports is
        ready = sorted(name for name, needs in remaining.items() if needs <= set(placed))
        assert ready, f"import circle among {sorted(remaining)}: {remaining}"
        placed += ready
        for name in ready:
            del remaining[name]
    assert {"run.distributed", "run.faults", "run.torch_engine", "run.horovod_engine"} <= set(placed)


def test_importing_run_and_a_classifier_step_on_the_cpu_import_no_triton():
    """Every module of run/ but StepCounter (run/step_counter.py counts Triton launches: it alone may import Triton)
    and Horovod's importers, then a CPU classifier step: kernels/ imports Triton only for its Triton backend, so a
    CPU rank is spared its import."""
    modules = [f"run.{path.stem}" for path in sorted((ROOT / "run").glob("*.py")) if path.stem not in
               ("__init__", "step_counter", *(Path(importer).stem for importer in HOROVOD_IMPORTERS))]
    script = f"""if True:
        import sys
        import {', '.join(modules)}
        print(sorted(m for m in sys.modules if m.startswith('triton')))
        import torch, trainer, kernels
        from run.distributed import start
        start(announce=False)  # the single engine: a plain process
        from model.classifier import ShardedInstanceClassifier
        classifier = ShardedInstanceClassifier(20, 8, smooth_k=2, smooth_alpha=0.1)  # backend auto: chunked here
        features = torch.randn(4, 8, requires_grad=True)
        kernels.seed_rows_(classifier.weight.detach(), features.detach(), torch.arange(4), 0)
        classifier(features, torch.arange(4)).loss.backward()
        assert features.grad is not None
        print(sorted(m for m in sys.modules if m.startswith('triton')))"""
    found = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    after_the_imports, after_the_step = found.stdout.splitlines()
    assert after_the_imports == "[]", f"importing {modules} imported Triton"
    assert after_the_step == "[]", "a CPU classifier step imported Triton"


def test_only_the_engine_module_imports_horovod():
    importers = [str(path.relative_to(ROOT)) for path in project_files()
                 if any(name.split(".")[0] == "horovod" for name in imported_modules(path))]
    assert importers == HOROVOD_IMPORTERS
