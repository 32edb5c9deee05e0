"""Worker: what a rank's waits for a collective cost it in CPU time. Rank 1 sleeps LATE_S before each
collective (and before the backward that starts the data-parallel optimizer's all-reduces); rank 0 measures its
own process's CPU time (all its threads) from the call to the result, while it waits for rank 1.

Usage: collective_waits.py OUT_DIR   (2 ranks, under horovodrun or torchrun); writes OUT_DIR/rank0.json:
{operation: [CPU seconds, wall seconds] of rank 0's wait}.
"""
import json
import sys
import time

import torch

from run.distributed import exit_now, start

LATE_S = 0.4
world = start(announce=False)
model = torch.nn.Linear(4, 1)
optimizer = world.data_parallel_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())


def optimizer_step():
    model(torch.ones(2, 4)).sum().backward()  # rank 0's all-reduces start here; the step waits for rank 1's
    optimizer.step()


OPERATIONS = {
    "allreduce": lambda: world.allreduce(torch.ones(8), name="wait.allreduce"),
    "grouped_allreduce": lambda: world.grouped_allreduce([torch.ones(8), torch.ones(3)], name="wait.grouped"),
    "allgather": lambda: world.allgather(torch.ones(2, 3), name="wait.allgather"),
    "alltoall": lambda: world.alltoall(torch.ones(4, 3), [2, 2], name="wait.alltoall"),
    "data_parallel_optimizer": optimizer_step,
}
costs = {}
for name, operation in OPERATIONS.items():
    world.barrier(f"wait.before.{name}")
    if world.rank == 1:
        time.sleep(LATE_S)
    cpu, wall = time.process_time(), time.perf_counter()
    operation()
    costs[name] = [time.process_time() - cpu, time.perf_counter() - wall]
if world.rank == 0:
    with open(f"{sys.argv[1]}/rank0.json", "w") as stream:
        json.dump(costs, stream)
world.barrier("wait.end")
exit_now(0)
