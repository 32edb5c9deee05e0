"""Instance index of WebDataset tar shards: a folder of `.tar` files -> a persisted, stable mapping from instance
id 0..N-1 to a sample (shard, key), with the DALI index files through which fn.readers.webdataset reads exactly
the samples kept, each with its id.

Layout (WebDataset's). Each shard is a plain POSIX tar; a sample is a run of consecutive members that share a
key, the member name up to the first dot of its last path component (`00000.tar` holding `n01440764_10026.jpg`,
`n01440764_10026.cls`), which is how DALI's reader and the webdataset package group them. A sample's image is
its first member whose extension (after the last dot) names a format DALI decodes (data/formats.py); its label,
for kNN and linear evaluation, is its `cls` member, an integer as text (-1 without one); its `source.txt` member,
written by `trainer.py pack` (data/pack.py), names the file it was packed from. Members whose last path
component starts with "." are ignored, as DALI ignores them. Only plain `.tar` files are shards: DALI reads no
compressed tar, so `.tar.gz`, `.tgz`, ... are named and left out; other files are ignored (`wds2idx` index
files, notes).

Ids. Shards are sorted by name (code point, independent of locale and creation order) and samples keep their
order inside a shard; a sample's position in that order is its instance id: shard k holds ids
[S_k, S_k + n_k), S_k = n_0 + ... + n_{k-1}, with n_k the samples kept from it. Labels are class numbers, so
`class_names` is "0" ... "C-1" for C = the largest label + 1.

Bad input is excluded when the index is built, counted and named, and `strict=True` makes it an error, as for
folders: a sample without an image member, whose image is empty, not an image DALI decodes or cut short
(data/formats.py), or whose `cls` is not a non-negative integer. A shard that is not a tar adds no samples; a
damaged one (cut short, an unreadable member header) keeps the samples before the damage but the last of them,
which may have lost members to it; the report names the shard and what is wrong. Tar headers are read with
Python's `tarfile`, which stops without a word at a bad header after the first one and does not check that a
member's data is there: so a member must end inside the file, and the archive must end with its zero block.

Persistence, in the run directory or the cache, never beside the shards (the data folder may be read-only).
`<dir>/index.json` names the root, each shard with its size in bytes (checked on load: a rewritten shard would
leave the offsets pointing elsewhere) and its number of samples kept, and two derived files named by the hash
of their content: `samples-<hash>.tsv`, one line per instance in id order (image offset, image size, label, key,
source), and `dali-<hash>/`, one DALI index file per shard with samples (`v1.2 <n>`, then per sample
`img <offset> <size> <id>`): only the samples kept, their image under the one component name IMAGE_COMPONENT
whatever its format, and the instance id, zero-padded to ID_DIGITS, as the component's file name, which DALI
hands back as the sample's source info (data/shard_reader.py). The derived files are written first, the DALI
index folder renamed into place whole, then index.json replaced atomically, so concurrent builders never
leave a torn index.
"""
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.formats import IMAGE_EXTENSIONS, image_problem
from data.index import describe_excluded, report_excluded, saved_description, write_description
from run.files import private_temporary, write_text_atomically

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar.zst")
LABEL_EXTENSION = "cls"
SOURCE_EXTENSION = "source.txt"
IMAGE_COMPONENT = "img"  # the one extension the DALI index files give every kept image
ID_DIGITS = 12  # instance ids below 10^12, zero-padded so that the pipeline reads them at a fixed place
LABEL_BYTES = 32  # a cls member longer than this is not a class number
BLOCK = tarfile.BLOCKSIZE
UNUSABLE_IN_INDEX = ("\t", "\n", "\r")  # the samples file is tab-separated lines


@dataclass
class ShardIndex:
    """The ids of one folder of shards; sample i is `keys[i]` of the shard holding id i, its image `sizes[i]`
    bytes at `offsets[i]`, `labels[i]` its class (-1 without), `sources[i]` the file it was packed from ('')."""

    layout = "shards"  # what index.json says, beside data/index.py's "folder"
    root: Path  # absolute folder of the shards
    shards: list  # [K] shard file names, sorted
    shard_bytes: list  # [K] size of each shard when indexed
    counts: list  # [K] samples kept per shard
    keys: list  # [N]
    offsets: np.ndarray  # [N] int64
    sizes: np.ndarray  # [N] int64
    labels: np.ndarray  # [N] int64
    sources: list  # [N]
    num_excluded: int = 0
    path: Path = None  # the index.json this index was saved to or loaded from
    dali_index: Path = None  # the folder of DALI index files beside it

    @property
    def num_instances(self):
        return len(self.keys)

    @property
    def class_names(self):
        """'0' ... 'C-1' when every sample has a label, else [] (as a flat folder)."""
        if not self.num_instances or (self.labels < 0).any():
            return []
        return [str(label) for label in range(int(self.labels.max()) + 1)]

    def shard_of(self, instance):
        """Position in `shards` of the shard holding instance `instance`."""
        return int(np.searchsorted(np.cumsum(self.counts), instance, side="right"))

    def name(self, instance):
        """'<shard>/<key>', as reports name a sample."""
        return f"{self.shards[self.shard_of(instance)]}/{self.keys[instance]}"

    def open_image(self, instance):
        """The encoded image of instance `instance` as an open binary file."""
        with open(self.root / self.shards[self.shard_of(instance)], "rb") as shard:
            shard.seek(int(self.offsets[instance]))
            return io.BytesIO(shard.read(int(self.sizes[instance])))

    def dali_files(self):
        """(shard paths, DALI index paths) of the shards with samples, in id order: fn.readers.webdataset's
        `paths` and `index_paths`."""
        kept = [number for number, count in enumerate(self.counts) if count]
        return ([str(self.root / self.shards[number]) for number in kept],
                [str(self.dali_index / dali_index_name(number)) for number in kept])

    def save(self, directory):
        """Write `directory/index.json`, its samples file and DALI index files; return the index.json path."""
        directory = Path(directory)
        samples = "".join(f"{offset}\t{size}\t{label}\t{key}\t{source}\n" for offset, size, label, key, source in
                          zip(self.offsets.tolist(), self.sizes.tolist(), self.labels.tolist(), self.keys,
                              self.sources))
        digest = hashlib.sha256((samples + json.dumps([self.shards, self.counts])).encode()).hexdigest()[:16]
        samples_file, dali_index = directory / f"samples-{digest}.tsv", directory / f"dali-{digest}"
        if not samples_file.exists():
            write_text_atomically(samples_file, samples)
        if not dali_index.exists():
            self.write_dali_index(dali_index)
        shards = [{"name": name, "bytes": size, "samples": count}
                  for name, size, count in zip(self.shards, self.shard_bytes, self.counts)]
        self.path = write_description(self, directory, shards=shards, samples=samples_file.name,
                                      dali_index=dali_index.name)
        self.dali_index = dali_index
        return self.path

    def write_dali_index(self, folder):
        """One DALI index file per shard with samples, written in a private folder renamed into place."""
        staging = private_temporary(folder)
        staging.mkdir(parents=True)
        start = 0
        for number, count in enumerate(self.counts):
            if count:
                rows = zip(range(start, start + count), self.offsets[start:start + count].tolist(),
                           self.sizes[start:start + count].tolist())
                lines = "".join(f"{IMAGE_COMPONENT} {offset} {size} {instance:0{ID_DIGITS}d}\n"
                                for instance, offset, size in rows)
                (staging / dali_index_name(number)).write_text(f"v1.2 {count}\n{lines}")
            start += count
        try:
            os.rename(staging, folder)
        except OSError:  # another process renamed the same content into place first
            shutil.rmtree(staging)
            if not folder.is_dir():
                raise

    @classmethod
    def load(cls, path):
        """Reload a saved index (its index.json or the folder holding it); the shards must still be there, with
        the sizes they had."""
        path, description = saved_description(path, cls.layout)
        root = Path(description["root"])
        if not root.is_dir():
            raise FileNotFoundError(f"shard folder {root} of the index {path} does not exist")
        shards = description["shards"]
        for shard in shards:
            where = root / shard["name"]
            if not where.is_file():
                raise FileNotFoundError(f"shard {where} of the index {path} does not exist")
            if where.stat().st_size != shard["bytes"]:
                raise ValueError(f"shard {where} changed since it was indexed ({shard['bytes']} bytes then, "
                                 f"{where.stat().st_size} now): index it again in a new run directory")
        rows = [line.split("\t") for line in (path.parent / description["samples"]).read_text().splitlines()]
        if len(rows) != description["num_instances"]:
            raise ValueError(f"{description['samples']} has {len(rows)} lines, {path} says "
                             f"{description['num_instances']}")
        columns = list(zip(*rows)) or [()] * 5
        return cls(root, [shard["name"] for shard in shards], [shard["bytes"] for shard in shards],
                   [shard["samples"] for shard in shards], list(columns[3]),
                   np.array(columns[0], dtype=np.int64), np.array(columns[1], dtype=np.int64),
                   np.array(columns[2], dtype=np.int64), list(columns[4]), description["num_excluded"], path,
                   path.parent / description["dali_index"])


def dali_index_name(shard_number):
    return f"{shard_number:06d}.idx"


def is_shard_folder(folder):
    """True when `folder` holds `.tar` files and no sub-folders: then --data means shards, not images."""
    with os.scandir(folder) as scan:
        entries = [entry for entry in scan if not entry.name.startswith(".")]
    return (not any(entry.is_dir() for entry in entries)
            and any(entry.name.endswith(SHARD_SUFFIX) for entry in entries))


def build_shard_index(folder, *, index_dir, strict=False, log=print):
    """Index the shards in `folder`, save the index in `index_dir` and return it. Every call rescans the shards:
    the saved index records what was there."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {folder} does not exist")
    started = time.perf_counter()
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_file() and not entry.name.startswith("."))
    shards = [name for name in names if name.endswith(SHARD_SUFFIX)]
    compressed = [name for name in names if name.endswith(COMPRESSED_SUFFIXES)]
    damaged = [(name, "compressed: DALI reads plain tar only") for name in compressed]
    excluded, samples, counts, shard_bytes = [], [], [], []
    for name in shards:
        kept, bad, damage = scan_shard(root / name)
        samples += kept
        counts.append(len(kept))
        shard_bytes.append((root / name).stat().st_size)
        excluded += [(f"{name}/{key}", reason) for key, reason in bad]
        if damage:
            damaged.append((name, damage))
    damaged.sort()
    if not samples:
        problems = damaged + excluded
        found = f": {describe_excluded(problems)}" if problems else ""
        raise ValueError(f"no samples with an image DALI decodes in the shards of {root}{found}")
    if damaged:
        report_excluded(f"{len(damaged)} of {len(shards) + len(compressed)} shards in {root} are damaged or not "
                        f"plain tar (the samples before any damage are kept)", damaged, strict, log)
    if excluded:
        report_excluded(f"{len(excluded)} of {len(samples) + len(excluded)} samples in {root} are not usable",
                        excluded, strict, log)
    offsets, sizes, labels, keys, sources = zip(*samples)
    index = ShardIndex(root, shards, shard_bytes, counts, list(keys), np.array(offsets, dtype=np.int64),
                       np.array(sizes, dtype=np.int64), np.array(labels, dtype=np.int64), list(sources),
                       num_excluded=len(excluded))
    index.save(index_dir)
    labelled = "labelled by .cls" if index.class_names else "without labels"
    log(f"indexed {index.num_instances} samples in {len(shards)} shards of {root} ({labelled}) in "
        f"{time.perf_counter() - started:.1f}s -> {index.path}")
    return index


def scan_shard(path):
    """(kept samples [(image offset, image size, label, key, source)], excluded [(key, reason)], damage or None)
    of one shard, in member order."""
    members, damage = tar_members(path)
    groups = []  # [(key, {extension: (offset, size)}, [extensions in member order])]
    for name, offset, size in members:
        directory, _, base = name.rpartition("/")
        if base.startswith("."):
            continue
        stem, _, extension = base.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if not groups or groups[-1][0] != key:
            groups.append((key, {}, []))
        groups[-1][1].setdefault(extension, (offset, size))
        groups[-1][2].append(extension)
    excluded = []
    if damage and groups:
        excluded.append((groups.pop()[0], "the last sample before the damage, which may have lost members"))
    kept = []
    with open(path, "rb") as shard:
        for key, components, extensions in groups:
            sample, problem = read_sample(shard, key, components, extensions)
            if problem:
                excluded.append((key, problem))
            else:
                kept.append(sample)
    return kept, excluded, damage


def read_sample(shard, key, components, extensions):
    """((image offset, image size, label, key, source), None) of one sample of an open shard, or (None, why not)."""
    if any(character in key for character in UNUSABLE_IN_INDEX):
        return None, "key holds a tab or line break"
    images = [extension for extension in extensions if extension.rpartition(".")[2].lower() in IMAGE_EXTENSIONS]
    if not images:
        return None, f"no image member (has {', '.join('.' + extension for extension in extensions)})"
    offset, size = components[images[0]]
    problem = image_problem(shard, offset, size)
    if problem:
        return None, f".{images[0]}: {problem}"
    label = -1
    if LABEL_EXTENSION in components:
        text = member_bytes(shard, *components[LABEL_EXTENSION], limit=LABEL_BYTES).strip()
        if not text.isdigit():
            return None, f".{LABEL_EXTENSION} is not a class number ({text[:LABEL_BYTES]!r})"
        label = int(text)
    source = ""
    if SOURCE_EXTENSION in components:
        source = member_bytes(shard, *components[SOURCE_EXTENSION]).decode("utf-8", "replace").strip()
        for character in UNUSABLE_IN_INDEX:
            source = source.replace(character, " ")
    return (offset, size, label, key, source), None


def member_bytes(shard, offset, size, limit=None):
    shard.seek(offset)
    return shard.read(size if limit is None else min(size, limit + 1))


def tar_members(path):
    """([(name, data offset, data size)] of the regular files of a tar before any damage, the damage or None)."""
    size = path.stat().st_size
    members = []
    try:
        with tarfile.open(path, "r:") as archive:  # "r:": plain tar, as DALI reads
            for member in archive:
                if member.offset_data + member.size > size:
                    return members, f"cut short inside {member.name}"
                if member.isreg():
                    members.append((member.name, member.offset_data, member.size))
            end = archive.offset  # where the header after the last member starts
    except tarfile.ReadError as error:  # at the first header: not a tar; later: a member tarfile cannot parse
        if not members:
            return members, f"not a tar archive ({error})"
        return members, f"unreadable after {members[-1][0]} ({error})"
    with open(path, "rb") as file:
        file.seek(end)
        block = file.read(BLOCK)
    if block == bytes(BLOCK):
        return members, None
    if not block:
        return members, "cut short: no end-of-archive block after its last member"
    if len(block) < BLOCK:
        return members, f"cut short inside the member header at byte {end}"
    return members, f"an unreadable member header at byte {end}"
