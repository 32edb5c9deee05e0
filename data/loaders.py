"""The loaders of a run, built from its config for this rank of the process group (run/distributed.py): what the trainer and the evaluation
read. With `--data synthetic` they are data.synthetic's random images; otherwise DALI pipelines over an
instance index, with DALI imported on first use only (`data.pipelines`), so that `trainer.py -h`, `plan` and
synthetic runs work on machines without DALI.

Every loader delivers its batches (images and ids) on the rank's device, whatever `--dali-device` made them on:
the training step, the raw-feature init, the BatchNorm calibration, the kNN pass and the linear evaluation take
them as they come.
"""
from data.synthetic import SyntheticLoader
from run.distributed import engine

SYNTHETIC = "synthetic"  # the --data value of synthetic input
DALI_DEVICES = ("auto", "cpu", "gpu")  # the values of --dali-device (data.pipelines.DEVICES, without DALI)


def epoch_seed(seed, epoch):
    """The seed of one epoch's shuffle and augmentations: an epoch is a pure function of (seed, epoch), the
    same whether a run went straight through or was resumed before it."""
    return seed * 100_003 + epoch


def pipelines():
    import data.pipelines  # lazy: DALI (see the module docstring)
    return data.pipelines


def this_rank():
    """rank, world_size and device of this process, as the DALI loaders take them."""
    return dict(rank=engine().rank, world_size=engine().size, output_device=engine().device)


def is_synthetic(config):
    return config.data == SYNTHETIC


def synthetic_loader(config, epoch, views):
    group = engine()
    return SyntheticLoader(config.instances, batch_size=config.batch_size, image_size=config.image_size, views=views,
                           seed=epoch_seed(config.seed, epoch), device=group.device, rank=group.rank,
                           world_size=group.size, steps_per_epoch=config.steps_per_epoch)


def pretrain_loader(index, config, epoch):
    """One epoch of (views, ids) of this rank: shuffled, augmented for pretraining."""
    if is_synthetic(config):
        return synthetic_loader(config, epoch, views=config.views)
    return pipelines().pretrain_loader(
        index, batch_size=config.batch_size, image_size=config.image_size, views=config.views, **this_rank(),
        device=config.dali_device, threads=config.threads,
        seed=epoch_seed(config.seed, epoch), min_scale=config.min_scale, flip=config.flip, blur=config.blur)


def linear_train_loader(index, config, epoch, batch_size):
    """One epoch of (images, ids) of this rank for linear evaluation: random resized crop, and a random flip when
    the run flipped its pretraining views."""
    return pipelines().linear_train_loader(
        index, batch_size=batch_size, image_size=config.image_size, **this_rank(),
        device=config.dali_device, threads=config.threads, seed=epoch_seed(config.seed, epoch),
        flip=getattr(config, "flip", True))  # the configs of runs from before --flip existed lack it: they flipped


def eval_loader(index, config, batch_size=None, shuffle=False):
    """One deterministic pass (resize + center crop) over this rank's share of `index`, in id order; shuffle:
    in one permutation of the whole dataset shared by the ranks (drawn from the run's seed), so that every batch
    mixes the classes, as BatchNorm statistics need (the index is sorted by path, so id order is class order)."""
    if is_synthetic(config):
        return synthetic_loader(config, epoch=-1, views=None)
    return pipelines().eval_loader(
        index, batch_size=batch_size or config.batch_size, image_size=config.image_size, **this_rank(),
        device=config.dali_device, threads=config.threads, crop_ratio=config.crop_ratio,
        shuffle_seed=config.seed if shuffle else None)
