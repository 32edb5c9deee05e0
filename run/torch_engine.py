"""The torch.distributed engine of run/distributed.py: `torchrun --nproc_per_node N trainer.py ...`.

NCCL on CUDA, gloo on CPU, both in every torch wheel. The collectives have no names (torch.distributed matches
them by their order, the same on every rank); what the seam promises holds as under Horovod:

- allgather with per-rank first dimensions and alltoall with splits need the sizes they will receive before
  they can allocate it (torch takes the received split sizes as host integers, where Horovod exchanges them
  in its own negotiation). So each first exchanges the sizes, a few integers, on a CPU (gloo) group: on the
  host, so that reading them never waits for the GPU. Callers that know what they will receive say so
  (`same_shape=True`, `received=`) and skip that exchange; the classifier does for its statistics and its dE.
- every collective takes a tensor on the CPU or on the rank's device and returns it where it came from: under
  NCCL, which refuses CPU tensors, host tensors go to the gloo group beside it (`_group`);
- grouped_allreduce and the data-parallel gradient reduction flatten their tensors into one buffer per dtype
  and device: one collective each, summed in the same order on every rank. The gradients are reduced at step(), after
  the backward, not overlapped with it as Horovod's hooks do.
- "average" is the sum divided by the size, as Horovod computes it (gloo has no average).

A failing rank: its exit closes its connections, and a peer's collective then raises at once (gloo) or at
the process group's timeout (COLLECTIVE_TIMEOUT); torchrun also stops the other workers when one exits
non-zero. Signals: README.md, "Stopping".
"""
import atexit
import datetime
import os

import torch
import torch.distributed as dist

from run.process_group import Engine, gpu_ordinal

# How long a collective may wait for a peer before it fails: long enough for the slowest legitimate wait of a
# run (rank 0 building the index of a large folder, or writing a checkpoint, while the others wait at a
# barrier), far below torch's default of 30 minutes, which would leave a job hung that long on a dead peer.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
# What gloo's errors say when a peer's process is gone (it raises them as plain RuntimeErrors).
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# Newer torch names the equal-size allgather all_gather_single (all_gather_into_tensor warns there).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def device_backend():
    """The backend of the default group: NCCL where CUDA is, gloo elsewhere."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class TorchEngine(Engine):
    name = "torch"

    def __init__(self):
        backend = device_backend()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if backend == "nccl":  # NCCL needs this rank's GPU current before the group forms
            torch.cuda.set_device(gpu_ordinal(self.local_rank, torch.cuda.device_count()))
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # NCCL takes only tensors on the rank's GPU: host tensors (split sizes, counts, flags, barriers, objects)
        # travel on a gloo group beside it. Under gloo the default group takes both.
        self.host_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend != "gloo" else None
        self.settings = {"backend": backend, "timeout": f"{COLLECTIVE_TIMEOUT.total_seconds():.0f}s"}
        # torch asks for the group to be destroyed before a normal exit, while the interpreter is whole: done
        # here for every script that starts the engine. The interpreter's teardown after it can still abort a
        # finished gloo worker now and then ("terminate called without an active exception", exit -6, and
        # torchrun then fails the job), so the trainer ends without that teardown (run.distributed.exit_now).
        atexit.register(self.shutdown)

    def _group(self, tensor):
        """The group that takes `tensor`: the host group for a CPU tensor, the default group otherwise."""
        return self.host_group if tensor.device.type == "cpu" else None

    # ---- host integers
    def _gather_sizes(self, size):
        """[P] int64 on the CPU: every rank's `size`."""
        sizes = torch.zeros(self.size, dtype=torch.int64)
        all_gather_single(sizes, torch.tensor([size], dtype=torch.int64), group=self.host_group)
        return sizes

    def _exchange_splits(self, splits):
        """The rows each rank sends to this one, given the rows this one sends to each."""
        received = torch.zeros(self.size, dtype=torch.int64)
        dist.all_to_all_single(received, torch.as_tensor(splits, dtype=torch.int64).cpu(), group=self.host_group)
        return received

    # ---- collectives
    def _allreduce(self, tensor, op, name):
        result = tensor.clone()
        dist.all_reduce(result, op=OPS.get(op, dist.ReduceOp.SUM), group=self._group(result))
        return result / self.size if op == "average" else result

    def _grouped_allreduce(self, tensors, op, name):
        results = [None] * len(tensors)
        # One flat buffer per dtype and device, in order: host tensors and the GPU's go to different groups.
        for kind in dict.fromkeys((tensor.dtype, tensor.device) for tensor in tensors):
            members = [position for position, tensor in enumerate(tensors) if (tensor.dtype, tensor.device) == kind]
            flat = self._allreduce(torch.cat([tensors[position].reshape(-1) for position in members]), op, name)
            for position, piece in zip(members, flat.split([tensors[position].numel() for position in members])):
                results[position] = piece.view_as(tensors[position])
        return results

    def _allgather(self, tensor, name, same_shape):
        tensor = tensor.contiguous()
        if same_shape:
            gathered = tensor.new_empty((self.size * tensor.shape[0], *tensor.shape[1:]))
            all_gather_single(gathered, tensor, group=self._group(tensor))
            return gathered
        sizes = self._gather_sizes(tensor.shape[0]).tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = tensor.new_empty((self.size * max(sizes), *tensor.shape[1:]))
        all_gather_single(gathered, padded, group=self._group(padded))
        return torch.cat([block[:size] for block, size in zip(gathered.split(max(sizes)), sizes)])

    def _alltoall(self, tensor, splits, name, received):
        splits = torch.as_tensor(splits, dtype=torch.int64).tolist() if not isinstance(splits, list) else splits
        received = self._exchange_splits(splits) if received is None else torch.as_tensor(received)
        output = tensor.new_empty((int(received.sum()), *tensor.shape[1:]))
        dist.all_to_all_single(output, tensor.contiguous(), output_split_sizes=received.tolist(),
                               input_split_sizes=splits, group=self._group(output))
        return output, received.to(torch.int32)

    def _broadcast_parameters(self, named_tensors, root):
        for _, tensor in named_tensors:
            dist.broadcast(tensor.data, src=root, group=self._group(tensor))

    def _broadcast_object(self, obj, root, name):
        box = [obj]
        dist.broadcast_object_list(box, src=root, group=self.host_group)
        return box[0]

    def _allgather_object(self, obj, name):
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered

    def _data_parallel_optimizer(self, optimizer, named_parameters, op):
        return GradientReducingOptimizer(optimizer, [parameter for _, parameter in named_parameters],
                                         lambda grads: self._grouped_allreduce(grads, op, None))

    # ---- life cycle
    def is_peer_failure(self, error):
        return isinstance(error, dist.DistBackendError) or (
            isinstance(error, RuntimeError) and any(sign in str(error) for sign in PEER_FAILURE_SIGNS))

    def shutdown(self):
        if dist.is_initialized():
            dist.destroy_process_group()


class GradientReducingOptimizer:
    """An optimizer whose step() first replaces the gradients of `parameters` by their reduction over the ranks
    (`reduce`: list of gradients -> list of reduced gradients); everything else is the wrapped optimizer's."""

    def __init__(self, optimizer, parameters, reduce):
        self.optimizer, self.parameters, self.reduce = optimizer, parameters, reduce

    def step(self, closure=None):
        for parameter in self.parameters:  # every rank reduces the same list: a gradient missing here is zero
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        for parameter, reduced in zip(self.parameters, self.reduce([parameter.grad for parameter in self.parameters])):
            parameter.grad.copy_(reduced)
        return self.optimizer.step(closure)

    def __getattr__(self, name):  # zero_grad, param_groups, state, state_dict, load_state_dict, ...
        return getattr(self.optimizer, name)
