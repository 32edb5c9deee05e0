"""The instance indexes of a pretraining run: the folders `--data` names (the built-in dataset without it) and
their indexes persisted in the run directory, built once by rank 0 and then reloaded, so that the ids stay the
same across resumes. A folder of `.tar` files (and no sub-folders) is indexed as WebDataset shards
(data/shards.py), any other as an image folder (data/index.py). What the index says of a folder is the user's to
fix: one line, on every rank.

The bank is the labelled train set of the kNN monitor and of the linear evaluation: the train split itself, but
with --twins (data/builtin.py) the built-in train split without the twins, so that those numbers are measured on
the images of the plain built-in data."""
from pathlib import Path

from data.builtin import builtin_dataset, twins_dataset
from data.index import InstanceIndex, build_index, saved_description
from data.loaders import SYNTHETIC
from data.shards import ShardIndex, build_shard_index, is_shard_folder
from run.distributed import engine
from run.errors import UsageError
from run.faults import raise_on_every_rank
from run.layout import index_dir


def run_indexes(data, out, strict, log, twins=0.0):
    """(train index, val index or None, bank index) of the run writing to `out`, (None, None, None) for --data
    synthetic (no files); `twins`: the fraction of --twins (built-in data only). Collective."""
    if data == SYNTHETIC:
        log("synthetic data: kNN monitor and linear evaluation are skipped (no labels)")
        return None, None, None
    train_folder, val_folder = dataset_folders(data)
    bank_folder = train_folder
    if twins:
        train_folder = twins_dataset(twins) / "train"
        log(f"--twins {twins}: training on {train_folder} (the built-in train images and their twins); kNN bank, "
            f"linear evaluation and val on the built-in images alone")
    train_index = load_or_build_index(train_folder, index_dir(out, "train"), strict, log)
    bank_index = load_or_build_index(bank_folder, index_dir(out, "bank"), strict, log) if twins else train_index
    val_index = load_or_build_index(val_folder, index_dir(out, "val"), strict, log) if val_folder else None
    if val_index is None or not train_index.class_names:
        missing = "no val/ split" if val_index is None else "the training images have no labels"
        log(f"kNN monitor and linear evaluation are skipped: {missing}")
    return train_index, val_index, bank_index


def saved_run_indexes(run_dir):
    """(bank index, val index) saved by the run in `run_dir`, for evaluating its checkpoints."""
    if not (index_dir(run_dir, "val") / "index.json").is_file():
        raise UsageError(f"{run_dir} has no val split: evaluation needs a dataset with labelled train/ and val/")
    bank = index_dir(run_dir, "bank")
    if not (bank / "index.json").is_file():  # a run without --twins: the bank is its train split
        bank = index_dir(run_dir, "train")
    return load_index(bank), load_index(index_dir(run_dir, "val"))


def load_index(path):
    """The index saved at `path` (its index.json or the folder holding it), of an image folder or of shards."""
    _, description = saved_description(path)
    return (ShardIndex if description["layout"] == ShardIndex.layout else InstanceIndex).load(path)


def dataset_root(data):
    """The folder `--data` names; the built-in dataset when data is None."""
    return Path(builtin_dataset() if data is None else data).expanduser()


def dataset_folders(data):
    """(train folder, val folder or None) of `dataset_root(data)`."""
    root = dataset_root(data)
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder")
    if (root / "train").is_dir():
        return root / "train", (root / "val" if (root / "val").is_dir() else None)
    return root, None


def load_or_build_index(folder, folder_index, strict, log):
    """The instance index persisted in the run directory: built once by rank 0, then reloaded (stable ids on
    resume). An index of another folder is refused: the run would train on it while config.json names this one."""
    index, error = None, None
    try:  # what the index says of the folder is the user's to fix: one line, on every rank
        if engine().rank == 0 and not (folder_index / "index.json").is_file():
            build = build_shard_index if is_shard_folder(folder) else build_index
            build(folder, index_dir=folder_index, strict=strict, log=log)
    except (FileNotFoundError, NotADirectoryError, ValueError) as failure:
        error = str(failure)
    raise_on_every_rank(error)  # collective: rank 0 has written the index
    try:
        index = load_index(folder_index)
        if index.root != Path(folder).expanduser().resolve():
            error = (f"{folder_index} indexes {index.root}, not {folder}: a run directory holds one dataset, give "
                     f"this one another --out")
    except (FileNotFoundError, ValueError) as failure:
        error = str(failure)
    raise_on_every_rank(error)
    return index
