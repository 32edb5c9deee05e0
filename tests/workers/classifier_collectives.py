"""Worker: the collectives of one classifier step (forward + backward, chunked backend), as the engine reports
them (run.step_counter.StepCounter) and, under the torch engine, as torch.distributed sees them: the calls of its
collective functions during the step, in order.

Usage: classifier_collectives.py OUT_DIR   (under horovodrun, torchrun, or alone); writes OUT_DIR/rankR.json.
"""
import functools
import json
import sys

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
with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as stream:
    json.dump({"engine": world.name, "collectives": counted.collectives, "syncs": counted.syncs,
               "torch_calls": calls, "loss": loss.item()}, stream)
exit_now(0)  # as the trainer ends: no interpreter teardown, which can abort a gloo worker now and then
