"""The torch.distributed engine (run/torch_engine.py) under real torchrun jobs (gloo): the same run as under
horovodrun, the collectives of a classifier step and what waiting for one costs, checkpoints that move between
engines, and the one-line errors of launches that cannot run (through the trainer: tests/test_engines.py). The
guarantees of a multi-rank run (an agreed stop with a checkpoint, Ctrl-C, a failing rank, rank 0's resume decision)
hold under every launcher: tests/test_reliability.py. The float64 oracle of the classifier under torchrun at
P = 1, 2, 3 is in tests/test_classifier.py."""
import json
import shutil
import socket

import pytest

from run import distributed
from run.errors import UsageError
from tests.conftest import ROOT, WORKERS, run_horovod
from tests.trainer_runs import SMALL, STEPS_PER_EPOCH, TWO_EPOCHS, rank_lines, read_metrics, step_losses

pytestmark = pytest.mark.torchrun
TORCHRUN_VARIABLES = {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


def torchrun(*args, num_ranks=2, **options):
    return run_horovod(num_ranks, ROOT / "trainer.py", *args, launcher="torchrun", **options)


# -------------------------------------------------------------------------------- choosing the engine
def test_torchruns_environment_gives_the_torch_engine(no_launcher, monkeypatch):
    for name, value in TORCHRUN_VARIABLES.items():
        monkeypatch.setenv(name, value)
    assert distributed.resolve_engine("auto") == distributed.resolve_engine("torch") == "torch"
    with pytest.raises(UsageError, match="--engine horovod: this process was started by torchrun"):
        distributed.resolve_engine("horovod")
    with pytest.raises(UsageError, match="--engine single: this process was launched as one of 2 ranks"):
        distributed.resolve_engine("single")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # torch's other launchers set the three variables alone
    assert distributed.resolve_engine("auto") == "torch"


def test_torch_outside_torchrun_is_one_line(no_launcher, monkeypatch):
    with pytest.raises(UsageError, match="--engine torch: this process was not started by torchrun"):
        distributed.resolve_engine("torch")
    monkeypatch.setenv("HOROVOD_RANK", "0")
    with pytest.raises(UsageError, match="--engine torch: this process was not started by torchrun"):
        distributed.resolve_engine("torch")


# -------------------------------------------------------------------------------- the same run, the same step
@pytest.mark.horovod
def test_torchrun_trains_the_run_horovodrun_trains(reference_run):
    """Per-step losses within 1e-5 relative, kNN within 0.5 points; every rank's loss bit-identical (it is what
    the stop check and the logs read, the same on every rank by construction)."""
    out, result = reference_run("torchrun")
    assert "engine torch: 2 ranks; rank 0 cpu; rank 1 cpu" in result.stdout
    horovod_out, _ = reference_run("horovod")
    for epoch in (1, 2):
        torch_losses, horovod_losses = (step_losses(read_metrics(run), epoch) for run in (out, horovod_out))
        assert len(torch_losses) == STEPS_PER_EPOCH
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(torch_losses, horovod_losses, strict=True))
    knn = [{record["epoch"]: record["knn20_top1"] for record in read_metrics(run) if "knn20_top1" in record}
           for run in (out, horovod_out)]
    assert abs(knn[0][2] - knn[1][2]) <= 0.5
    assert json.loads((out / "config.json").read_text())["engine"] == "torch"


@pytest.fixture(scope="module")
def classifier_collectives(tmp_path_factory):
    """{engine: [rank 0's, rank 1's report]} of tests/workers/classifier_collectives.py at P = 2 under torchrun
    and under horovodrun."""
    runs = {}
    for launcher, engine in (("torchrun", "torch"), ("horovod", "horovod")):
        out = tmp_path_factory.mktemp(f"collectives-{engine}")
        run_horovod(2, WORKERS / "classifier_collectives.py", out, launcher=launcher)
        runs[engine] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    return runs


@pytest.mark.horovod
def test_a_classifier_step_is_three_collectives_under_every_engine(classifier_collectives):
    """Three exchanges (features with ids, statistics, dE), the same loss as under Horovod. Under torch the
    features' alltoall first exchanges the split sizes on the host (torch needs them to allocate what it
    receives): torch.distributed sees that and the three."""
    expected = ["alltoall classifier.features", "allgather classifier.stats", "alltoall classifier.grad_features"]
    runs = classifier_collectives
    for engine in ("torch", "horovod"):
        for rank in runs[engine]:
            assert rank["engine"] == engine and rank["collectives"] == expected
    for rank in runs["torch"]:
        assert rank["torch_calls"] == ["all_to_all_single", "all_to_all_single", "all_gather_single",
                                       "all_to_all_single"]
    assert [rank["loss"] for rank in runs["torch"]] == [rank["loss"] for rank in runs["horovod"]]
    # The engine reads its host integers inside the collective, and the chunked path reads none: no host sync.
    assert [rank["syncs"] for rank in runs["torch"]] == [rank["syncs"] for rank in runs["horovod"]] == [[], []]


@pytest.mark.horovod
@pytest.mark.parametrize("engine", ["torch", "horovod"])
def test_a_rank_waiting_for_a_collective_leaves_the_cpu_to_the_others(classifier_collectives, engine):
    """On CPU ranks the compute threads of a late rank need the cores its peers would spin on while they wait:
    each wait of rank 0 for rank 1 (0.4 s late) costs it little CPU time, the data-parallel optimizer's too."""
    waits = classifier_collectives[engine][0]["waits"]
    assert len(waits) == 5
    for operation, (cpu, wall) in waits.items():
        assert wall > 0.3, (operation, wall)  # it did wait for rank 1
        assert cpu < 0.25 * wall, f"{operation}: {cpu:.3f} CPU-s in a {wall:.3f} s wait"


def test_every_collective_of_a_run_and_its_evaluation_keeps_host_tensors_off_nccl(tiny_dataset, tmp_path):
    """Under NCCL the default group refuses CPU tensors: the barriers, the per-step stop check, the epoch
    diagnostics, the kNN monitor and the linear evaluation's counts must reach the host group (the stand-in:
    tests/workers/nccl_contract.py)."""
    out = tmp_path / "run"
    run_horovod(2, WORKERS / "nccl_contract.py", "--data", tiny_dataset, "--out", out, *SMALL, "--epochs", "1",
                "--warmup-epochs", "0", "--knn-every", "1", launcher="torchrun")
    assert [m["epoch"] for m in read_metrics(out) if "knn20_top1" in m] == [1]
    result = run_horovod(2, WORKERS / "nccl_contract.py", "linear", "--ckpt", out, "--epochs", "1",
                         launcher="torchrun")
    assert "backend=nccl" in result.stdout and "linear" in result.stdout.lower()


def test_two_workers_on_one_gpu_stop_with_one_line_each_before_any_work(tiny_dataset, tmp_path):
    result = run_horovod(2, WORKERS / "shared_gpu.py", "--data", tiny_dataset, "--out", tmp_path / "never", *SMALL,
                         check=False, launcher="torchrun")
    host = socket.gethostname()
    for rank in (0, 1):
        assert rank_lines(result.stderr, rank, "torchrun") == [
            f"error: ranks 0 and 1 would share one GPU of {host} (GPU-0f0e-test): NCCL runs one rank per GPU; "
            f"launch at most 1 rank on {host} (torchrun --nproc_per_node 1, horovodrun -np 1 -H {host}:1), "
            f"or give each rank a GPU of its own (CUDA_VISIBLE_DEVICES)"], result.stderr
    assert result.returncode != 0 and not (tmp_path / "never").exists()


# -------------------------------------------------------------------------------- checkpoints between engines
@pytest.mark.horovod
def test_checkpoints_move_between_torchrun_horovodrun_and_single(reference_run, tiny_dataset, tmp_path):
    """torchrun P = 2 -> horovodrun P = 3 and -> single, horovodrun P = 3 -> torchrun P = 2."""
    for launcher, num_ranks in (("horovod", 3), ("horovod", None)):
        out = tmp_path / f"{launcher}-{num_ranks}"
        shutil.copytree(reference_run("torchrun")[0], out)
        shutil.rmtree(out / "checkpoint-0002")
        result = run_horovod(num_ranks, ROOT / "trainer.py", "--data", tiny_dataset, "--out", out, *TWO_EPOCHS,
                             "--epochs", "3", launcher=launcher)
        assert "written by 2 ranks" in result.stdout
        assert len(list((out / "checkpoint-0003").glob("shard-*.pt"))) == (num_ranks or 1)
        assert [m["epoch"] for m in read_metrics(out) if "epoch_loss" in m] == [1, 2, 3]
    back = tmp_path / "back"
    shutil.copytree(tmp_path / "horovod-3", back)
    result = torchrun("--data", tiny_dataset, "--out", back, *TWO_EPOCHS, "--epochs", "4")
    assert "written by 3 ranks" in result.stdout and "engine torch: 2 ranks" in result.stdout
    assert len(list((back / "checkpoint-0004").glob("shard-*.pt"))) == 2
