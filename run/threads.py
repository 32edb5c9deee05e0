"""CPU threads per rank: the cores of this host shared by its ranks.

torch sizes its intra-op pool to every core the process may use, so `horovodrun -np 2` on a 2-core host runs
two ranks of two threads each that preempt each other in every convolution. Unless the user chose with
OMP_NUM_THREADS, each rank takes cores // local ranks threads (at least 1).
"""
import os

import torch


def share_cpu_threads(local_ranks):
    """Set this rank's torch threads, local_ranks being the ranks on this host; returns how many and why, for
    the start-up line."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // local_ranks))
    return f"{torch.get_num_threads()} ({cores} cores / {local_ranks} ranks on this host)"
