"""Horovod glue shared by the trainer, the evaluation and the checkpoints: device choice, barriers, and
BatchNorm statistics kept equal on every rank."""
import os

import horovod.torch as hvd
import torch


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
    for module in modules:
        for name, buffer in module.named_buffers():
            if buffer.is_floating_point():
                buffer.copy_(hvd.allreduce(buffer, op=hvd.Average, name=f"bn.{name}"))
