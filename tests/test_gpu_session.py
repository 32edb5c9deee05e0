"""bench/gpu/gpu_session.sh, the one command of a GPU machine, checked where there is none: its dry run (every
step on the CPU at tiny sizes, the Triton kernels under the interpreter: the same control flow, summary and
files as on a GPU), and its bookkeeping with planted steps (a failing step does not stop the session, a step cut
at its budget counts as failed and keeps what it printed, the session's budget cuts the last steps first).

The GPU session itself (bench/RESULTS.md) can only run on a GPU; these keep the script from rotting in between.
"""
import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import ROOT

SESSION = ROOT / "bench" / "gpu" / "gpu_session.sh"
DEFAULT_STEPS = ["smoke", "classifier_step", "train_step", "trainer", "kernels", "torchrun_trainer", "collectives",
                 "data"]
MAX_FILES = 8  # the session leaves a few files to read (a summary, one log, the runs' metrics), not a tree


def session(out, *args, python=None, timeout=900):
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python or ROOT / ".venv" / "bin" / "python")}
    env.pop("TRITON_INTERPRET", None)  # the session sets it for its dry run; on a GPU it must be unset
    return subprocess.run(["bash", str(SESSION), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def step_lines(summary):
    """{step: its status line} of summary.md, in order."""
    return dict(re.findall(r"^## (\w+): (.*)$", summary, flags=re.MULTILINE))


@pytest.mark.parametrize("args", [["--bogus"], ["--budget", "soon"], ["--commit"]])
def test_bad_arguments_are_a_usage_line(args, tmp_path):
    result = session(tmp_path / "out", *args)
    assert result.returncode == 2 and result.stderr.startswith("usage:") and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_whole_session_runs_dry_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = session(out, "--dry-run", "--commit", "abc1234")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    print(f"dry run: {seconds:.0f} s wall, load average {os.getloadavg()[0]:.1f}")  # seen with pytest -s
    files = sorted(path.name for path in out.iterdir())
    assert files == ["session.log", "summary.md", "torchrun-trainer-metrics.jsonl", "trainer-metrics.jsonl"]
    assert len(files) <= MAX_FILES
    summary = (out / "summary.md").read_text()
    assert summary.splitlines()[2].startswith("commit abc1234; ") and "commit abc1234" in result.stdout
    steps = step_lines(summary)
    assert list(steps) == [*DEFAULT_STEPS, "session"]
    assert all(status.startswith("passed in ") for name, status in steps.items() if name != "session")
    assert steps["session"].startswith("8 passed, 0 failed")
    # Each step's table reached the summary, as the step ended (the log holds everything).
    for header in ("| check | Triton vs torch twin |", "| kernels launched | 10 of 10 |", "| C | ms/step |",
                   "| head | rows per rank |", "| instance-400 |", "| B | C | D | K |", "float32 -> bfloat16",
                   "K = 0:", "| ours (Triton) |", "| torch.compile, materialised |", "engine torch: 1 rank",
                   "| allreduce faults.stop_signal |", "| 32px | MNIST-5k train, 32x32 | cpu |"):
        assert header in summary, header
    assert re.search(r"^epoch 1: loss [\d.]+, [\d.]+ images/s over its 2 steps after the first 5", summary,
                     re.MULTILINE)
    metrics = [json.loads(line) for line in (out / "trainer-metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["images_per_s"] is None and metrics[-1]["images_per_s"] > 0  # the warm-up is left out
    assert (out / "session.log").read_text().count("\n== ") >= 2 * len(DEFAULT_STEPS) - 1


@pytest.mark.horovod
def test_the_horovod_steps_run_dry_with_the_build_plan(tmp_path):
    """--with-horovod: the build becomes the build plan's dry run; the trainer runs under horovodrun -np 1, started
    by the project's launcher."""
    out = tmp_path / "out"
    result = session(out, "--dry-run", "--with-horovod", "--steps", "horovod_setup,horovod_trainer")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    steps = step_lines((out / "summary.md").read_text())
    assert list(steps) == ["horovod_setup", "horovod_trainer", "session"]
    assert "budget 2480 s (the GPU's x 4)" in result.stdout
    assert "cache entry:" in (out / "summary.md").read_text() and "[0]<stdout>:engine horovod: 1 rank" in result.stdout
    assert " -m run.launch horovod 1 trainer.py --data synthetic --engine horovod " in result.stdout
    assert sorted(path.name for path in out.iterdir()) == ["horovod-trainer-metrics.jsonl", "session.log", "summary.md"]


PLANTED_PYTHON = """#!/bin/bash
case "$1" in
    bench/gpu/triton_smoke.py) echo "| check | ok |"; echo "|---|---|"; echo "| planted | no |"; exit 3 ;;
    bench/classifier_step.py) echo "caption of the partial table"; echo "| C | ms |"; echo "| 1 | 2 |"; exec sleep 60 ;;
    *) echo "ran $*" ;;
esac
"""


@pytest.mark.slow
def test_a_failed_step_and_a_cut_step_are_reported_kept_and_the_session_goes_on(tmp_path):
    python = tmp_path / "python"
    python.write_text(PLANTED_PYTHON)
    python.chmod(0o755)
    out = tmp_path / "out"
    result = session(out, "--steps", "smoke,classifier_step,train_step", "--budget", "12", python=python)
    assert result.returncode == 1
    summary = (out / "summary.md").read_text()
    steps = step_lines(summary)
    assert steps["smoke"].startswith("FAILED (exit 3)") and "| planted | no |" in summary
    # Cut by the session's budget (12 s, under its own 60 s): failed, and what it printed is kept.
    assert re.match(r"CUT at \d+ s \(counts as failed", steps["classifier_step"])
    assert "caption of the partial table\n| C | ms |\n| 1 | 2 |" in summary
    assert steps["train_step"].startswith("CUT before it started")  # the last steps go first
    assert steps["session"].startswith("0 passed, 3 failed")
    # Only the steps asked for ran; the one that passes exits 0.
    result = session(tmp_path / "again", "--steps", "train_step", python=python)
    assert result.returncode == 0 and "ran bench/train_step.py gpu" in result.stdout
    assert list(step_lines((tmp_path / "again" / "summary.md").read_text())) == ["train_step", "session"]
