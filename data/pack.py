"""`trainer.py pack`: an image folder written as WebDataset tar shards, its samples in a seeded random order
across the shards.

Why the order. DALI's webdataset reader shuffles the order of the shards and, within a buffer of samples read
near one another, the samples (data/shard_reader.py), never the dataset as a whole. An image folder's index is
sorted by class, so shards cut from it in order would each hold one class or two, and so would the batches, and
a one-class batch normalizes away in BatchNorm what sets its class apart. So the N images of a split are dealt
out in one permutation pi drawn from `seed`: shard k holds pi[k n], ..., pi[(k + 1) n - 1] for n =
samples_per_shard (the last shard the rest), which makes every shard a uniform random sample of the images,
and the reader's shard and buffer shuffles then mix batches about as well as a shuffle of the whole folder.

Samples. Position p of the permutation is the sample with key p, zero-padded (at least KEY_DIGITS digits) so
that member order and key order agree; its members, in this order:
- `<key>.<ext>`: the image's bytes unchanged, `ext` named from its content (jpg, png, webp, ...);
- `<key>.cls`: its class folder's position among the split's sorted class folders, as text (not for a flat
  folder), the label the folder's own index gives it (data/index.py);
- `<key>.source.txt`: its path relative to the split folder, kept by the run's index (data/shards.py), so that
  the ids of a run on the shards map back to the folder's files.
Ids of a run on the shards therefore follow the permutation: id p is the image at position p.

Layout. A folder with train/ (and val/) gives SHARDS/train/ (and SHARDS/val/), a folder of images or of class
folders gives shards in SHARDS itself; val/ must have the class folders of train/, or its labels would number
other classes. Shards are named `NNNNN.tar` (more digits when there are more shards, so that names sort in
order) and written reproducibly: plain ustar members in order, modification time 0, no owner, so the same
folder and seed give the same bytes. Bad files are left out, counted and named as by the index (`strict`
makes them an error). Each shard is written under a temporary name and renamed; SHARDS must be new or empty,
so that no shard of another packing survives among the new ones.
"""
import io
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from data.formats import HEAD_BYTES, image_format
from data.index import scan_folder
from data.run_index import dataset_folders, dataset_root
from data.shards import LABEL_EXTENSION, SOURCE_EXTENSION
from run.errors import UsageError
from run.files import private_temporary

SHARD_NAME_DIGITS = 5
KEY_DIGITS = 6
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WebP": "webp", "BMP": "bmp", "TIFF": "tiff", "PNM": "pnm",
                     "JPEG 2000": "jp2"}


def pack(data, to, *, samples_per_shard, seed=0, strict=False, log=print):
    """Write the splits of `data` (the built-in dataset when None) as shards under `to`; return {split folder:
    [shard paths]}. What is wrong with the folder or the flags is a UsageError."""
    try:
        return pack_splits(data, to, samples_per_shard, seed, strict, log)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise UsageError(str(error)) from error


def pack_splits(data, to, samples_per_shard, seed, strict, log):
    if not (isinstance(samples_per_shard, int) and samples_per_shard > 0):
        raise ValueError(f"--samples-per-shard must be a positive integer, got {samples_per_shard!r}")
    to = Path(to).expanduser()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ValueError(f"--to {to} exists and is not an empty folder: pack writes into a new one")
    root = dataset_root(data)
    train, val = dataset_folders(data)
    train_files, train_classes = scan_folder(train, strict=strict, log=log)[1:3]
    splits = [(train, train_files, train_classes)]
    if val is not None:
        val_files, val_classes = scan_folder(val, strict=strict, log=log)[1:3]
        if val_classes != train_classes:
            raise ValueError(f"the class folders of {val} differ from those of {train}: their .cls would number "
                             f"other classes")
        splits.append((val, val_files, val_classes))
    written = {}
    for folder, files, class_names in splits:
        target = to / folder.resolve().relative_to(root.resolve())
        written[folder] = pack_folder(folder, files, class_names, target, samples_per_shard, seed)
        log(f"packed {len(files)} images of {folder} into {len(written[folder])} shards of up to "
            f"{samples_per_shard} in {target}")
    return written


def pack_folder(folder, files, class_names, to, samples_per_shard, seed):
    """Write the images `files` (relative to `folder`) as shards in `to`, in the permutation of `seed`."""
    order = np.random.default_rng(seed).permutation(len(files))
    num_shards = math.ceil(len(files) / samples_per_shard)
    shard_digits = max(SHARD_NAME_DIGITS, len(str(num_shards - 1)))
    key_digits = max(KEY_DIGITS, len(str(len(files) - 1)))
    class_ids = {name: label for label, name in enumerate(class_names)}
    to.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        positions = range(shard * samples_per_shard, min(len(files), (shard + 1) * samples_per_shard))
        samples = [(f"{position:0{key_digits}d}", files[order[position]]) for position in positions]
        paths.append(write_shard(to / f"{shard:0{shard_digits}d}.tar", folder, samples, class_ids))
    return paths


def write_shard(path, folder, samples, class_ids):
    """One shard of (key, relative image path) samples, written under a temporary name and renamed."""
    temporary = private_temporary(path)
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, name in samples:
            image = (folder / name).read_bytes()
            add_member(archive, f"{key}.{FORMAT_EXTENSIONS[image_format(image[:HEAD_BYTES])]}", image)
            if class_ids:
                add_member(archive, f"{key}.{LABEL_EXTENSION}", str(class_ids[name.partition('/')[0]]).encode())
            add_member(archive, f"{key}.{SOURCE_EXTENSION}", name.encode())
    os.replace(temporary, path)
    return path


def add_member(archive, name, content):
    """A regular-file member with fixed metadata (reproducible bytes)."""
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = len(content), 0o644, 0
    archive.addfile(member, io.BytesIO(content))
