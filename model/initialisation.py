"""Raw-feature initialisation of the classifier (Liu et al., AAAI 2021, section 3.2) and BatchNorm calibration.

The paper seeds row i of the classifier with the feature of image i under the randomly initialized network,
after one inference epoch in which only the BatchNorm statistics update. Here that is two passes:

1. statistics (`calibrate_batchnorm`): one pass over the training images in a shuffled order (one permutation
   of the whole dataset, cut into disjoint shards as for training), BatchNorm in train mode with momentum=None,
   so each running mean / variance ends as the plain average of the batch statistics of the pass (a cumulative
   average, not an exponential one that remembers mostly the last batches), then averaged over the ranks;
2. features: a second pass in eval mode, so each row is a function of its image alone under those statistics:
   not of its batch-mates, of the batch size or of the number of ranks; it is the feature the kNN monitor sees.

Why shuffled: instance ids follow the sorted paths, so id order is class order. A batch of one class is
normalized with that class's own mean and variance: its features lose what separates the class from the others
(the between-class variance the paper relies on as a "contrastive prior"), and the statistics miss that
variance too. With class-mixed batches of b images, the expected unbiased batch variance is the variance over
the dataset, so the average over the pass estimates the dataset's statistics (tests/test_initialisation.py
compares with them in float64, and shows that id-ordered batches miss them).

The "random init + BN statistics" baseline of the evaluation uses the same calibration.
"""
import torch

from data.loaders import eval_loader
from model.encoder import embed
from run.distributed import average_batchnorm_statistics


@torch.no_grad()
def calibrate_batchnorm(forward, modules, loader):
    """Every BatchNorm of `modules`: running statistics := the average of its batch statistics over one pass of
    `loader` (images, ids) through `forward`, then averaged over the ranks. Weights do not change; the modules
    are left in eval mode. Collective: every rank must call it with its shard of the same pass."""
    batchnorms = [module for parent in modules for module in parent.modules()
                  if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [module.momentum for module in batchnorms]
    for parent in modules:
        parent.train()
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: every batch of the pass weighs the same
    for images, _ in loader:
        forward(images)
    for module, momentum in zip(batchnorms, momenta):
        module.momentum = momentum
    average_batchnorm_statistics(*modules)
    for parent in modules:
        parent.eval()


@torch.no_grad()
def raw_feature_init(backbone, head, classifier, train_index, config):
    """Calibrate the random encoder's BatchNorm on shuffled training batches, then seed each classifier row with
    its image's normalized head output in eval mode (classifier.seed_), both at the run's precision. Leaves the
    encoder in train mode."""
    def forward(images):
        return embed(backbone, head, images, config.precision)
    calibrate_batchnorm(forward, (backbone, head), eval_loader(train_index, config, shuffle=True))
    for images, ids in eval_loader(train_index, config):
        classifier.seed_(forward(images), ids)
    backbone.train()
    head.train()
