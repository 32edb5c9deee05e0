"""Worker: count the bytes each rank receives through the engine in one classifier step, and its shard bytes.

Usage: python plan_traffic.py OUT_DIR INSTANCES BATCH_PER_RANK DIM K
"""
import json
import sys

import torch

from model.classifier import ShardedInstanceClassifier
from run.distributed import start

out_dir, instances, batch, dim, k = sys.argv[1], *map(int, sys.argv[2:])
world = start(announce=False)
received = {"bytes": 0}
allgather, alltoall = world.allgather, world.alltoall


def counting_allgather(tensor, *args, **kwargs):
    output = allgather(tensor, *args, **kwargs)
    received["bytes"] += (output.numel() - tensor.numel()) * output.element_size()  # all but its own part
    return output


def counting_alltoall(tensor, splits=None, *args, **kwargs):
    output, received_splits = alltoall(tensor, splits, *args, **kwargs)
    own = received_splits[world.rank].item() * output[0].numel() if len(output) else 0
    received["bytes"] += (output.numel() - own) * output.element_size()
    return output, received_splits


world.allgather, world.alltoall = counting_allgather, counting_alltoall  # this engine's only
classifier = ShardedInstanceClassifier(instances, dim, smooth_k=k, smooth_alpha=0.2)
optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
features = torch.randn(batch, dim, requires_grad=True)
classifier(features, torch.randint(0, instances, (batch,))).loss.backward()
optimizer.step()
state = optimizer.state[classifier.weight]["momentum_buffer"]
result = {"received": received["bytes"],
          "weight_bytes": classifier.weight.numel() * classifier.weight.element_size(),
          "grad_momentum_bytes": (classifier.weight.grad.numel() + state.numel()) * state.element_size()}
json.dump(result, open(f"{out_dir}/rank{world.rank}.json", "w"))
