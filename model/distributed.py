"""Horovod glue shared by the trainer, the evaluation and the checkpoints: Horovod's environment, device
choice, barriers, and BatchNorm statistics kept equal on every rank."""
import os

import horovod.torch as hvd
import torch

# Horovod's background thread negotiates and runs the queued collectives once per cycle, 1 ms by default, so
# a collective that the host waits for costs up to a cycle of latency on top of its transfer. The
# classifier waits for three per step, one after the other (features with ids, statistics, dE). Measured on
# one H100 with NCCL (../shared/horovod-cuda-build.md, 2026-11-26): one allgather took ~1.1 ms at the
# default cycle and 0.16 ms at 0.1 ms, and the classifier step 7.9 ms vs 4.05 ms. At 0.1 ms the wait is
# at most 0.1 of those 0.16 ms, so a shorter cycle could save little more and would wake the thread more
# often; a longer one fuses more of the backbone's gradient all-reduces per cycle, which this step does
# not need (they are large enough to run at full bandwidth on their own).
# CPU ranks (gloo) are the other way round: a step takes a second or so, and every cycle is a round trip
# between the ranks' background threads that takes CPU time from the ranks' compute threads, which fill
# every core (model/threads.py). On the 2-core VM, built-in data at P = 2, batch 128 (trainer runs of
# 2026-11-26): ~130 images/s at Horovod's 1 ms, 160-170 at 5 ms; at batch 32 (bench/RESULTS.md, "CPU speed of
# the demo") 1 and 5 ms were level. A cycle adds at most 5 ms to each collective the host waits for.
GPU_CYCLE_TIME_MS = "0.1"
CPU_CYCLE_TIME_MS = "5"


def default_horovod_environment():
    """Set Horovod's settings this workload needs where the user has not set them; call before hvd.init().

    HOROVOD_CYCLE_TIME (ms): GPU_CYCLE_TIME_MS when the ranks train on GPUs (see there: the classifier's
    collectives are small and on the critical path, so latency matters more than fusing), CPU_CYCLE_TIME_MS
    on CPU ranks (fewer wake-ups of the background thread on cores the compute needs). Returns
    {variable: value} of what it set.
    """
    chosen = {}
    if "HOROVOD_CYCLE_TIME" not in os.environ:
        cycle = GPU_CYCLE_TIME_MS if torch.cuda.is_available() else CPU_CYCLE_TIME_MS
        chosen["HOROVOD_CYCLE_TIME"] = os.environ["HOROVOD_CYCLE_TIME"] = cycle
    return chosen


def setup_device():
    """This rank's device, made current (DALI's GPU pipelines decode on the current device): the GPU
    `gpu_ordinal(local rank, visible devices)` when CUDA is visible, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", gpu_ordinal(hvd.local_rank(), torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def gpu_ordinal(local_rank, visible_devices):
    """The CUDA ordinal of a rank: its local rank modulo the number of devices its process sees.

    Every GPU of a node visible to every rank (`horovodrun -np 8 -H host:8`): ordinal = local rank. One GPU
    visible per process (SLURM `--gpus-per-task=1`, CUDA_VISIBLE_DEVICES set per rank): ordinal 0, where the
    local rank itself is an invalid ordinal for every rank but the first. More local ranks than visible
    devices: ranks share them round robin (correct, but each gets a fraction of a GPU).
    """
    if visible_devices < 1:
        raise ValueError(f"no CUDA device visible to local rank {local_rank}")
    return local_rank % visible_devices


def describe_device(device):
    """One line naming the device a rank uses, for the config print: 'cpu', or
    'cuda:0 NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=3)': with a per-rank CUDA_VISIBLE_DEVICES the ordinal
    is 0 on every rank and only the variable tells the physical GPUs apart."""
    if device.type != "cuda":
        return str(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return f"{device} {torch.cuda.get_device_name(device)} (CUDA_VISIBLE_DEVICES={visible})"


def barrier(name):
    """Wait until every rank got here: a one-element allreduce under a stable name (the same on every
    rank), so Horovod's response cache recognises it instead of negotiating a new collective."""
    hvd.allreduce(torch.zeros(1), name=f"barrier.{name}")


@torch.no_grad()
def average_batchnorm_statistics(*modules):
    """BatchNorm running statistics move per rank; averaging them keeps one encoder on every rank
    (what the kNN monitor evaluates and rank 0 saves), as after a resume."""
    buffers = [buffer for module in modules for buffer in module.buffers() if buffer.is_floating_point()]
    if not buffers:
        return
    # One grouped collective, not one per buffer: each would wait for a Horovod cycle of its own.
    averages = hvd.grouped_allreduce(buffers, op=hvd.Average, name=f"bn.{len(buffers)}")
    for buffer, average in zip(buffers, averages):
        buffer.copy_(average)
