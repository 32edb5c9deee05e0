"""One rank of a raw-feature init (or of a BatchNorm calibration alone) of a pixel-level 'encoder' whose
BatchNorm statistics have a float64 oracle: flatten the image, BatchNorm1d over the 3 x S x S pixels.

Usage: batchnorm_calibration.py INDEX_JSON OUT_DIR ORDER, ORDER = 'raw-init' (model.initialisation.raw_feature_init
as the trainer calls it) or 'id-order' (calibrate_batchnorm on the id-ordered, class-sorted evaluation loader: the
control that the oracle can tell the two apart). Saves OUT_DIR/rank-R.pt: the BatchNorm's running statistics and
this rank's classifier rows [start, stop).
"""
import argparse
import sys

import torch

from data.index import InstanceIndex
from data.loaders import eval_loader
from model.classifier import ShardedInstanceClassifier
from model.initialisation import calibrate_batchnorm, raw_feature_init
from run.distributed import start

BATCH_SIZE = 25
IMAGE_SIZE = 32


def pixel_encoder():
    """(backbone, head): the pixels flattened, then BatchNorm1d; no weights that a pass could change."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(3 * IMAGE_SIZE ** 2)), torch.nn.Identity()


if __name__ == "__main__":
    index_json, out_dir, order = sys.argv[1:]
    world = start(announce=False)
    index = InstanceIndex.load(index_json)
    config = argparse.Namespace(data=str(index.root), batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, dali_device="cpu",
                                threads=1, crop_ratio=1.0, seed=3, precision="fp32")
    backbone, head = pixel_encoder()
    classifier = ShardedInstanceClassifier(index.num_instances, 3 * IMAGE_SIZE ** 2)
    if order == "raw-init":
        raw_feature_init(backbone, head, classifier, index, config)
    else:
        calibrate_batchnorm(backbone, (backbone,), eval_loader(index, config))
    batchnorm = backbone[1]
    torch.save({"running_mean": batchnorm.running_mean, "running_var": batchnorm.running_var, "eps": batchnorm.eps,
                "start": classifier.start, "rows": classifier.weight.detach()}, f"{out_dir}/rank-{world.rank}.pt")
