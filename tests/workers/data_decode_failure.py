"""P-rank worker: a training-like lockstep loop over an index holding an image damaged after indexing.

Usage: data_decode_failure.py INDEX_JSON. The rank that meets the image must stop with the loader's one-line
error, printed as the trainer prints bad-input errors, and the job must end instead of leaving the other ranks
waiting in their next collective.
"""
import sys

import horovod.torch as hvd

from data.index import InstanceIndex
from data.pipelines import eval_loader

hvd.init()
try:
    loader = eval_loader(InstanceIndex.load(sys.argv[1]), batch_size=4, image_size=16, rank=hvd.rank(),
                         world_size=hvd.size(), device="cpu", threads=1)
    for epoch in range(2):
        for images, ids in loader:
            hvd.allreduce(images.mean(), name="step")  # the synchronization a training step imposes
except ValueError as error:
    print(f"error: {error}", flush=True)
    sys.exit(1)
