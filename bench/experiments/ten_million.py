"""Ten million classifier rows on this machine, measured: train, checkpoint, resume, reshard, against `plan`.

    python bench/experiments/ten_million.py                                   # the measurement: N = 10,000,000 at P = 2, then 3
    python bench/experiments/ten_million.py --instances 10000 --work /tmp/tm  # the same steps at a tiny N: a check of the flags

Every run is trainer.py under horovodrun (gloo) on synthetic input with a small network, so that the classifier
dominates (TRAIN_FLAGS: ResNet-18 of width 8 at 32 px, 32 images x 2 views per rank, 4 steps per epoch, random
init of the rows, D = 128, one checkpoint per epoch, every step logged). In --work:
  1. train     P = 2, 2 epochs: seconds per step (metrics.jsonl's epoch records), checkpoint size (the files)
               and write time (the trainer's "wrote" line), peak memory per rank;
  2. resume    checkpoint-0002 deleted, the same command resumes from checkpoint-0001 and replays epoch 2:
               read time (the trainer's "resumed ... read in" line), and whether epoch 2's losses are bitwise
               those of run 1 (they are on CPU: tests/test_trainer.py);
  3. reshard   P = 3 resumes the P = 2 checkpoint-0002 into another --out and trains a third epoch: read time,
               memory, seconds per step, and the 3-rank checkpoint it writes;
  4. seeding   the raw-feature init at P = 2 over --rate-instances rows, its two passes cut to --rate-steps
               batches each (--steps-per-epoch cuts them as it cuts an epoch): images per second, and from it the
               time of the two passes over all N images (and over 100 M), which would not fit this machine's time;
  5. plan      model.plan for the same flags at P = 2 and 3, beside what was measured.
Before every read the page cache is dropped (as root, unless --no-drop-caches) so that reads come from the disk,
and after every run `sync` is timed: the trainer's write time is the time to the page cache.
Memory: each rank's process (found by HOROVOD_RANK among horovodrun's descendants) is sampled every 0.2 s from
/proc: VmHWM (the kernel's high-water mark of resident memory, file pages of a memory-mapped checkpoint
included) and the largest RssAnon seen (anonymous memory: what the rank itself allocated).
Prints a markdown table for bench/RESULTS.md with the machine, the date and the commit, and the command.
Before any work it checks that MemAvailable and the free disk hold what the runs need (EXPECTED_* below;
--force runs anyway). --work is removed at the end unless --keep-work.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from bench.harness import provenance  # noqa: E402
from model.plan import plan  # noqa: E402
from run.launch import launch  # noqa: E402
from run.run_log import human_bytes  # noqa: E402

BATCH, STEPS, DIM = 32, 4, 128  # images per rank, steps per epoch, feature dim D
TRAIN_FLAGS = ["--data", "synthetic", "--arch", "resnet18", "--width", "8", "--small-stem", "--image-size", "32",
               "--batch-size", str(BATCH), "--feat-dim", str(DIM), "--warmup-epochs", "0", "--steps-per-epoch",
               str(STEPS), "--no-raw-init", "--save-every", "1", "--keep-checkpoints", "2", "--log-every", "1"]
# The same run for model.plan: the classifier sees images x 2 views per rank; the rest at the dataset defaults.
PLAN_ARGS = dict(arch="resnet18", width=8, small_stem=True, image_size=32, batch_size=BATCH * 2, feat_dim=DIM,
                 hidden_dim=2048, k=5)
# Resident memory a rank needs per byte of its classifier weight [C, D]: the weight, its gradient and its SGD
# momentum (model.classifier.ShardSGD adds the weight decay in place; the random init and a resume peak at 3
# copies too); and what a rank needs besides (torch, Horovod, the small network, the step's temporaries).
EXPECTED_WEIGHT_COPIES = 3
EXPECTED_RANK_BASE_BYTES = 2**29
SAMPLE_SECONDS = 0.2

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--instances", type=int, default=10_000_000, help="classifier rows N (default: 10000000)")
parser.add_argument("--rate-instances", type=int, default=100_000, help="rows of the seeding-rate run "
                    "(default: 100000)")
parser.add_argument("--rate-steps", type=int, default=100, help="batches of each seeding pass (default: 100)")
parser.add_argument("--work", default=str(ROOT / "runs" / "ten-million"), help="run directories; must not exist "
                    "(default: runs/ten-million)")
parser.add_argument("--drop-caches", action=argparse.BooleanOptionalAction, default=True, help="drop the page "
                    "cache before each run that reads a checkpoint (needs root) (default: on)")
parser.add_argument("--keep-work", action="store_true", help="keep --work at the end (default: removed)")
parser.add_argument("--force", action="store_true", help="run even when memory or disk look too small")


# -------------------------------------------------------------------------------- running and sampling
class RankMemory:
    """Samples the resident memory of every rank of a running horovodrun job (module docstring)."""

    def __init__(self, job):
        self.job, self.high_water, self.anonymous = job, {}, {}
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.job.poll() is None:
            try:
                processes = psutil.Process(self.job.pid).children(recursive=True)
            except psutil.Error:
                break
            for process in processes:
                try:
                    rank = process.environ().get("HOROVOD_RANK")
                    status = Path(f"/proc/{process.pid}/status").read_text()
                except (psutil.Error, OSError):
                    continue
                if rank is None:
                    continue
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
                          if line.startswith(("VmHWM", "RssAnon"))}
                self.high_water[int(rank)] = max(self.high_water.get(int(rank), 0), fields.get("VmHWM", 0))
                self.anonymous[int(rank)] = max(self.anonymous.get(int(rank), 0), fields.get("RssAnon", 0))
            time.sleep(SAMPLE_SECONDS)

    def summary(self):
        ranks = sorted(self.high_water)
        return (" / ".join(human_bytes(self.high_water[r]) for r in ranks),
                " / ".join(human_bytes(self.anonymous[r]) for r in ranks), max(self.anonymous.values(), default=0))


def trainer(ranks, out, *flags, log):
    """Run trainer.py at P = ranks to its end; returns (rank 0's output lines, RankMemory, seconds, sync seconds)."""
    command, environment = launch("horovod", ranks, ROOT / "trainer.py", "--out", out, *flags)
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        job = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=stream, stderr=subprocess.STDOUT,
                               text=True)
        memory = RankMemory(job)
        job.wait()
    seconds = time.perf_counter() - started
    memory.thread.join()
    synced = time.perf_counter()
    os.sync()  # the trainer's writes reach the page cache; this is the rest of the way to the disk
    sync_seconds = time.perf_counter() - synced
    output = Path(log).read_text()
    if job.returncode != 0:
        sys.exit(f"error: the run exited {job.returncode}; its output is in {log}:\n{output[-3000:]}")
    lines = [line.split(":", 1)[1] for line in output.splitlines() if line.startswith("[0]<stdout>:")]
    return lines, memory, seconds, sync_seconds


def drop_caches(enabled):
    """Empty the page cache, so that the next run reads its checkpoint from the disk; False if not done."""
    if not enabled:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def matching(lines, pattern):
    """The groups of the first line that matches `pattern` (a regex), or an error naming it."""
    for line in lines:
        match = re.search(pattern, line)
        if match:
            return match.groups()
    sys.exit(f"error: no line of rank 0's output matches {pattern!r}")


def epoch_records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(records, epoch):
    return [record["loss"] for record in records if record.get("epoch") == epoch and "step" in record]


def seconds_per_step(out, epoch):
    return next(r["seconds"] for r in epoch_records(out) if r.get("epoch") == epoch and "epoch_loss" in r) / STEPS


def checkpoint_files(checkpoint):
    """(bytes in all, bytes of the largest shard file, bytes of state.pt)."""
    sizes = {path.name: path.stat().st_size for path in Path(checkpoint).iterdir()}
    return sum(sizes.values()), max(v for k, v in sizes.items() if k.startswith("shard-")), sizes["state.pt"]


# -------------------------------------------------------------------------------- the measurement
def expected(instances, ranks):
    """(resident bytes per rank, disk bytes in all) the runs are expected to need."""
    weight = -(-instances // ranks) * DIM * 4
    checkpoint = 2 * instances * DIM * 4
    return EXPECTED_WEIGHT_COPIES * weight + EXPECTED_RANK_BASE_BYTES, 3 * checkpoint  # train's 2 + reshard's


def check_room(args, work):
    per_rank, disk = expected(args.instances, 2)
    available = psutil.virtual_memory().available
    free = shutil.disk_usage(work.parent).free
    print(f"expected: {human_bytes(per_rank)} resident per rank at P = 2 ({human_bytes(2 * per_rank)} for 2 ranks; "
          f"{human_bytes(available)} available), {human_bytes(disk)} of checkpoints on disk ({human_bytes(free)} free)",
          flush=True)
    if not args.force and (2 * per_rank > available or disk > free):
        sys.exit("error: this machine has too little memory or disk for the runs (above); --force runs anyway")


def plan_rows(instances, ranks):
    """model.plan's hybrid column by row name, without its parenthesis ("checkpoint in all", "total memory")."""
    return {name.split(" (")[0]: hybrid for name, hybrid, _ in plan(instances=instances, gpus=ranks, **PLAN_ARGS)}


def main():
    args = parser.parse_args()
    work = Path(args.work).resolve()
    if work.exists():
        sys.exit(f"error: --work {work} exists: give a new folder")
    work.parent.mkdir(parents=True, exist_ok=True)
    check_room(args, work)
    work.mkdir()
    flags = [*TRAIN_FLAGS, "--instances", str(args.instances)]
    train, reshard, seeding = work / "train", work / "reshard", work / "seeding"
    results = {}

    # 1. train at P = 2: two epochs, a checkpoint after each
    lines, memory, seconds, sync_seconds = trainer(2, train, *flags, "--epochs", "2", log=work / "train.log")
    first_losses = step_losses(epoch_records(train), 2)
    size, shard, state = checkpoint_files(train / "checkpoint-0002")
    write_seconds = float(matching(lines, r"wrote checkpoint-0002: .* in ([\d.]+)s")[0])
    results["train"] = dict(memory=memory.summary(), seconds=seconds, sync=sync_seconds, size=size, shard=shard,
                            state=state, write=write_seconds, step=[seconds_per_step(train, e) for e in (1, 2)])

    # 2. resume at P = 2 from checkpoint-0001: epoch 2 again (its losses are kept above)
    shutil.rmtree(train / "checkpoint-0002")
    cold = drop_caches(args.drop_caches)
    lines, memory, seconds, sync_seconds = trainer(2, train, *flags, "--epochs", "2", log=work / "resume.log")
    read_seconds = float(matching(lines, r"resumed from .*checkpoint-0001 .*read in ([\d.]+)s")[0])
    results["resume"] = dict(memory=memory.summary(), seconds=seconds, read=read_seconds, cold=cold,
                             bitwise=step_losses(epoch_records(train), 2) == first_losses,
                             write=float(matching(lines, r"wrote checkpoint-0002: .* in ([\d.]+)s")[0]))

    # 3. reshard: P = 3 from the P = 2 checkpoint-0002, one more epoch
    cold = drop_caches(args.drop_caches)
    lines, memory, seconds, sync_seconds = trainer(3, reshard, *flags, "--epochs", "3", "--resume",
                                                   train / "checkpoint-0002", log=work / "reshard.log")
    read_seconds = float(matching(lines, r"written by 2 ranks\): read in ([\d.]+)s")[0])
    size3, shard3, _ = checkpoint_files(reshard / "checkpoint-0003")
    results["reshard"] = dict(memory=memory.summary(), seconds=seconds, read=read_seconds, cold=cold, size=size3,
                              shard=shard3, step=seconds_per_step(reshard, 3),
                              write=float(matching(lines, r"wrote checkpoint-0003: .* in ([\d.]+)s")[0]))

    # 4. the seeding rate: the raw-feature init's two passes over rate-steps batches each, at P = 2
    rate_flags = [flag for flag in TRAIN_FLAGS if flag != "--no-raw-init"]
    lines, _, _, _ = trainer(2, seeding, *rate_flags, "--raw-init", "--instances", str(args.rate_instances),
                             "--epochs", "1", "--steps-per-epoch", str(args.rate_steps), log=work / "seeding.log")
    init_seconds = float(matching(lines, r"raw-feature init: .*: ([\d.]+)s")[0])
    images = 2 * args.rate_steps * BATCH * 2  # two passes x batches x images per rank x ranks
    results["seeding"] = dict(seconds=init_seconds, rate=images / init_seconds)

    print(report(args, results, work))
    if not args.keep_work:
        shutil.rmtree(work)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def report(args, results, work):
    """The markdown section for bench/RESULTS.md: what was measured beside model.plan's figures."""
    N, train, resume, reshard = args.instances, results["train"], results["resume"], results["reshard"]
    plan2, plan3 = plan_rows(N, 2), plan_rows(N, 3)
    expected_rank, _ = expected(N, 2)
    passes = lambda images: duration(2 * images / results["seeding"]["rate"])  # noqa: E731 (two passes)
    speed = lambda nbytes, seconds: f"{seconds:.1f} s ({human_bytes(nbytes / max(seconds, 1e-9))}/s)"  # noqa: E731
    cache = lambda run: "page cache dropped" if run["cold"] else "page cache warm"  # noqa: E731
    both = lambda memory: f"{memory[0]} ; {memory[1]}"  # noqa: E731 (VmHWM ; RssAnon, per rank)
    sizes = lambda plan_: f"{human_bytes(plan_['checkpoint in all'])} / " \
        f"{human_bytes(plan_['checkpoint: classifier file of one rank'])}"  # noqa: E731
    rows = [
        ("classifier weight + grad + momentum per rank, P = 2", "-",
         human_bytes(plan2["classifier weight"] + plan2["classifier grad + momentum"])),
        ("peak VmHWM ; RssAnon per rank, P = 2 train", both(train["memory"]),
         f"plan total {human_bytes(plan2['total memory'])}; expected RssAnon {human_bytes(expected_rank)} "
         f"({EXPECTED_WEIGHT_COPIES} x weight + {human_bytes(EXPECTED_RANK_BASE_BYTES)})"),
        ("seconds per step, P = 2 (epoch 1 / epoch 2)", " / ".join(f"{s:.1f}" for s in train["step"]), "-"),
        ("checkpoint in all / largest shard file, P = 2", f"{human_bytes(train['size'])} / "
         f"{human_bytes(train['shard'])} (state.pt {human_bytes(train['state'])})", sizes(plan2)),
        ("checkpoint write, P = 2 (into the page cache)", speed(train["size"], train["write"]), "-"),
        ("sync after the P = 2 run (the rest of the way to the disk)", f"{train['sync']:.1f} s", "-"),
        (f"resume at P = 2: read ({cache(resume)})", speed(train["size"], resume["read"]), "-"),
        ("resume at P = 2: epoch 2's losses against the first run's", "bitwise" if resume["bitwise"] else "DIFFER",
         "bitwise"),
        ("peak VmHWM ; RssAnon per rank, resume at P = 2", both(resume["memory"]), "-"),
        (f"reshard P = 2 -> 3: read ({cache(reshard)})", speed(train["size"], reshard["read"]), "-"),
        ("peak VmHWM ; RssAnon per rank, P = 3", both(reshard["memory"]),
         f"plan total {human_bytes(plan3['total memory'])}"),
        ("seconds per step, P = 3 (3 ranks on this machine's cores)", f"{reshard['step']:.1f}", "-"),
        ("checkpoint in all / largest shard file, P = 3", f"{human_bytes(reshard['size'])} / "
         f"{human_bytes(reshard['shard'])}", sizes(plan3)),
        ("checkpoint write, P = 3", speed(reshard["size"], reshard["write"]), "-"),
        (f"raw-feature init, P = 2 ({args.rate_steps} batches x 2 passes)",
         f"{results['seeding']['rate']:,.0f} images/s", "-"),
        (f"raw-feature init over {N:,} images", "-", f"{passes(N)} (from the rate)"),
        ("raw-feature init over 100,000,000 images", "-", f"{passes(100_000_000)} (from the rate)"),
        ("wall time: train / resume / reshard", " / ".join(duration(results[name]["seconds"])
                                                           for name in ("train", "resume", "reshard")), "-"),
    ]
    command = " ".join(["python bench/experiments/ten_million.py", *sys.argv[1:]])
    return "\n".join([f"### {N:,} rows at P = 2 and 3 (`{command}`)", "", f"{provenance()}; work folder {work}", "",
                      "| what | measured | plan / formula |", "|---|---|---|",
                      *(f"| {what} | {measured} | {planned} |" for what, measured, planned in rows), ""])


if __name__ == "__main__":
    main()
