"""trainer.py (argv: the trainer's own) under torchrun with a CPU stand-in of NCCL's contract: the default group
refuses every CPU tensor, as NCCL does ("No backend type associated with device type cpu"), and the engine
forms its gloo host group beside it as it does under NCCL. On a CPU every tensor is a host tensor, so the run
finishes only if every collective of the trainer reaches the group that takes host tensors."""
import functools
import sys

import torch
import torch.distributed as dist

from run import torch_engine

REFUSAL = "No backend type associated with device type cpu"
TENSOR_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_to_all_single", "broadcast", "all_gather",
                      "reduce_scatter_tensor", "reduce", "barrier", "all_gather_object", "broadcast_object_list")


def refusing_host_tensors(function):
    @functools.wraps(function)
    def collective(*args, group=None, **kwargs):
        if group is None or group is dist.group.WORLD:
            tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
            if not tensors or any(tensor.device.type == "cpu" for tensor in tensors):
                raise RuntimeError(f"{function.__name__}: {REFUSAL}")
        return function(*args, group=group, **kwargs)
    return collective


for name in TENSOR_COLLECTIVES:
    setattr(dist, name, refusing_host_tensors(getattr(dist, name)))
torch_engine.all_gather_single = refusing_host_tensors(torch_engine.all_gather_single)
real_init_process_group = dist.init_process_group
dist.init_process_group = lambda backend=None, **options: real_init_process_group(
    backend="gloo" if backend == "nccl" else backend, **options)
torch_engine.device_backend = lambda: "nccl"
torch.cuda.set_device = lambda device: None  # NCCL's current GPU: there is none here
torch.cuda.device_count = lambda: 1

sys.argv = ["trainer.py", *sys.argv[1:]]
import trainer  # noqa: E402 (after the stand-in: the engine starts inside main)

trainer.main()
trainer.exit_now(0)
