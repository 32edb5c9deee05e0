"""The instance indexes of a pretraining run: the folders `--data` names (the built-in dataset without it) and
their indexes persisted in the run directory, built once by rank 0 and then reloaded, so that the ids stay the
same across resumes. What the index says of a folder is the user's to fix: one line, on every rank."""
from pathlib import Path


from data.builtin import builtin_dataset
from data.index import InstanceIndex, build_index
from run.distributed import engine
from run.errors import UsageError
from run.faults import raise_on_every_rank
from run.layout import index_dir


def run_indexes(data, out, strict, log):
    """(train index, val index or None) of the run writing to `out`. Collective."""
    train_folder, val_folder = dataset_folders(data)
    train_index = load_or_build_index(train_folder, index_dir(out, "train"), strict, log)
    val_index = load_or_build_index(val_folder, index_dir(out, "val"), strict, log) if val_folder else None
    return train_index, val_index


def dataset_folders(data):
    """(train folder, val folder or None); the built-in dataset when data is None."""
    root = Path(builtin_dataset() if data is None else data).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder")
    if (root / "train").is_dir():
        return root / "train", (root / "val" if (root / "val").is_dir() else None)
    return root, None


def load_or_build_index(folder, index_dir, strict, log):
    """The instance index persisted in the run directory: built once by rank 0, then reloaded (stable ids on
    resume). An index of another folder is refused: the run would train on it while config.json names this one."""
    index, error = None, None
    try:  # what the index says of the folder is the user's to fix: one line, on every rank
        if engine().rank == 0 and not (index_dir / "index.json").is_file():
            build_index(folder, index_dir=index_dir, strict=strict, log=log)
    except (FileNotFoundError, NotADirectoryError, ValueError) as failure:
        error = str(failure)
    raise_on_every_rank(error)  # collective: rank 0 has written the index
    try:
        index = InstanceIndex.load(index_dir)
        if index.root != Path(folder).expanduser().resolve():
            error = (f"{index_dir} indexes {index.root}, not {folder}: a run directory holds one dataset, give "
                     f"this one another --out")
    except (FileNotFoundError, ValueError) as failure:
        error = str(failure)
    raise_on_every_rank(error)
    return index
