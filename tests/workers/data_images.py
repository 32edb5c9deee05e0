"""Tiny image folders for the data tests: blocky random RGB images of varied sizes, as JPEG or PNG files."""
import io

import numpy as np
from PIL import Image


def image_bytes(generator, format="JPEG", height=None, width=None):
    """An encoded image of random 4x4-pixel colour blocks, 16..40 pixels a side unless given."""
    height = height or 4 * int(generator.integers(4, 11))
    width = width or 4 * int(generator.integers(4, 11))
    blocks = generator.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))  # [H, W, 3]
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format=format)
    return encoded.getvalue()


def write_images(folder, count, *, classes=0, seed=0, order=None):
    """Write `count` JPEGs into `folder` (into `class<k>/` sub-folders when classes > 0); return their paths.

    `order` is a permutation of range(count) giving the creation order, to check ids do not depend on it.
    """
    generator = np.random.default_rng(seed)
    contents = [image_bytes(generator) for _ in range(count)]
    paths = [folder / (f"class{number % classes}/" if classes else "") / f"image{number:03d}.jpg"
             for number in range(count)]
    for number in order if order is not None else range(count):
        paths[number].parent.mkdir(parents=True, exist_ok=True)
        paths[number].write_bytes(contents[number])
    return paths
