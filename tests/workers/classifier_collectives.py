"""Worker: the collectives of one classifier step (forward + backward, chunked backend), as the engine reports
them (run.step_counter.StepCounter) and, under the torch engine, as torch.distributed sees them: the calls of its
collective functions during the step, in order. Then what waiting for a collective costs a rank in CPU time: rank 1
sleeps LATE_S before each collective of WAITS (before the backward that starts the data-parallel optimizer's
all-reduces, for its step), and each rank measures its own process's CPU time (all its threads) from the call to
the result; rank 0's are its waits for rank 1.

Usage: classifier_collectives.py OUT_DIR   (under horovodrun, torchrun, or alone); writes OUT_DIR/rankR.json, with
"waits": {operation: [CPU seconds, wall seconds]}.
"""
import functools
import json
import sys
import time

import torch
import torch.distributed as dist

from model.classifier import ShardedInstanceClassifier
from run.distributed import exit_now, start
from run.step_counter import StepCounter

TORCH_COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "all_to_all_single", "broadcast",
                     "all_gather_object", "broadcast_object_list")

world = start(announce=False)
calls = []


def recording(name, function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)
    return wrapped


for name in TORCH_COLLECTIVES:
    if hasattr(dist, name):
        setattr(dist, name, recording(name, getattr(dist, name)))
torch_engine = sys.modules.get("run.torch_engine")
if torch_engine is not None:  # it holds the allgather it chose under a name of its own
    torch_engine.all_gather_single = recording("all_gather_single", torch_engine.all_gather_single)
classifier = ShardedInstanceClassifier(40, 8, smooth_k=3, smooth_alpha=0.2, backend="chunked")
batch = 3 + world.rank  # uneven batches
features = torch.randn(batch, 8, generator=torch.Generator().manual_seed(world.rank), requires_grad=True)
ids = torch.arange(batch) + 10 * world.rank
with StepCounter() as counted:
    loss = classifier(features, ids).loss
    loss.backward()
step_calls = list(calls)

LATE_S = 0.4
model = torch.nn.Linear(4, 1)
optimizer = world.data_parallel_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())


def optimizer_step():
    model(torch.ones(2, 4)).sum().backward()  # this rank's all-reduces start here; the step waits for the peer's
    optimizer.step()


WAITS = {
    "allreduce": lambda: world.allreduce(torch.ones(8), name="wait.allreduce"),
    "grouped_allreduce": lambda: world.grouped_allreduce([torch.ones(8), torch.ones(3)], name="wait.grouped"),
    "allgather": lambda: world.allgather(torch.ones(2, 3), name="wait.allgather"),
    "alltoall": lambda: world.alltoall(torch.ones(2 * world.size, 3), [2] * world.size, name="wait.alltoall"),
    "data_parallel_optimizer": optimizer_step,
}
waits = {}
for name, operation in WAITS.items():
    world.barrier(f"wait.before.{name}")
    if world.rank == 1:
        time.sleep(LATE_S)
    cpu, wall = time.process_time(), time.perf_counter()
    operation()
    waits[name] = [time.process_time() - cpu, time.perf_counter() - wall]
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as stream:
    json.dump({"engine": world.name, "collectives": counted.collectives, "syncs": counted.syncs,
               "torch_calls": step_calls, "loss": loss.item(), "waits": waits}, stream)
exit_now(0)  # as the trainer ends: no interpreter teardown, which can abort a gloo worker now and then
