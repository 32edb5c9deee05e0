"""The loaders: one function per kind of pass over the data, each built from the run's config for one rank of the
process group (run/distributed.py). With `--data synthetic` they are data.synthetic's random images; otherwise
DALI pipelines over an instance index (data/pipelines.py says how they shard, seed, decode and free memory).

The shape: a loader takes the run's config, as the trainer, the raw-feature init and the evaluations hold it, so
that every caller reads `pretrain_loader(index, config, epoch)` and each setting goes from its flag to its
pipeline in one place; settings.py has judged those settings once, where they enter, so nothing here judges
them again. DALI itself (the pipeline graphs and the loader class around them) lives in data/pipelines.py,
which only the functions below import, when they build a DALI loader: `trainer.py -h`, `plan` and synthetic
runs work on machines without DALI.

Every loader delivers its batches (images and ids) on the rank's device, whatever `--dali-device` made them on:
the training step, the raw-feature init, the BatchNorm calibration, the kNN pass and the linear evaluation take
them as they come. `group` is the process group whose ranks share an epoch (its rank, size and device): the
started engine unless given, as a test or a benchmark gives a rank of its own.
"""
from data.synthetic import SyntheticLoader
from run.distributed import engine

SYNTHETIC = "synthetic"  # the --data value of synthetic input
DALI_DEVICES = ("auto", "cpu", "gpu")  # the values of --dali-device; auto = gpu where torch sees CUDA


def epoch_seed(seed, epoch):
    """The seed of one epoch's shuffle and augmentations: an epoch is a pure function of (seed, epoch), the
    same whether a run went straight through or was resumed before it."""
    return seed * 100_003 + epoch


def is_synthetic(config):
    return config.data == SYNTHETIC


def pretrain_loader(index, config, epoch, group=None):
    """One epoch of (views: config.views x [b, 3, S, S] float32, ids: [b] int64) of this rank, shuffled: each view
    an independent MoCo v2 augmentation of one decode (data/augment.py: a random resized crop of at least
    config.min_scale of the area, colour jitter, grey, a blur if config.blur, a flip if config.flip)."""
    if is_synthetic(config):
        return synthetic_loader(config, epoch, config.views, group)
    from data.pipelines import InstanceLoader, pretrain_pipeline  # DALI: see the module docstring
    return InstanceLoader(
        pretrain_pipeline, [f"view{number}" for number in range(config.views)], index, shuffle=True,
        group_views=True, seed=epoch_seed(config.seed, epoch), batch_size=config.batch_size,
        **dali_settings(config, group), views=config.views, min_scale=config.min_scale, flip=config.flip,
        blur=config.blur)


def linear_train_loader(index, config, epoch, batch_size, group=None):
    """One epoch of (images [b, 3, S, S] float32, ids [b] int64) of this rank for linear evaluation, shuffled:
    random resized crop, and a random flip when the run flipped its pretraining views."""
    from data.pipelines import InstanceLoader, linear_train_pipeline  # DALI: see the module docstring
    return InstanceLoader(
        linear_train_pipeline, ["images"], index, shuffle=True, seed=epoch_seed(config.seed, epoch),
        batch_size=batch_size, **dali_settings(config, group),
        flip=getattr(config, "flip", True))  # the configs of runs from before --flip existed lack it: they flipped


def eval_loader(index, config, batch_size=None, shuffle=False, group=None):
    """One deterministic pass of (images [b, 3, S, S] float32, ids [b] int64) per `for` (resize + center crop of
    config.crop_ratio) over this rank's share of `index`, in id order; shuffle: in one permutation of the whole
    dataset shared by the ranks (drawn from the run's seed), so that every batch mixes the classes, as BatchNorm
    statistics need (the index is sorted by path, so id order is class order)."""
    if is_synthetic(config):
        return synthetic_loader(config, -1, None, group)
    from data.pipelines import InstanceLoader, eval_pipeline  # DALI: see the module docstring
    return InstanceLoader(
        eval_pipeline, ["images"], index, shuffle=shuffle, seed=config.seed, batch_size=batch_size or config.batch_size,
        **dali_settings(config, group), crop_ratio=config.crop_ratio)


def synthetic_loader(config, epoch, views, group):
    """Random images (data/synthetic.py) of this rank: views x [b, 3, S, S] per batch, or [b, 3, S, S] when views is
    None (the evaluation pass)."""
    group = group or engine()
    return SyntheticLoader(config.instances, batch_size=config.batch_size, image_size=config.image_size, views=views,
                           seed=epoch_seed(config.seed, epoch), device=group.device, rank=group.rank,
                           world_size=group.size, steps_per_epoch=config.steps_per_epoch)


def dali_settings(config, group):
    """What every DALI loader of a run takes from its config and its rank of `group` (None: the started engine)."""
    group = group or engine()
    return dict(image_size=config.image_size, device=config.dali_device, threads=config.threads, rank=group.rank,
                world_size=group.size, output_device=group.device)
