"""How a run at P = 2 (gloo) survives what happens to real runs. Under horovodrun and torchrun alike (the tests
parametrised over LAUNCHERS): resumes that ranks must agree on, a signal to one rank, Ctrl-C, a failing rank.
Under horovodrun: stale run directories, impossible settings, a second signal, shard reads on resume, CPU threads.

Stops at a chosen step use the test-only fault hook of run/faults.py (INSTANCE_CLASSIFIER_TEST_FAULT)."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from run.errors import UsageError
from run.faults import TEST_FAULT_VARIABLE
from tests.conftest import ROOT, WORKERS, horovod_job, run_horovod
from tests.trainer_runs import (LAUNCHERS, STEPS_PER_EPOCH, TWO_EPOCHS, assert_checkpoints_bitwise_equal,
                                main_in_process, rank_lines, trainer, training_records)

# What Ctrl-C (SIGINT to the terminal's foreground process group) reaches the ranks as: horovodrun turns it into
# SIGTERM to every rank (SIGKILL 5 s later); torchrun's workers are in the group and receive the SIGINT itself.
CTRL_C_REACHES_THE_RANKS_AS = {"horovod": "SIGTERM", "torchrun": "SIGINT"}


def assert_every_rank_stopped_with(stderr, error, launcher="horovod"):
    """Each rank wrote one line, the error (which starts with `error`), and under horovodrun possibly instead the
    "Terminated" of its shell when horovodrun ended it (SIGTERM) before it got there, once the first rank had
    exited; at least one wrote the error."""
    lines = {rank: rank_lines(stderr, rank, launcher) for rank in (0, 1)}
    ended_before = ["Terminated"] if launcher == "horovod" else []
    assert all(len(written) == 1 and (written[0].startswith(error) or written[0] in ended_before)
               for written in lines.values()), stderr
    assert any(written[0].startswith(error) for written in lines.values()), stderr


def start_trainer(*args, fault=None, launcher="horovod"):
    """A P = 2 trainer job in the background, in a session of its own (as a terminal's foreground job)."""
    command, env = horovod_job(2, ROOT / "trainer.py", *args, env={TEST_FAULT_VARIABLE: fault}, launcher=launcher)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(job, out, epoch, step_in_epoch, timeout=300):
    """Until rank 0 has logged that step (it logs before the step's end-of-step hook), or the job has ended."""
    record = f'"epoch": {epoch}, "step": {(epoch - 1) * STEPS_PER_EPOCH + step_in_epoch},'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if (out / "metrics.jsonl").is_file() and record in (out / "metrics.jsonl").read_text():
            return
        time.sleep(0.05)
    assert job.poll() is not None or time.monotonic() < deadline, f"no step {record} within {timeout} s"


def rank_process(job, rank):
    """The python process of rank `rank` of a horovodrun job."""
    for process in psutil.Process(job.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.environ().get("HOROVOD_RANK") == str(rank):
                return process
    raise AssertionError(f"no rank {rank} among the processes of job {job.pid}")


def checkpoint_files(checkpoint):
    return sorted(p.name for p in checkpoint.iterdir())


# -------------------------------------------------------------------------------- ranks agree on resume
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_rank_resumes_what_rank_0_chose_or_every_rank_stops(launcher, reference_run, tiny_dataset, tmp_path):
    """Rank 1 sees an older --out (no shared file system, NFS lag): it must not resume epoch 1 while rank 0
    resumes epoch 2; both stop with rank 1's one line."""
    reference, _ = reference_run(launcher)
    for rank in (0, 1):
        shutil.copytree(reference, tmp_path / f"rank-{rank}" / "run")
    shutil.rmtree(tmp_path / "rank-1" / "run" / "checkpoint-0002")
    result = run_horovod(2, WORKERS / "trainer_in_rank_folder.py", tmp_path, "--data", tiny_dataset, "--out", "run",
                         *TWO_EPOCHS, "--epochs", "3", check=False, timeout=300, launcher=launcher)
    assert result.returncode != 0
    assert_every_rank_stopped_with(result.stderr, "error: rank 1: cannot resume from run/checkpoint-0002: [Errno 2]",
                                   launcher)
    assert not (tmp_path / "rank-0" / "run" / "checkpoint-0003").exists()


# -------------------------------------------------------------------------------- stale state
@pytest.mark.horovod
def test_a_run_directory_of_another_dataset_is_refused(reference_run, tiny_dataset, tmp_path):
    other, out = tmp_path / "other", tmp_path / "run"
    shutil.copytree(tiny_dataset, other)
    shutil.copytree(reference_run("horovod")[0], out)
    result = trainer("--data", other, "--out", out, *TWO_EPOCHS, "--epochs", "3", check=False)
    assert result.returncode != 0
    assert_every_rank_stopped_with(result.stderr, f"error: {out}/index-train indexes {tiny_dataset.resolve()}/train, "
                                                  f"not {other}/train: a run directory holds one dataset")
    assert not (out / "checkpoint-0003").exists()


# -------------------------------------------------------------------------------- settings judged first
@pytest.mark.horovod
def test_impossible_settings_stop_every_rank_before_any_work(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, "--warmup-epochs", "2", check=False)
    assert result.returncode != 0
    assert_every_rank_stopped_with(result.stderr, "error: --warmup-epochs 2.0 must be in [0, --epochs 2): the "
                                                  "learning rate would never reach its cosine decay")
    assert not out.exists()  # nothing written, nothing indexed


def triton_limits():
    from kernels.triton_topk_xent import MAX_FEATURE_DIM, MAX_K
    return MAX_K, MAX_FEATURE_DIM


@pytest.mark.parametrize("flags,message", [
    (["--min-scale", "0"], "--min-scale is an area fraction in (0, 1], got 0.0"),
    (["--min-scale", "1.5"], "--min-scale is an area fraction in (0, 1], got 1.5"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0 must be in [0, --epochs 12)"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--knn-every", "-1"], "--knn-every must be >= 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--kernel-backend", "triton", "--smooth-k", str(triton_limits()[0] + 1)],
     f"the Triton kernels take K <= {triton_limits()[0]}"),
    (["--kernel-backend", "triton", "--feat-dim", str(triton_limits()[1] + 1)],
     f"the Triton kernels take D <= {triton_limits()[1]}"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["--resume", "/no/such/checkpoint"], "no complete checkpoint at /no/such/checkpoint"),
])
def test_each_impossible_setting_is_one_line_naming_it(flags, message, tmp_path):
    import trainer as trainer_module
    from settings import check_machine_and_paths
    config = trainer_module.parser.parse_args(["--out", str(tmp_path / "run"), *flags])
    with pytest.raises(UsageError, match=re.escape(message)):
        check_machine_and_paths(trainer_module.resolve_config(config))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("flags,message", [(["--kernel-backend", "triton"], "--kernel-backend triton needs CUDA"),
                                           (["--dali-device", "gpu"], "--dali-device gpu needs CUDA")])
def test_gpu_only_settings_are_refused_without_cuda(flags, message, tmp_path, monkeypatch):
    import trainer as trainer_module
    from settings import check_machine_and_paths
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = trainer_module.resolve_config(trainer_module.parser.parse_args(["--out", str(tmp_path), *flags]))
    with pytest.raises(UsageError, match=re.escape(message)):
        check_machine_and_paths(config)


# -------------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_signal_to_one_rank_stops_both_after_the_same_step_and_the_resume_is_bitwise_exact(
        launcher, reference_run, tiny_dataset, tmp_path, monkeypatch, capsys, single_engine):
    """SIGTERM reaches rank 1 only, inside epoch 1: both ranks stop after step 5 with a checkpoint, which one
    process refuses to resume; the same command resumes there and ends bitwise equal to the uninterrupted run,
    metrics.jsonl too (timings aside). The steps before the signal were a fresh run of the reference's flags and
    seed: on one machine a run is a function of them (across machines it is not; bench/RESULTS.md, "What a seed
    fixes")."""
    reference, _ = reference_run(launcher)
    out = tmp_path / "run"
    result = trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, check=False, launcher=launcher,
                     env={TEST_FAULT_VARIABLE: "1:1:5:SIGTERM"})
    checkpoint = out / "checkpoint-0000-step-000005"
    assert rank_lines(result.stderr, 0, launcher) == [f"error: stopped by SIGTERM after epoch 1 step 5: wrote "
                                                      f"{checkpoint}; the same command resumes from it"], result.stderr
    assert rank_lines(result.stderr, 1, launcher) == [] and result.returncode != 0
    assert checkpoint_files(checkpoint) == ["shard-0.pt", "shard-1.pt", "state.pt"]
    result = main_in_process(monkeypatch, capsys, "--data", tiny_dataset, "--out", out, *TWO_EPOCHS)  # one process
    assert result.returncode == 2 and "was written inside an epoch by 2 ranks: resume it with 2 ranks" in result.stderr
    result = trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, launcher=launcher)
    assert f"resumed from {checkpoint} (epoch 0, step 5 of the next" in result.stdout
    assert training_records(out) == training_records(reference)
    for name in ("checkpoint-0001", "checkpoint-0002"):
        assert_checkpoints_bitwise_equal(reference / name, out / name)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ctrl_c_to_the_launcher_finishes_the_step_and_writes_a_checkpoint(launcher, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    job = start_trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, fault="0:2:3:pause", launcher=launcher)
    wait_for_step(job, out, epoch=2, step_in_epoch=3)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    checkpoint = out / "checkpoint-0001-step-000003"
    assert rank_lines(stderr, 0, launcher) == [f"error: stopped by {CTRL_C_REACHES_THE_RANKS_AS[launcher]} after "
                                               f"epoch 2 step 3: wrote {checkpoint}; the same command resumes from "
                                               f"it"], stderr
    assert checkpoint_files(checkpoint) == ["shard-0.pt", "shard-1.pt", "state.pt"]
    # No exit status is asserted: the ranks exit with 128 + the signal, but horovodrun may report 0 for a rank it
    # was terminating (its psutil wait reaps the rank's shell, and subprocess's own wait then finds no child).


@pytest.mark.horovod
def test_a_second_signal_exits_at_once_without_a_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    job = start_trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, fault="0:1:2:hold")
    wait_for_step(job, out, epoch=1, step_in_epoch=2)
    rank0 = rank_process(job, 0)
    rank0.send_signal(signal.SIGTERM)
    time.sleep(2)  # delivered: a second one sent while the first is pending would merge with it
    rank0.send_signal(signal.SIGTERM)
    rank0.wait(timeout=5)  # at once: the held step is not finished, no checkpoint is written
    stdout, stderr = job.communicate(timeout=120)
    assert rank_lines(stderr, 0) == ["error: second SIGTERM: exiting now, without a checkpoint"], stderr
    assert "Process 0 exit with status code 143" in stdout
    assert not list(out.glob("checkpoint-*"))


# -------------------------------------------------------------------------------- a failing rank
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_failing_rank_ends_the_job_at_once_with_its_error(launcher, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    job = start_trainer("--data", tiny_dataset, "--out", out, *TWO_EPOCHS, fault="1:1:3:raise", launcher=launcher)
    wait_for_step(job, out, epoch=1, step_in_epoch=3)  # rank 0 now waits for rank 1 in the step's last collective
    started = time.monotonic()
    stdout, stderr = job.communicate(timeout=120)
    assert time.monotonic() - started < 30, "the job must end within seconds of the failure"
    assert job.returncode != 0
    assert rank_lines(stderr, 1, launcher)[-1] == "RuntimeError: test fault on rank 1 at epoch 1 step 3", stderr
    assert rank_lines(stderr, 0, launcher) == ["error: rank 0 stopped: another rank failed (its error is above)"], \
        stderr
    if launcher == "horovod":
        assert "Process 1 exit with status code 1" in stdout


# -------------------------------------------------------------------------------- shard reads on resume
@pytest.mark.horovod
def test_a_resume_reads_only_the_shards_that_overlap_the_rank(reference_run, tmp_path):
    run_horovod(2, WORKERS / "trainer_shard_reads.py", reference_run("horovod")[0] / "checkpoint-0002", tmp_path)
    for rank in (0, 1):
        reads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert reads["opened"] == [f"shard-{rank}.pt"]  # of 2 shard files
        assert reads["weight_rows"] == reads["rows"][1] - reads["rows"][0] == 60


# -------------------------------------------------------------------------------- CPU threads per rank
@pytest.mark.horovod
def test_each_rank_takes_its_share_of_the_cores_unless_omp_num_threads_is_set(tmp_path):
    run_horovod(2, WORKERS / "trainer_threads.py", tmp_path, env={"OMP_NUM_THREADS": None})
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert threads["local_ranks"] == 2 and threads["threads"] == max(1, threads["cores"] // 2)
        assert threads["description"] == f"{threads['threads']} ({threads['cores']} cores / 2 ranks on this host)"
    # With OMP_NUM_THREADS set (tests/conftest.py sets 1) a rank keeps it: the runs of tests/test_trainer.py say
    # "torch threads 1 (OMP_NUM_THREADS)".
