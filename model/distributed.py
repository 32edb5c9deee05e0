"""Horovod glue shared by the trainer, the evaluation and the checkpoints: device choice, barriers, and
BatchNorm statistics kept equal on every rank."""
import horovod.torch as hvd
import torch


def setup_device():
    """This rank's device: the GPU of its local rank when CUDA is visible, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        return torch.device("cuda", hvd.local_rank())
    return torch.device("cpu")


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
