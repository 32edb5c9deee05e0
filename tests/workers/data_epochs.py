"""P-rank worker: what every loader yields on this rank over several epochs, written to OUT/rank<r>.json.

Usage: data_epochs.py FOLDER OUT EPOCHS. All ranks index FOLDER at once (the index write must be atomic),
then run each loader for EPOCHS epochs; the test checks the ids across ranks and the tensor summaries.
"""
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from data.index import build_index
from data.loaders import eval_loader, linear_train_loader, pretrain_loader
from tests.workers.loader_config import loader_config, rank_of

BATCH_SIZE = 4
IMAGE_SIZE = 16


def summarize(views, ids):
    """Shapes, dtypes and value range of one batch; how far apart its two views are when there are two."""
    stacked = torch.stack(views)  # [views, b, 3, S, S]
    return {
        "shapes": [list(view.shape) for view in views],
        "dtypes": [str(view.dtype) for view in views] + [str(ids.dtype)],
        "finite": bool(stacked.isfinite().all()),
        "min": stacked.min().item(),
        "max": stacked.max().item(),
        "view_difference": (views[0] - views[-1]).abs().mean().item(),
    }


def main(folder, out, epochs):
    hvd.init()
    index = build_index(folder, out_dir=out, log=lambda message: None)
    config = loader_config(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, views=2, threads=1, seed=3)
    group = rank_of(hvd.rank(), hvd.size())
    loaders = {
        "pretrain": pretrain_loader(index, config, 0, group),
        "linear": linear_train_loader(index, config, 0, BATCH_SIZE, group),
        "eval": eval_loader(index, config, group=group),
    }
    record = {"files": index.files}
    for name, loader in loaders.items():
        epoch_ids, batches = [], []
        for _ in range(epochs):
            ids = []
            for images, batch_ids in loader:
                batches.append(summarize(images if name == "pretrain" else [images], batch_ids))
                ids += batch_ids.tolist()
            epoch_ids.append(ids)
        record[name] = {"batches_per_epoch": len(loader), "epoch_ids": epoch_ids, "batches": batches}
    (Path(out) / f"rank{hvd.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
