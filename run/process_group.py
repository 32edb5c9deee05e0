"""The interface every engine of run/distributed.py implements, the single-process engine, and the observers
of the collectives (run/step_counter.py): what the engines (run/horovod_engine.py, run/torch_engine.py) build on,
below run/distributed.py, which chooses and starts one of them.
"""
import contextlib

import torch

REDUCTIONS = ("sum", "average", "min", "max")
# Entered around every collective as observer.collective("op name"), innermost last (run/step_counter.py).
collective_observers = []


class Engine:
    """One process's view of the process group. Subclasses set rank, size, local_rank, local_size and implement
    the underscore methods; the public methods report each collective to the collective_observers, then call them."""

    name = None
    rank = size = local_rank = local_size = None
    device = torch.device("cpu")
    settings = {}  # {variable: value} this engine set for the run (printed in the start-up line)

    # ---- collectives
    def allreduce(self, tensor, op="sum", name=None):
        return self._counted("allreduce", name, self._allreduce, tensor, _checked(op), name)

    def grouped_allreduce(self, tensors, op="sum", name=None):
        return self._counted("grouped_allreduce", name, self._grouped_allreduce, list(tensors), _checked(op), name)

    def allgather(self, tensor, name=None, same_shape=False):
        """same_shape: every rank's tensor has this shape (an engine that must otherwise exchange the first
        dimensions first may skip that)."""
        return self._counted("allgather", name, self._allgather, tensor, name, same_shape)

    def alltoall(self, tensor, splits, name=None, received=None):
        """splits: the rows for each rank, a list or a [P] int tensor (a tensor costs the host no read);
        received: the rows that will come from each rank, where the caller knows them (likewise)."""
        return self._counted("alltoall", name, self._alltoall, tensor, splits, name, received)

    def broadcast_parameters(self, named_tensors, root=0):
        """named_tensors: (name, tensor) pairs or a {name: tensor} dict (a state_dict), overwritten in place."""
        named = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        return self._counted("broadcast_parameters", None, self._broadcast_parameters, named, root)

    def broadcast_object(self, obj, root=0, name=None):
        return self._counted("broadcast_object", name, self._broadcast_object, obj, root, name)

    def allgather_object(self, obj, name=None):
        return self._counted("allgather_object", name, self._allgather_object, obj, name)

    def barrier(self, name):
        """Wait until every rank got here: a one-element allreduce under a stable name."""
        self.allreduce(torch.zeros(1), name=f"barrier.{name}")

    def data_parallel_optimizer(self, optimizer, named_parameters, op="average"):
        """`optimizer` whose step() first reduces the gradients of `named_parameters` over the ranks."""
        return self._data_parallel_optimizer(optimizer, list(named_parameters), _checked(op))

    # ---- life cycle
    def is_peer_failure(self, error):
        """True for the exception a collective raises when another rank has failed."""
        return False

    def shutdown(self):
        """Leave the process group now, so that the collectives of ranks still running fail instead of waiting."""

    def _counted(self, op, name, call, *args):
        with contextlib.ExitStack() as stack:
            for observer in collective_observers:
                stack.enter_context(observer.collective(f"{op} {name}"))
            return call(*args)


class SingleProcess(Engine):
    """One process, no process group: each collective over one rank is a copy of its input."""

    name = "single"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def _allreduce(self, tensor, op, name):
        return tensor.clone()

    def _grouped_allreduce(self, tensors, op, name):
        return [tensor.clone() for tensor in tensors]

    def _allgather(self, tensor, name, same_shape):
        return tensor.clone()

    def _alltoall(self, tensor, splits, name, received):
        if isinstance(splits, list) and splits != [len(tensor)]:  # a tensor is not read: that would sync the host
            raise ValueError(f"alltoall over one rank sends all {len(tensor)} rows to itself, got splits {splits}")
        return tensor.clone(), torch.tensor([len(tensor)], dtype=torch.int32)

    def _broadcast_parameters(self, named_tensors, root):
        pass

    def _broadcast_object(self, obj, root, name):
        return obj

    def _allgather_object(self, obj, name):
        return [obj]

    def _data_parallel_optimizer(self, optimizer, named_parameters, op):
        return optimizer  # the sum and the average over one rank are the gradient itself


def _checked(op):
    if op not in REDUCTIONS:
        raise ValueError(f"reduction op must be one of {REDUCTIONS}, got {op!r}")
    return op


def gpu_ordinal(local_rank, visible_devices):
    """The CUDA ordinal of a rank: its local rank modulo the number of devices its process sees.

    Every GPU of a node visible to every rank (`horovodrun -np 8 -H host:8`): ordinal = local rank. One GPU
    visible per process (SLURM `--gpus-per-task=1`, CUDA_VISIBLE_DEVICES set per rank): ordinal 0, where the
    local rank itself is an invalid ordinal for every rank but the first. More local ranks than visible
    devices would put two ranks on one GPU, which NCCL refuses: start() stops such a launch (refuse_shared_gpus).
    """
    if visible_devices < 1:
        raise ValueError(f"no CUDA device visible to local rank {local_rank}")
    return local_rank % visible_devices
