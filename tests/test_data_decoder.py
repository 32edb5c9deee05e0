"""The GPU decoder's memory rule (data/decoder.py), on CPU: DALI's defaults for thumbnails and for every
evaluation loader, the ImageNet example's pools only for training on photo-sized data; the header sample."""
import numpy as np
import pytest
from PIL import Image

from data.decoder import (IMAGENET_EXAMPLE_PADDING, LARGE_IMAGE_SIDE, SAMPLED_IMAGES, decoder_arguments,
                          mixed_decoder_arguments, sample_image_sizes)
from data.index import build_index

PHOTOS = [(500, 375), (333, 500), (500, 334)]  # (width, height), ImageNet's common shapes
THUMBNAILS = [(32, 32), (96, 96), (LARGE_IMAGE_SIDE, LARGE_IMAGE_SIDE)]
# No padding or hint given: DALI's 16 MiB / 8 MiB, no HW preallocation; chroma upsampled as on the CPU.
DALI_DEFAULTS = dict(device="mixed", jpeg_fancy_upsampling=True)


def test_training_on_photos_gets_the_imagenet_example_pools_and_the_largest_sampled_size_as_hints():
    assert mixed_decoder_arguments(PHOTOS, training=True) == dict(
        DALI_DEFAULTS, **IMAGENET_EXAMPLE_PADDING, preallocate_width_hint=500, preallocate_height_hint=500)


@pytest.mark.parametrize("sizes", [THUMBNAILS, [], [(LARGE_IMAGE_SIDE, 100)]])
def test_thumbnails_get_dali_defaults(sizes):
    assert mixed_decoder_arguments(sizes, training=True) == DALI_DEFAULTS


def test_one_side_past_the_limit_makes_photos():
    assert "device_memory_padding" in mixed_decoder_arguments([(32, 32), (40, LARGE_IMAGE_SIDE + 1)], training=True)


@pytest.mark.parametrize("sizes", [PHOTOS, THUMBNAILS])
def test_evaluation_loaders_never_preallocate_large_pools(sizes):
    assert mixed_decoder_arguments(sizes, training=False) == DALI_DEFAULTS


def write_sized_images(folder, widths, height=8):
    """One grey PNG per width, named so that id order is width order."""
    for number, width in enumerate(widths):
        Image.fromarray(np.full((height, width), 128, np.uint8)).save(folder / f"image{number:04d}.png")
    return build_index(folder, out_dir=folder / "out", log=lambda message: None)


def test_the_sample_reads_every_image_of_a_small_index(tmp_path):
    widths = [300, 17, 64, 5]
    assert sorted(sample_image_sizes(write_sized_images(tmp_path, widths))) == sorted((w, 8) for w in widths)


def test_the_sample_spreads_over_all_ids_of_a_large_index(tmp_path):
    index = write_sized_images(tmp_path, [10 + number for number in range(200)])  # width 10 + id
    sampled_ids = [width - 10 for width, _ in sample_image_sizes(index)]
    assert sampled_ids == list(range(0, 200, 200 // SAMPLED_IMAGES))[:SAMPLED_IMAGES]  # 0, 3, ..., 189


def test_an_unreadable_header_is_left_out_of_the_sample(tmp_path):
    index = write_sized_images(tmp_path, [20, 30])
    (index.root / index.files[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64 + b"IEND")  # damaged after indexing
    assert sample_image_sizes(index) == [(30, 8)]


def test_the_cpu_decoder_reads_no_headers(tmp_path):
    index = write_sized_images(tmp_path, [20])
    (index.root / index.files[0]).unlink()
    assert decoder_arguments(index, "cpu", training=True) == dict(device="cpu")
