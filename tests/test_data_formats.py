"""Every image format DALI decodes, in folders and in shards (data/formats.py): kept by the index and decoded to
the pixels PIL reads; cut short by a single byte, or by half, each is excluded with its format's reason; other
formats are excluded by name."""
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.formats import image_problem
from data.index import build_index
from data.loaders import eval_loader
from data.pack import pack
from data.shards import build_shard_index
from tests.workers.data_shards import write_tar
from tests.workers.loader_config import ONE_RANK, loader_config

SIDE = 24
# name: (PIL format, save options, PIL mode, lossy); PIL writes PPM as P4, P5 or P6 after the mode
FORMATS = {
    "jpeg": ("JPEG", {}, "RGB", True),
    "png": ("PNG", {}, "RGB", False),
    "webp-lossless": ("WEBP", {"lossless": True}, "RGB", False),
    "webp-lossy": ("WEBP", {}, "RGB", True),
    "bmp": ("BMP", {}, "RGB", False),
    "tiff": ("TIFF", {}, "RGB", False),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"}, "RGB", False),
    "ppm": ("PPM", {}, "RGB", False),
    "pgm": ("PPM", {}, "L", False),
    "pbm": ("PPM", {}, "1", False),
    "jp2": ("JPEG2000", {}, "RGB", False),
    "j2k": ("JPEG2000", {"no_jp2": True}, "RGB", False),
}
LOSSY_TOLERANCE = 2  # levels of 255: decoders of lossy formats may round differently
# What the index says of each format cut short
REASONS = {
    "jpeg": r"truncated JPEG \(no end-of-image marker\)",
    "png": r"truncated PNG \(no IEND chunk\)",
    "webp-lossless": r"truncated WebP \(the header states \d+ bytes, \d+ present\)",
    "webp-lossy": r"truncated WebP \(the header states \d+ bytes, \d+ present\)",
    "bmp": r"truncated BMP \(the header states \d+ bytes, \d+ present\)",
    "tiff": r"truncated TIFF \(its image directory states \d+ bytes, \d+ present\)",
    "tiff-lzw": r"truncated TIFF \(its image directory (states \d+ bytes, \d+ present|lies past the end)\)",
    "ppm": r"truncated PNM \(the header states \d+ bytes, \d+ present\)",
    "pgm": r"truncated PNM \(the header states \d+ bytes, \d+ present\)",
    "pbm": r"truncated PNM \(the header states \d+ bytes, \d+ present\)",
    "jp2": r"truncated JPEG 2000 \(no end-of-codestream marker\)",
    "j2k": r"truncated JPEG 2000 \(no end-of-codestream marker\)",
}


def encoded(name, seed=0):
    """A SIDE x SIDE image of 4 x 4 colour blocks in format `name`."""
    pil_format, options, mode, _ = FORMATS[name]
    blocks = np.random.default_rng(seed).integers(0, 256, (SIDE // 4, SIDE // 4, 3), dtype=np.uint8)
    image = Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))).convert(mode)
    data = io.BytesIO()
    image.save(data, format=pil_format, **options)
    return data.getvalue()


def ascii_ppm():
    """P3: the text variant, 2 x 2 pixels, which PIL does not write."""
    return b"P3\n# two by two\n2 2\n255\n255 0 0  0 255 0\n0 0 255  255 255 255\n"


def quiet(message):
    pass


@pytest.fixture(scope="module")
def format_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    for number, name in enumerate(FORMATS):
        (folder / f"{number:02d}-{name}.img").write_bytes(encoded(name, seed=number))  # content decides, not names
    (folder / "ascii.ppm").write_bytes(ascii_ppm())
    return folder


def pixels_seen(index, image_size):
    """{instance: [S, S, 3] uint8 as the evaluation loader decodes it}, crops of the whole image."""
    seen = {}
    for images, ids in eval_loader(index, loader_config(image_size=image_size, crop_ratio=1.0), group=ONE_RANK):
        pixels = images.permute(0, 2, 3, 1) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
        seen.update(zip(ids.tolist(), pixels.round().to(torch.uint8).numpy()))
    return seen


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_every_format_dali_decodes_is_kept_and_decodes_to_the_pixels_pil_reads(format_folder, layout, tmp_path):
    if layout == "folder":
        index = build_index(format_folder, out_dir=tmp_path, strict=True, log=quiet)
        files = index.files
    else:
        pack(format_folder, tmp_path / "shards", samples_per_shard=5, strict=True, log=quiet)
        index = build_shard_index(tmp_path / "shards", index_dir=tmp_path / "index", strict=True, log=quiet)
        files = index.sources
    assert sorted(files) == sorted(path.name for path in format_folder.iterdir())
    seen = pixels_seen(index, SIDE)
    for instance, name in enumerate(files):
        if name == "ascii.ppm":
            continue  # 2 x 2 pixels: checked at its own size below
        expected = np.asarray(Image.open(format_folder / name).convert("RGB"), dtype=np.int64)
        tolerance = LOSSY_TOLERANCE if FORMATS[name[3:-4]][3] else 0
        assert np.abs(seen[instance].astype(np.int64) - expected).max() <= tolerance, name
    assert pixels_seen(index, 2)[files.index("ascii.ppm")].reshape(4, 3).tolist() == [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]


@pytest.mark.parametrize("cut", ["one byte", "half"])
@pytest.mark.parametrize("name", FORMATS)
def test_an_image_cut_short_is_excluded_with_its_formats_reason(name, cut, tmp_path):
    whole = encoded(name)
    data = whole[:-1] if cut == "one byte" else whole[: len(whole) // 2]
    assert image_problem(io.BytesIO(whole), 0, len(whole)) is None
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "whole.img").write_bytes(whole)
    (tmp_path / "folder" / "cut.img").write_bytes(data)
    messages = []
    index = build_index(tmp_path / "folder", out_dir=tmp_path / "out", log=messages.append)
    assert index.files == ["whole.img"]
    assert re.search(rf"cut\.img \({REASONS[name]}\)", messages[0]), messages[0]
    write_tar(tmp_path / "shards" / "0.tar", [("a", {"img.png": whole}), ("b", {"img.png": data})])
    messages = []
    index = build_shard_index(tmp_path / "shards", index_dir=tmp_path / "index", log=messages.append)
    assert index.keys == ["a"]
    assert re.search(rf"0\.tar/b \(\.img\.png: {REASONS[name]}\)", messages[0]), messages[0]


@pytest.mark.parametrize("content, reason", [
    (b"GIF89a\x08\x00\x08\x00", "not an image DALI decodes (starts with 47 49 46 38)"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "not an image DALI decodes (starts with 52 49 46 46)"),  # RIFF, not WebP
    (b"BM, a note that starts like a bitmap", "not an image DALI decodes (starts with 42 4d 2c 20)"),
    (b"II+\x00\x08\x00\x00\x00", "not an image DALI decodes (starts with 49 49 2b 00)"),  # BigTIFF
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image DALI decodes (starts with 3c 73 76 67)"),
])
def test_other_formats_are_excluded_by_name(content, reason):
    assert image_problem(io.BytesIO(content), 0, len(content)) == reason
