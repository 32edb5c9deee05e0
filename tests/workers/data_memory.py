"""One process building, running for one pass and dropping loaders in turn, as the trainer does every epoch.

Usage: data_memory.py INDEX_JSON LOADERS. Cycles pretrain, linear-train and eval loaders (seed = the loader's
number) and prints, as a JSON list, the RSS in MiB after each loader is dropped; the test checks it stays flat.
"""
import json
import os
import sys

from data.index import InstanceIndex
from data.loaders import eval_loader, linear_train_loader, pretrain_loader
from tests.workers.loader_config import ONE_RANK, loader_config

BATCH_SIZE = 128  # 2 batches of the test's 256 images a pass, to keep it quick
IMAGE_SIZE = 32


def resident_mib():
    return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


def main(index_json, loaders):
    index = InstanceIndex.load(index_json)
    def config(number):
        return loader_config(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, views=2, threads=2, seed=number)
    builders = [lambda number: pretrain_loader(index, config(number), 0, ONE_RANK),
                lambda number: linear_train_loader(index, config(number), 0, BATCH_SIZE, ONE_RANK),
                lambda number: eval_loader(index, config(number), group=ONE_RANK)]
    resident = []
    for number in range(loaders):
        for batch in builders[number % len(builders)](number):  # the loader is dropped when the loop ends
            pass
        del batch  # the last batch's tensors are not the loader's memory
        resident.append(resident_mib())
    print(json.dumps(resident))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
