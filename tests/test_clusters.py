"""Clusters as they are: a worker killed under `torchrun --max-restarts`, an elastic job that loses a node, a
checkpoint taken inside an epoch resumed at another number of ranks, a rank killed under horovodrun, and two
"nodes" on this machine (two torchrun agents, a two-host horovodrun list). Each is held to an uninterrupted run:
bitwise where the ranks train the same, the per-step losses within 1e-5 where only their placement differs.

Kills at a chosen step use the test-only fault hook of run/faults.py (WHAT=kill: the first attempt only)."""
import contextlib
import json
import shutil
import socket
import subprocess
import time

import psutil
import pytest
import torch

from run import distributed
from run.checkpoint import resumable_at
from run.errors import UsageError
from run.faults import TEST_FAULT_VARIABLE
from run.layout import shard_count
from tests.conftest import ROOT, WORKERS, horovod_job, run_horovod
from tests.trainer_runs import (STEPS_PER_EPOCH, TWO_EPOCHS as RUN, assert_checkpoints_bitwise_equal,
                                main_in_process, rank_lines, read_metrics, step_losses, trainer, training_records)

# A fresh rendezvous store for every attempt of a torchrun job that restarts (run.distributed.restarts_reuse_the_store).
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
ONE_RANK_PER_NODE = {"local_rank": 0, "local_size": 1, "size": 2}


def torchrun(*args, **options):
    return run_horovod(2, ROOT / "trainer.py", *args, launcher="torchrun", **options)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node(port, nodes="2", **rendezvous_conf):
    """One torchrun agent's launch options: a "node" of one worker in the c10d rendezvous on 127.0.0.1:port."""
    return {"nodes": nodes, "rendezvous": f"127.0.0.1:{port}", "rendezvous_id": "clusters",
            "rendezvous_conf": rendezvous_conf}


@pytest.fixture
def start_agent(tmp_path):
    """start_agent(name, options, script, *args, env=): one torchrun agent (launch options of node()) in the
    background, its output in tmp_path/name.log; returns (job, log). Agents still running at the end of the test
    are killed."""
    jobs = []

    def start(name, options, script, *args, env=None):
        command, full_env = horovod_job(1, script, *args, env=env, launcher="torchrun", **options)
        log = tmp_path / f"{name}.log"
        with log.open("w") as stream:
            jobs.append(subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=stream, stderr=subprocess.STDOUT,
                                         start_new_session=True))
        return jobs[-1], log
    yield start
    for job in jobs:
        if job.poll() is None:
            kill_node(job)


def kill_node(job):
    """SIGKILL a torchrun agent and its workers (they run in sessions of their own): a node lost at once."""
    processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    job.wait(timeout=30)


def finished(job, log, timeout=300):
    job.wait(timeout=timeout)
    assert job.returncode == 0, log.read_text()[-6000:]
    return log.read_text()


def wait_for_step(out, epoch, step_in_epoch, jobs, timeout=300):
    """Until metrics.jsonl holds that step of a P = 2 run (rank 0 logs it before the step ends), or a job ended."""
    record = f'"epoch": {epoch}, "step": {(epoch - 1) * STEPS_PER_EPOCH + step_in_epoch},'
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and record in (out / "metrics.jsonl").read_text()):
        assert all(job.poll() is None for job in jobs) and time.monotonic() < deadline, f"no step {record}"
        time.sleep(0.05)


def assert_same_steps(out, reference):
    """Both epochs' per-step losses within 1e-5 (relative) of the reference's, step by step."""
    for epoch in (1, 2):
        losses, expected = step_losses(read_metrics(out), epoch), step_losses(read_metrics(reference), epoch)
        assert len(losses) == STEPS_PER_EPOCH
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses, expected, strict=True)), (losses, expected)


def assert_one_rank_per_node_and_rank_0_writes(records):
    """Each rank alone on its node as the engine reports it; rank 0 writes the run directory's files, rank 1
    only its classifier shard of each checkpoint."""
    ranks = [json.loads((records / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, written in enumerate(ranks):
        assert {key: written[key] for key in ONE_RANK_PER_NODE} == ONE_RANK_PER_NODE and written["rank"] == rank
    assert ranks[1]["written"] == [f".checkpoint-000{epoch}.partial/shard-1.pt" for epoch in (1, 2)]
    assert {"config.json", "metrics.jsonl", "backbone.pth", "index-train/index.json", "checkpoint-0002",
            ".checkpoint-0002.partial/state.pt", ".checkpoint-0002.partial/shard-0.pt"} <= set(ranks[0]["written"])


@pytest.fixture(scope="module")
def torch_reference(reference_run):
    """The uninterrupted run under torchrun --nproc_per_node 2 (one agent)."""
    return reference_run("torchrun")[0]


@pytest.fixture(scope="module")
def horovod_reference(reference_run):
    """The uninterrupted run under horovodrun -np 2 -H localhost:2."""
    return reference_run("horovod")[0]


@pytest.fixture(scope="module")
def one_rank_resume(torch_reference, tiny_dataset, tmp_path_factory):
    """The reference resumed from its epoch-1 checkpoint by one process: its epoch 2 at P = 1."""
    out = tmp_path_factory.mktemp("one-rank") / "run"
    shutil.copytree(torch_reference, out)
    shutil.rmtree(out / "checkpoint-0002")
    trainer("--data", tiny_dataset, "--out", out, *RUN, num_ranks=None)
    return out


# -------------------------------------------------------------------------------- restarts
def test_restarts_that_would_share_the_store_between_attempts_are_refused_in_one_line(monkeypatch):
    for name, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match="^torchrun --max-restarts: .* with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed.resolve_engine("auto")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives
    assert distributed.resolve_engine("auto") == "torch"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # never restarted: the store is never met again
    assert distributed.resolve_engine("auto") == "torch"


@pytest.mark.torchrun
def test_a_worker_killed_under_max_restarts_is_restarted_and_the_run_ends_as_if_uninterrupted(torch_reference,
                                                                                              tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = torchrun("--data", tiny_dataset, "--out", out, *RUN, max_restarts=2,
                      env={**FRESH_STORE, TEST_FAULT_VARIABLE: "1:2:3:kill"})
    assert result.stdout.count("engine torch: 2 ranks") == 2  # the first attempt and the restart
    assert f"resumed from {out / 'checkpoint-0001'} (epoch 1, step 0 of the next" in result.stdout
    assert [m["epoch"] for m in read_metrics(out) if "epoch_loss" in m] == [1, 2]
    assert training_records(out) == training_records(torch_reference)
    assert_checkpoints_bitwise_equal(torch_reference / "checkpoint-0002", out / "checkpoint-0002")
    assert all(torch.equal(a, b) for a, b in zip(*(torch.load(run / "backbone.pth").values()
                                                   for run in (torch_reference, out)), strict=True))


@pytest.mark.torchrun
@pytest.mark.horovod  # the P = 1 resume it is held to is a plain process
def test_an_elastic_job_that_loses_the_node_without_the_store_finishes_on_the_other_at_p1(
        one_rank_resume, start_agent, tiny_dataset, tmp_path):
    """--nnodes 1:2: the survivor hosts c10d's store (is_host=1); the lost node's worker dies mid-epoch 2 without
    a checkpoint. The survivor's restart resumes the epoch-1 checkpoint of both ranks at P = 1, with the per-rank
    batch of the flags (4), exactly as one process resuming it."""
    out, port = tmp_path / "run", free_port()
    flags = ("--data", tiny_dataset, "--out", out, *RUN)
    survivor, survivor_log = start_agent("survivor", {**node(port, "1:2", is_host=1, last_call_timeout=5),
                                                      "max_restarts": 1}, ROOT / "trainer.py", *flags,
                                         env=FRESH_STORE)
    lost, _ = start_agent("lost", {**node(port, "1:2", is_host=0, last_call_timeout=5), "max_restarts": 1},
                          ROOT / "trainer.py", *flags, env=FRESH_STORE)
    wait_for_step(out, epoch=2, step_in_epoch=3, jobs=[survivor, lost])
    kill_node(lost)
    output = finished(survivor, survivor_log)
    assert "engine torch: 2 ranks" in output and "engine torch: 1 rank;" in output
    assert f"resumed from {out / 'checkpoint-0001'} (epoch 1, step 0 of the next, written by 2 ranks)" in output
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["batch_size"], config["global_batch"]) == (1, 4, 4)
    assert shard_count(out / "checkpoint-0002") == 1
    assert [m["epoch"] for m in read_metrics(out) if "epoch_loss" in m] == [1, 2]
    assert training_records(out) == training_records(one_rank_resume)
    assert_checkpoints_bitwise_equal(one_rank_resume / "checkpoint-0002", out / "checkpoint-0002")


@pytest.mark.parametrize("names, size, kept, said", [
    (["checkpoint-0001", "checkpoint-0001-step-000003"], 1, "checkpoint-0001",
     "checkpoint-0001-step-000003 was written inside an epoch by 2 ranks and resumes on 2 only: resuming from "
     "checkpoint-0001 at 1, which redoes the 3 steps of epoch 2 done by 2 ranks"),
    (["checkpoint-0002", "checkpoint-0004-step-000001"], 3, "checkpoint-0002",
     "checkpoint-0004-step-000001 was written inside an epoch by 2 ranks and resumes on 2 only: resuming from "
     "checkpoint-0002 at 3, which redoes 2 epochs and the 1 step of epoch 5 done by 2 ranks"),
    (["checkpoint-0001", "checkpoint-0001-step-000003"], 2, "checkpoint-0001-step-000003", None),  # its own P
    (["checkpoint-0001"], 1, "checkpoint-0001", None),  # an epoch's checkpoint resumes anywhere
    (["checkpoint-0000-step-000003"], 1, "checkpoint-0000-step-000003", None),  # nothing before: the resume refuses
])
def test_auto_passes_over_a_checkpoint_of_another_rank_count_taken_inside_an_epoch(names, size, kept, said,
                                                                                   tmp_path):
    for name in names:
        (tmp_path / name).mkdir()
        for rank in range(2):
            (tmp_path / name / f"shard-{rank}.pt").touch()
    told = []
    resumable = resumable_at([tmp_path / name for name in names], size, told.append)
    assert resumable[-1].name == kept and told == ([said] if said else [])


@pytest.mark.torchrun
@pytest.mark.horovod  # the resume at P = 1 is a plain process
def test_a_checkpoint_taken_inside_an_epoch_resumes_at_another_rank_count_from_the_epoch_before(
        one_rank_resume, tiny_dataset, tmp_path, monkeypatch, capsys, single_engine):
    out = tmp_path / "run"
    torchrun("--data", tiny_dataset, "--out", out, *RUN, env={TEST_FAULT_VARIABLE: "1:2:3:SIGTERM"}, check=False)
    inside = out / "checkpoint-0001-step-000003"
    assert shard_count(inside) == 2
    named = main_in_process(monkeypatch, capsys, "--data", tiny_dataset, "--out", out, *RUN, "--resume", inside)
    assert named.returncode == 2 and named.stderr == (
        f"error: cannot resume from {inside}: {inside} was written inside an epoch by 2 ranks: resume it with 2 "
        f"ranks, or resume an epoch's checkpoint with --resume\n")  # the checkpoint the user named, or nothing
    result = trainer("--data", tiny_dataset, "--out", out, *RUN, num_ranks=None)
    assert (f"{inside.name} was written inside an epoch by 2 ranks and resumes on 2 only: resuming from "
            f"checkpoint-0001 at 1, which redoes the 3 steps of epoch 2 done by 2 ranks") in result.stdout
    assert f"resumed from {out / 'checkpoint-0001'} (epoch 1, step 0 of the next" in result.stdout
    assert training_records(out) == training_records(one_rank_resume)
    assert_checkpoints_bitwise_equal(one_rank_resume / "checkpoint-0002", out / "checkpoint-0002")


@pytest.mark.horovod
def test_a_rank_killed_under_horovodrun_ends_the_job_with_one_line_and_the_next_launch_resumes(
        horovod_reference, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = trainer("--data", tiny_dataset, "--out", out, *RUN, env={TEST_FAULT_VARIABLE: "1:2:3:kill"}, check=False)
    assert result.returncode != 0 and "Process 1 exit with status code 137." in result.stdout
    errors = [line for rank in (0, 1) for line in rank_lines(result.stderr, rank) if line.startswith("error:")]
    assert errors == ["error: rank 0 stopped: another rank failed (its error is above)"], result.stderr
    result = trainer("--data", tiny_dataset, "--out", out, *RUN)
    assert f"resumed from {out / 'checkpoint-0001'} (epoch 1, step 0 of the next" in result.stdout
    assert training_records(out) == training_records(horovod_reference)
    assert_checkpoints_bitwise_equal(horovod_reference / "checkpoint-0002", out / "checkpoint-0002")


# -------------------------------------------------------------------------------- two nodes on one machine
@pytest.mark.torchrun
def test_two_torchrun_agents_train_the_run_of_one_agent_with_two_ranks(torch_reference, start_agent, tiny_dataset,
                                                                      tmp_path):
    out, records, port = tmp_path / "run", tmp_path / "records", free_port()
    records.mkdir()
    agents = [start_agent(f"node{index}", node(port), WORKERS / "trainer_writes.py", records, "--data", tiny_dataset,
                          "--out", out, *RUN) for index in (0, 1)]
    for job, log in agents:
        finished(job, log)
    assert_same_steps(out, torch_reference)
    assert_one_rank_per_node_and_rank_0_writes(records)


@pytest.mark.horovod
def test_a_two_host_horovodrun_list_trains_the_run_of_one_host(horovod_reference, tiny_dataset, tmp_path):
    out, records = tmp_path / "run", tmp_path / "records"
    records.mkdir()
    run_horovod(2, WORKERS / "trainer_writes.py", records, "--data", tiny_dataset, "--out", out, *RUN,
                hosts="localhost:1,127.0.0.1:1")
    assert_same_steps(out, horovod_reference)
    assert_one_rank_per_node_and_rank_0_writes(records)
