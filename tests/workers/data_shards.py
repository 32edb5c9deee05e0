"""Tiny WebDataset shards for the data tests, written with Python's tarfile alone, as a third-party tool would.

Sample number n is a flat-colour PNG whose red and green channels spell n (n = R + 256 G) and whose label is
n % classes: a flat image stays exactly that colour through decoding, resizing and cropping, so a test reads
from an evaluation batch's pixels which sample each row holds, and checks it against the row's id.
"""
import io
import tarfile

import numpy as np
import torch
from PIL import Image

from data.augment import IMAGENET_MEAN, IMAGENET_STD

BLUE = 100


def color_of(number):
    return number % 256, number // 256, BLUE


def flat_png(number, side=8):
    encoded = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), color_of(number), dtype=np.uint8)).save(encoded, format="PNG")
    return encoded.getvalue()


def numbers_shown(images):
    """The sample number each evaluation view [b, 3, S, S] (ImageNet-standardized) shows, from its centre."""
    centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2]  # [b, 3]
    pixels = (centre * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).round().long()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def write_tar(path, samples):
    """A tar of samples [(key, {extension: bytes})], members in the given order, in tarfile's default format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, content in members.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(content)
                archive.addfile(member, io.BytesIO(content))
    return path


def write_numbered_shards(folder, sizes, classes=3):
    """Shards `000.tar`, `001.tar`, ... holding `sizes[k]` samples each, numbered on from 0 in shard-name order
    and written in the reverse order (ids must not follow creation order); keys are not in number order within
    a shard either. Returns the number of samples."""
    starts = np.cumsum([0, *sizes])
    for shard in reversed(range(len(sizes))):
        numbers = range(starts[shard], starts[shard + 1])
        samples = [(f"{'zyxwvutsrqponmlkjihgfedcba'[position % 26]}{number:04d}",
                    {"png": flat_png(number), "cls": str(number % classes).encode()})
                   for position, number in enumerate(numbers)]
        write_tar(folder / f"{shard:03d}.tar", samples)
    return int(starts[-1])
