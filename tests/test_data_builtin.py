"""Built-in MNIST-5k: stratified 4000/1000 split, balanced classes, 32x32 RGB JPEGs that DALI decodes, race-free."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data.builtin import builtin_dataset, load_mnist_5k
from data.index import build_index
from data.loaders import eval_loader
from tests.conftest import ROOT
from tests.workers.loader_config import ONE_RANK, loader_config


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return builtin_dataset(tmp_path_factory.mktemp("cache"))


def quiet(message):
    pass


def test_mnist_5k_is_read_from_the_wheel():
    images, digits = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(digits).tolist() == [500] * 10


@pytest.mark.parametrize("split, per_digit", [("train", 400), ("val", 100)])
def test_split_is_stratified_and_balanced(dataset_root, split, per_digit):
    index = build_index(dataset_root / split, out_dir=dataset_root.parent / "indexes", strict=True, log=quiet)
    assert index.class_names == [str(digit) for digit in range(10)]
    assert np.bincount(index.labels).tolist() == [per_digit] * 10


def test_train_and_val_are_disjoint_rows(dataset_root):
    rows = {split: {path.name for path in (dataset_root / split).glob("*/*.jpg")} for split in ("train", "val")}
    assert len(rows["train"]) == 4000 and len(rows["val"]) == 1000 and not rows["train"] & rows["val"]


def test_images_are_32px_rgb_jpeg_with_the_digit_in_the_middle(dataset_root):
    with Image.open(next((dataset_root / "val" / "7").iterdir())) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
        pixels = np.asarray(image)
    assert pixels[:2].max() < 16 and pixels[8:24, 8:24].max() > 128  # the 2-pixel zero padding and a stroke


def test_dali_decodes_every_file(dataset_root):
    index = build_index(dataset_root / "val", out_dir=dataset_root.parent / "indexes", log=quiet)
    loader = eval_loader(index, loader_config(batch_size=256, image_size=32, crop_ratio=1.0), group=ONE_RANK)
    ids = []
    for images, batch_ids in loader:
        assert images.shape[1:] == (3, 32, 32) and images.std() > 0.5
        ids += batch_ids.tolist()
    assert sorted(ids) == list(range(1000))


def test_second_call_reuses_the_cache(dataset_root):
    stamp = (dataset_root / "val").stat().st_mtime_ns
    assert builtin_dataset(dataset_root.parent) == dataset_root
    assert (dataset_root / "val").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_simultaneous_writers_agree(tmp_path):
    write = f"from data.builtin import builtin_dataset; print(builtin_dataset({str(tmp_path)!r}))"
    writers = [subprocess.Popen([sys.executable, "-c", write], cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    roots = {writer.communicate(timeout=120)[0].strip() for writer in writers}
    assert all(writer.returncode == 0 for writer in writers)
    assert len(roots) == 1 and len(list((tmp_path / "mnist5k-32px-v1").glob("*/*/*.jpg"))) == 5000
    assert [path.name for path in tmp_path.iterdir()] == ["mnist5k-32px-v1"]  # no staging copy left behind
