"""Instance index: a dataset folder -> a persisted, stable mapping from instance id 0..N-1 to image file.

Liu et al. (AAAI 2021) treat every training image as its own class, so the instance id is the label the
classifier learns; it must mean the same file on every rank, on every machine and after a resume.

Layouts. A folder with sub-folders is ImageFolder-style (ImageNet `train/`): each sub-folder is a class,
images at any depth below it belong to it, and the class label is kept only for evaluation. A folder without
sub-folders is a flat set of images (label -1). Hidden entries (a leading ".") are ignored.

Ids. The relative POSIX paths of the images are sorted by code point (locale- and creation-order-independent);
an image's position in that order is its instance id.

Bad files are excluded, counted and reported (first few paths and why); `strict=True` makes them an error.
Checks read only the first bytes and the last few KiB of each file, never decode, so indexing 1.28M files is
bounded by `open()` calls (see bench/RESULTS.md):
- empty or unreadable files;
- files that are not complete images of a format DALI decodes (JPEG, PNG, WebP, BMP, TIFF, PNM, JPEG 2000),
  judged by their content whatever their extension: data/formats.py has the signature of each format and how
  its end is checked. DALI's decoder stops the whole pipeline on an image cut short, so these must not reach
  it (data/pipelines.py says what happens to damage these checks cannot see);
- paths that a DALI file list cannot hold (line breaks, leading or trailing white space).

Persistence. `<dir>/index.json` names the root, the class names and a file list `files-<content hash>.txt`
in DALI's `file_list` format ("relative/path id" per line); an instance's semantic label is its class folder,
the first component of its path, so the two together hold the labels too. The file list is written first under its content
hash, then index.json is replaced atomically, so ranks indexing the same folder at once never see a torn index.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.formats import image_problem
from run.files import cache_root, folder_key, write_text_atomically

BAD_FILES_REPORTED = 5  # how many excluded paths the report names; the rest are only counted
INDEX_FORMAT = 1


@dataclass
class InstanceIndex:
    """The ids of one dataset folder; `files[i]` is instance i, `labels[i]` its semantic class."""

    layout = "folder"  # what index.json says, beside data/shards.py's "shards"
    root: Path  # absolute dataset folder; `files` are relative to it
    files: list  # [N] relative POSIX paths, sorted; the position is the instance id
    class_names: list  # sorted class folder names; [] for a flat folder
    num_excluded: int = 0  # bad files left out when the index was built
    path: Path = None  # the index.json this index was saved to or loaded from
    file_list: Path = None  # the DALI file_list beside it ("relative/path id" per line)
    labels: np.ndarray = field(init=False, repr=False)  # [N] int64 class per instance, -1 for a flat folder

    def __post_init__(self):
        class_ids = {name: label for label, name in enumerate(self.class_names)}
        if class_ids:
            class_of_file = (class_ids[name.partition("/")[0]] for name in self.files)
            self.labels = np.fromiter(class_of_file, dtype=np.int64, count=len(self.files))
        else:
            self.labels = np.full(len(self.files), -1, dtype=np.int64)

    @property
    def num_instances(self):
        return len(self.files)

    def name(self, instance):
        """Instance `instance`'s path relative to the root, as reports name it."""
        return self.files[instance]

    def open_image(self, instance):
        """The encoded image of instance `instance` as an open binary file."""
        return open(self.root / self.files[instance], "rb")

    def save(self, directory):
        """Write `directory/index.json` and its file list atomically; return the index.json path."""
        directory = Path(directory)
        text = "".join(f"{name} {instance_id}\n" for instance_id, name in enumerate(self.files))
        file_list = directory / f"files-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
        if not file_list.exists():
            write_text_atomically(file_list, text)
        self.path = write_description(self, directory, file_list=file_list.name, class_names=self.class_names)
        self.file_list = file_list
        return self.path

    @classmethod
    def load(cls, path):
        """Reload a saved index (its index.json or the folder holding it) without looking at the dataset."""
        path, description = saved_description(path, cls.layout)
        file_list = path.parent / description["file_list"]
        files = [line.rsplit(" ", 1)[0] for line in file_list.read_text().splitlines()]
        if len(files) != description["num_instances"]:
            raise ValueError(f"{file_list} has {len(files)} lines, {path} says {description['num_instances']}")
        root = Path(description["root"])
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} of the index {path} does not exist")
        return cls(root, files, description["class_names"], description["num_excluded"], path, file_list)


def write_description(index, directory, **fields):
    """Write `directory/index.json` atomically (what saved_description reads back): the format, the index's
    layout, root and counts, and the `fields` of its layout between them; return its path."""
    description = {"format": INDEX_FORMAT, "layout": index.layout, "root": str(index.root), **fields,
                   "num_instances": index.num_instances, "num_excluded": index.num_excluded}
    path = Path(directory) / "index.json"
    write_text_atomically(path, json.dumps(description, indent=1) + "\n")
    return path


def saved_description(path, layout=None):
    """(index.json path, its contents) of the index saved at `path` (the file or its folder), checked to be of
    this format and, when given, of this layout (indexes written before layouts existed are folders)."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no instance index at {path}")
    description = json.loads(path.read_text())
    if description.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not an instance index of format {INDEX_FORMAT}")
    description.setdefault("layout", InstanceIndex.layout)
    if layout is not None and description["layout"] != layout:
        raise ValueError(f"{path} indexes {description['layout']}, not {layout}")
    return path, description


def build_index(folder, *, out_dir=None, index_dir=None, strict=False, log=print):
    """Index `folder`, save the index and return it.

    The index goes to `index_dir` when given, else to `<out_dir or cache>/index-<folder name>-<path hash>/`;
    `index.path` says where, for `InstanceIndex.load` on resume. Every call rescans the folder: the saved
    index records what was there.
    """
    started = time.perf_counter()
    root, files, class_names, num_excluded = scan_folder(folder, strict=strict, log=log)
    index = InstanceIndex(root, files, class_names, num_excluded=num_excluded)
    index.save(index_dir or (Path(out_dir) if out_dir else cache_root()) / f"index-{folder_key(root)}")
    layout = f"{len(class_names)} class folders" if class_names else "flat folder"
    log(f"indexed {index.num_instances} images in {root} ({layout}) in {time.perf_counter() - started:.1f}s "
        f"-> {index.path}")
    return index


def scan_folder(folder, *, strict=False, log=print):
    """(absolute root, sorted relative paths of its usable images, class names, number of files excluded) of an
    image folder; the excluded files are reported through `log`, or are an error when strict."""
    root = Path(folder).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {folder} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {folder} is not a folder")
    class_names, candidates, excluded = list_files(root)
    problems = {name: file_problem(os.path.join(root, name)) for name in candidates}
    files = sorted(name for name, problem in problems.items() if problem is None)
    excluded = sorted(excluded + [(name, problem) for name, problem in problems.items() if problem])
    if not files:
        found = f": {describe_excluded(excluded)}" if excluded else ""
        raise ValueError(f"no images DALI decodes in {root}{found}")
    if excluded:
        report_excluded(f"{len(excluded)} of {len(files) + len(excluded)} files in {root} are not usable images",
                        excluded, strict, log)
    return root, files, class_names, len(excluded)


def list_files(root):
    """(class names, candidate image paths, [(path, reason)] excluded by name or place), paths relative to root."""
    with os.scandir(root) as scan:
        entries = sorted((entry for entry in scan if not entry.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise ValueError(f"dataset folder {root} is empty")
    class_names = [entry.name for entry in entries if entry.is_dir()]
    if class_names:
        candidates = [name for class_name in class_names for name in walk_files(root / class_name, f"{class_name}/")]
        excluded = [(entry.name, "outside the class folders") for entry in entries if not entry.is_dir()]
    else:
        candidates, excluded = [entry.name for entry in entries], []
    listable = [name for name in candidates if name == name.strip() and "\n" not in name and "\r" not in name]
    if len(listable) < len(candidates):
        excluded += [(name, "name not usable in a DALI file list") for name in set(candidates) - set(listable)]
    return class_names, listable, excluded


def walk_files(folder, prefix):
    """Relative paths (`prefix` + path below `folder`) of the non-hidden files under `folder`, links followed."""
    with os.scandir(folder) as scan:
        for entry in scan:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                yield from walk_files(entry.path, f"{prefix}{entry.name}/")
            else:
                yield f"{prefix}{entry.name}"


def file_problem(path):
    """None if `path` holds a complete image of a format DALI decodes (data/formats.py), else why it does not."""
    try:
        with open(path, "rb") as file:
            return image_problem(file, 0, os.fstat(file.fileno()).st_size)
    except OSError as error:
        return f"unreadable ({error.strerror or error})"


def report_excluded(report, excluded, strict, log):
    """Log `report` with the first excluded names and why; raise it as a ValueError instead when strict."""
    if strict:
        raise ValueError(f"{report} (strict): {describe_excluded(excluded)}")
    log(f"excluded {report}: {describe_excluded(excluded)}")


def describe_excluded(excluded):
    """'a.jpg (empty file), b.txt (not an image DALI decodes ...), ... and 7 more' for the report."""
    named = ", ".join(f"{name} ({reason})" for name, reason in excluded[:BAD_FILES_REPORTED])
    remaining = len(excluded) - BAD_FILES_REPORTED
    return named + (f" and {remaining} more" if remaining > 0 else "")
