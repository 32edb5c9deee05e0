"""One rank of model.evaluation.knn_accuracy over a bank and queries cut into uneven per-rank shards.

Usage: knn_shards.py OUT_JSON. Every rank draws the same problem (tests/test_evaluation.py: knn_problem) and keeps
its shard, rank r of P getting a share proportional to r + 1, so that rank 0's bank shard is smaller than the
largest k. Rank 0 writes the accuracies to OUT_JSON.
"""
import json
import sys

from model.evaluation import knn_accuracy
from run.distributed import start
from tests.test_evaluation import KNN_SETTINGS, NUM_CLASSES, knn_problem


def uneven_shard(rows, rank, world_size):
    """Rows [start, stop) of rank r when the shares grow as 1, 2, ..., P."""
    total = world_size * (world_size + 1) // 2
    start = len(rows) * (rank * (rank + 1) // 2) // total
    stop = len(rows) * ((rank + 1) * (rank + 2) // 2) // total
    return rows[start:stop]


if __name__ == "__main__":
    world = start(announce=False)
    bank, bank_labels, queries, query_labels = (uneven_shard(rows, world.rank, world.size) for rows in knn_problem())
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, NUM_CLASSES, settings=KNN_SETTINGS)
    if world.rank == 0:
        with open(sys.argv[1], "w") as stream:
            json.dump(accuracy, stream)
