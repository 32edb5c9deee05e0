"""Restarts under `torchrun --max-restarts`, repeated: workers SIGKILLed at random steps and ranks, each job run to
its end and compared with an uninterrupted one.

    python bench/experiments/restarts.py                          # 20 kills, at most 30 minutes
    python bench/experiments/restarts.py --kills 3 --budget 300   # a short look

First one uninterrupted run: torchrun --nproc_per_node --np of the tests' small network (tests/trainer_runs.py
SMALL) on their 120-image slice of the built-in data, --epochs epochs, a checkpoint after each. Then per kill the
same command under `torchrun --max-restarts 1` (with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which a restart needs:
run/distributed.py, restarts_reuse_the_store), whose rank RANK SIGKILLs itself at the end of step STEP of epoch
EPOCH in the first attempt only (the test fault hook of run/faults.py, WHAT=kill), RANK, EPOCH and STEP drawn
uniformly (--seed). Per kill:
  survived     the job exited 0 after a second attempt (two start-up lines)
  steps redone the steps trained after the checkpoint the restart resumed, up to the kill; "epochs lost" is
               their sum over the kills / the steps of an epoch
  epochs once  every epoch's record once in metrics.jsonl, as in the uninterrupted run
  equal        metrics.jsonl (timings aside), the last checkpoint and backbone.pth bitwise equal to the
               uninterrupted run's (same-seed runs are, on one machine)
Prints a markdown table, one row per kill, then the totals. No kill is started once --budget seconds have gone,
and a job that is still running when they are up is stopped and counted as not survived.
"""
import argparse
import contextlib
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from run.faults import TEST_FAULT_VARIABLE  # noqa: E402
from run.launch import launch  # noqa: E402
from tests.trainer_runs import (SMALL, assert_checkpoints_bitwise_equal, copy_tiny_dataset, read_metrics,  # noqa: E402
                                step_losses, training_records)

RESUMED = re.compile(r"resumed from \S+ \(epoch (\d+), step (\d+) of the next")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--kills", type=int, default=20, help="jobs with one worker killed each (default: 20)")
parser.add_argument("--budget", type=float, default=1800, help="seconds for all of it, the uninterrupted run "
                    "included (default: 1800)")
parser.add_argument("--np", type=int, default=2, help="torchrun workers per job (default: 2)")
parser.add_argument("--epochs", type=int, default=2, help="epochs of every run (default: 2)")
parser.add_argument("--seed", type=int, default=0, help="seed of the kills' ranks, epochs and steps (default: 0)")
parser.add_argument("--out", default="runs/restarts", help="folder of the data slice and every run's directory "
                    "and log; emptied first (default: runs/restarts)")


def torchrun(out, args, deadline, fault=None):
    """One torchrun job of the trainer, its output in out.log; (exit status or None past the deadline, output)."""
    flags = [*SMALL, "--epochs", args.epochs, "--save-every", 1, "--log-every", 1, "--knn-every", 0]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if fault:
        env.update({TEST_FAULT_VARIABLE: fault, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    command, full_env = launch("torch", args.np, ROOT / "trainer.py", "--data", args.data, "--out", out, *flags,
                               max_restarts=1 if fault else 0, tee=True, env=env)
    log = out.with_suffix(".log")
    with log.open("w") as stream:
        job = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=stream, stderr=subprocess.STDOUT)
        try:
            status = job.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:  # torchrun and its workers, which run in sessions of their own
            for process in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            job.wait()
            status = None
    return status, log.read_text()


def same_run(out, reference, epochs):
    """metrics.jsonl, the last checkpoint and backbone.pth of `out` bitwise those of `reference`."""
    try:
        assert training_records(out) == training_records(reference)
        assert_checkpoints_bitwise_equal(reference / f"checkpoint-{epochs:04d}", out / f"checkpoint-{epochs:04d}")
        backbones = [torch.load(run / "backbone.pth", weights_only=True) for run in (reference, out)]
        assert all(torch.equal(a, b) for a, b in zip(*(backbone.values() for backbone in backbones), strict=True))
    except (AssertionError, OSError, RuntimeError, ValueError):
        return False
    return True


def main():
    args = parser.parse_args()
    if min(args.kills, args.np, args.epochs) < 1 or args.budget <= 0:
        sys.exit("error: --kills, --np, --epochs and --budget must be positive")
    deadline, out = time.monotonic() + args.budget, Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    args.data = copy_tiny_dataset(out / "data")
    reference = out / "uninterrupted"
    status, _ = torchrun(reference, args, deadline)
    if status != 0:
        sys.exit(f"error: the uninterrupted run exited {status}; see {reference.with_suffix('.log')}")
    steps = len(step_losses(read_metrics(reference), 1))
    draw = random.Random(args.seed)
    rows, redone_total = [], 0
    print("| kill | rank | epoch | step | survived | steps redone | epochs once | equal | seconds |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |")
    for kill in range(1, args.kills + 1):
        if time.monotonic() >= deadline:
            break
        rank, epoch, step = draw.randrange(args.np), draw.randint(1, args.epochs), draw.randint(1, steps)
        run, started = out / f"kill-{kill:02d}", time.monotonic()
        status, output = torchrun(run, args, deadline, fault=f"{rank}:{epoch}:{step}:kill")
        survived = status == 0 and output.count(f"engine torch: {args.np} ranks") == 2
        resumed = [tuple(map(int, match)) for match in RESUMED.findall(output)]
        resumed_epoch, resumed_step = resumed[-1] if resumed else (0, 0)  # no checkpoint yet: from the start
        redone = (epoch - 1 - resumed_epoch) * steps + step - resumed_step
        redone_total += redone if survived else 0
        epochs_once = survived and [m["epoch"] for m in read_metrics(run) if "epoch_loss" in m] == list(
            range(1, args.epochs + 1))
        equal = survived and same_run(run, reference, args.epochs)
        rows.append((survived, epochs_once, equal))
        print(f"| {kill} | {rank} | {epoch} | {step} | {'yes' if survived else 'NO'} | {redone if survived else '-'} "
              f"| {'yes' if epochs_once else 'NO'} | {'yes' if equal else 'NO'} | {time.monotonic() - started:.0f} |",
              flush=True)
    count = len(rows)
    print(f"\n{count} kills at P = {args.np}, {args.epochs} epochs of {steps} steps: restarts survived "
          f"{sum(row[0] for row in rows)}/{count}, epochs lost {redone_total / steps:.2f} ({redone_total} steps "
          f"redone), every epoch once {sum(row[1] for row in rows)}/{count}, final state equal "
          f"{sum(row[2] for row in rows)}/{count}" + (f" (--budget ended it after {count} of {args.kills})"
                                                         if count < args.kills else ""))


if __name__ == "__main__":
    main()
