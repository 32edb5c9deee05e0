"""P-rank worker: what every loader yields from tar shards over several epochs, written to OUT/rank<r>.json.

Usage: data_shard_epochs.py DATA OUT EPOCHS. The ranks index DATA as a run does (rank 0 builds the indexes in
OUT, every rank loads them: data/run_index.py), then run each loader for EPOCHS epochs, and build a pretraining
loader per epoch from that epoch's seed as the trainer does. Recorded per loader and epoch: the ids of every
batch and, for the evaluation loaders, the sample that each row's pixels show (tests/workers/data_shards.py).
"""
import json
import sys
from pathlib import Path


from data.loaders import eval_loader, linear_train_loader, pretrain_loader
from data.run_index import run_indexes
from run.distributed import start
from tests.workers.data_shards import numbers_shown
from tests.workers.loader_config import loader_config

BATCH_SIZE = 4
IMAGE_SIZE = 8
SEED = 3


def epochs_of(loader, epochs, evaluation):
    """[epoch][batch] ids, and for evaluation loaders the [epoch][batch] samples the pixels show."""
    ids, shown = [], []
    for _ in range(epochs):
        batches = [(images, batch_ids) for images, batch_ids in loader]
        ids.append([batch_ids.tolist() for _, batch_ids in batches])
        if evaluation:
            shown.append([numbers_shown(images) for images, _ in batches])
    return {"ids": ids, "shown": shown, "batches_per_epoch": len(loader)}


def main(data, out, epochs):
    world = start(announce=False)
    messages = []
    index, val_index, _ = run_indexes(data, out, strict=False, log=messages.append)
    config = loader_config(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, views=1, crop_ratio=1.0, threads=1, seed=SEED)
    record = {"keys": index.keys, "num_instances": index.num_instances, "messages": messages,
              "val_instances": val_index and val_index.num_instances}
    record["pretrain"] = epochs_of(pretrain_loader(index, config, 0), epochs, False)  # the started engine's rank
    record["linear"] = epochs_of(linear_train_loader(index, config, 0, BATCH_SIZE), epochs, False)
    record["eval"] = epochs_of(eval_loader(index, config), epochs, True)
    record["eval_shuffled"] = epochs_of(eval_loader(index, config, shuffle=True), epochs, True)
    per_epoch = [epochs_of(pretrain_loader(index, config, epoch), 1, False) for epoch in range(epochs)]
    record["pretrain_per_epoch"] = {"ids": [run["ids"][0] for run in per_epoch], "shown": [],
                                    "batches_per_epoch": per_epoch[0]["batches_per_epoch"]}
    (Path(out) / f"rank{world.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
