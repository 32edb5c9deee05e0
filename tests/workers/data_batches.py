"""A fresh process's epoch of batches from the pretraining and linear-training loaders of one (seed, rank).

Usage: data_batches.py INDEX_JSON OUT SEED RANK WORLD_SIZE (an index of a folder or of shards). Saves {"pretrain": [(views [2, b, 3, S, S], ids), ...],
"linear": [(images [b, 3, S, S], ids), ...]} to OUT with torch.save, for the test to compare with its own loaders'.
"""
import sys

import torch

from data.loaders import linear_train_loader, pretrain_loader
from data.run_index import load_index
from tests.workers.loader_config import loader_config, rank_of

BATCH_SIZE = 4
IMAGE_SIZE = 16


def epochs(index, seed, rank, world_size):
    """One epoch of each training loader, as lists of (images, ids) batches."""
    config, group = loader_config(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, seed=seed), rank_of(rank, world_size)
    return {"pretrain": [(torch.stack(views), ids) for views, ids in pretrain_loader(index, config, 0, group)],
            "linear": list(linear_train_loader(index, config, 0, BATCH_SIZE, group))}


if __name__ == "__main__":
    index_json, out, seed, rank, world_size = sys.argv[1:]
    torch.save(epochs(load_index(index_json), int(seed), int(rank), int(world_size)), out)
