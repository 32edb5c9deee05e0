"""P-rank worker: a training-like lockstep loop over an index holding an image damaged after indexing.

Usage: data_decode_failure.py INDEX_JSON. The rank that meets the image must stop with the loader's one-line
error, printed as the trainer prints bad-input errors, and the job must end instead of leaving the other ranks
waiting in their next collective.
"""
import sys

import horovod.torch as hvd

from data.index import InstanceIndex
from data.loaders import eval_loader
from tests.workers.loader_config import loader_config, rank_of

hvd.init()
try:
    loader = eval_loader(InstanceIndex.load(sys.argv[1]), loader_config(threads=1),
                         group=rank_of(hvd.rank(), hvd.size()))
    for epoch in range(2):
        for images, ids in loader:
            hvd.allreduce(images.mean(), name="step")  # the synchronization a training step imposes
except ValueError as error:
    print(f"error: {error}", flush=True)
    sys.exit(1)
