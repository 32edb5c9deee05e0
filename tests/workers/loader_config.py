"""A run's config as the loaders read it (data/loaders.py), for the data tests and workers: the settings a test
varies given, the others small and fixed (DALI on the CPU; the augmentations and crop of trainer.py's dataset
defaults); and a rank of a process group of the test's own making, for tests and workers that start no engine."""
from types import SimpleNamespace

import torch

LOADER_SETTINGS = dict(data=None, batch_size=4, image_size=16, views=2, min_scale=0.2, flip=True, blur=True,
                       crop_ratio=0.875, dali_device="cpu", threads=2, seed=0)


def loader_config(**settings):
    return SimpleNamespace(**{**LOADER_SETTINGS, **settings})


def rank_of(rank, size):
    """Rank `rank` of a process group of `size` ranks on the CPU, as data/loaders.py reads an engine."""
    return SimpleNamespace(rank=rank, size=size, device=torch.device("cpu"))


ONE_RANK = rank_of(0, 1)
