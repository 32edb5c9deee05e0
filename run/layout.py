"""The layout of a run directory (`--out`): the one module that knows its names.

  config.json                             the resolved flags of the run, written at its start
  metrics.jsonl                           one JSON record per line (run/run_log.py)
  index-train/, index-val/                the instance indexes of the data, built once (data/run_index.py)
  index-bank/                             with --twins: the index of the kNN bank, the built-in train split
  checkpoint-<epoch:04d>/                 a checkpoint after `epoch` complete epochs (run/checkpoint.py):
      shard-<rank>.pt                     every rank's classifier rows and BatchNorm buffers
      state.pt                            rank 0's data-parallel state, written last
  checkpoint-<epoch:04d>-step-<step:06d>/ a checkpoint of a stop `step` steps into epoch `epoch` + 1
  .checkpoint-....partial/                a checkpoint being written: hidden until renamed complete
  .checkpoint-....deleting/               a checkpoint being deleted: hidden first, so never half a checkpoint
  backbone.pth                            the pretrained backbone (torchvision layout where it is one)
"""
import re
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
BACKBONE = "backbone.pth"
STATE = "state.pt"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{4,})(?:-step-(\d{6,}))?$")


def index_dir(out, split):
    """The folder of the index of `split` ("train", "val" or "bank")."""
    return Path(out) / f"index-{split}"


def checkpoint_name(epoch, step=0):
    return f"checkpoint-{epoch:04d}" + (f"-step-{step:06d}" if step else "")


def checkpoint_position(path):
    """(complete epochs, steps into the next epoch) of a checkpoint directory name, or None."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return None if match is None else (int(match.group(1)), int(match.group(2) or 0))


def partial_checkpoint(final):
    """The hidden name a checkpoint is written under before it is renamed to `final`."""
    return Path(final).parent / f".{Path(final).name}.partial"


def deleted_checkpoint(path):
    """The hidden name a checkpoint is renamed to before its files are removed."""
    return Path(path).parent / f".{Path(path).name}.deleting"


def hidden_checkpoints(out):
    """What saves and deletions cut short left behind (partial and deleting directories): never read, only removed."""
    return sorted([*Path(out).glob(".checkpoint-*.partial"), *Path(out).glob(".checkpoint-*.deleting")])


def shard_file(checkpoint, rank):
    return Path(checkpoint) / f"shard-{rank}.pt"


def shard_count(checkpoint):
    """How many ranks wrote a complete checkpoint: one shard file each."""
    return len(list(Path(checkpoint).glob("shard-*.pt")))


def is_complete_checkpoint(path):
    return checkpoint_position(path) is not None and (Path(path) / STATE).is_file()


def complete_checkpoints(out):
    """Complete checkpoint directories of a run, oldest first."""
    return sorted((path for path in Path(out).glob("checkpoint-*") if is_complete_checkpoint(path)),
                  key=checkpoint_position)
