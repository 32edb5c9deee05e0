"""Checkpoints of a hybrid-parallel run: one directory per save, complete or absent.

Layout of `<out>/checkpoint-<epoch:04d>/`:
  shard-<rank>.pt  every rank's classifier rows {start, stop, num_instances, weight [C, D],
                   momentum [C, D] or None}
  state.pt         rank 0's data-parallel state (backbone + head, its optimizer, epoch, RNG, config)
                   and num_shards; written LAST.
The directory is assembled under a hidden partial name and renamed once state.pt is in it, so a crash
mid-save never leaves something that looks like a checkpoint. A checkpoint written by P ranks resumes
on any P': each rank reads exactly its rows [start, stop) out of the shard files that overlap them.
(Several hosts need `--out` on a shared file system, as every rank writes into the same directory.)
"""
import re
import shutil
from pathlib import Path

import horovod.torch as hvd
import torch

from model.distributed import barrier
from model.errors import UsageError

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{4,})$")


def complete_checkpoints(out_dir):
    """Complete checkpoint directories of a run, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if CHECKPOINT_NAME.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def resolve_checkpoint(path):
    """A checkpoint directory, or the newest complete one of a run directory; one-line error otherwise."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = complete_checkpoints(path) if path.is_dir() else []
    if not found:
        raise UsageError(f"no complete checkpoint at {path} (expected a checkpoint-NNNN directory "
                                f"with state.pt, or a run directory holding one)")
    return found[-1]


def save_checkpoint(out_dir, epoch, config, backbone, head, encoder_optimizer, classifier, classifier_optimizer):
    """Collective: every rank writes its shard, rank 0 the state, then the directory appears at once."""
    final = Path(out_dir) / f"checkpoint-{epoch:04d}"
    partial = Path(out_dir) / f".checkpoint-{epoch:04d}.partial"
    if hvd.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier("checkpoint-mkdir")  # the directory exists
    momentum = classifier_optimizer.state.get(classifier.weight, {}).get("momentum_buffer")
    torch.save({"start": classifier.start, "stop": classifier.stop, "num_instances": classifier.num_instances,
                "weight": classifier.weight.detach().cpu(),
                "momentum": None if momentum is None else momentum.cpu()}, partial / f"shard-{hvd.rank()}.pt")
    barrier("checkpoint-shards")  # every shard is on disk
    if hvd.rank() == 0:
        state = {"backbone": backbone.state_dict(), "head": head.state_dict(), "epoch": epoch,
                 "encoder_optimizer": encoder_optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "config": vars(config), "num_shards": hvd.size()}
        torch.save(state, partial / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    barrier("checkpoint-done")
    return final


def restore_checkpoint(checkpoint, backbone, head, encoder_optimizer, classifier, classifier_optimizer):
    """Everything save_checkpoint wrote, loaded into the run's objects (this rank's rows of the classifier and
    of its momentum, from whichever shards hold them) and the RNG; returns the state (epoch, num_shards, ...)."""
    state = load_state(checkpoint)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    encoder_optimizer.load_state_dict(state["encoder_optimizer"])
    weight, momentum = load_rows(checkpoint, classifier.start, classifier.stop)
    classifier.weight.data.copy_(weight)
    if momentum is not None:
        classifier_optimizer.state[classifier.weight]["momentum_buffer"] = momentum.to(classifier.weight.device)
    torch.set_rng_state(state["rng"])
    return state


def load_state(checkpoint):
    return torch.load(Path(checkpoint) / "state.pt", map_location="cpu", weights_only=False)


def load_rows(checkpoint, start, stop):
    """Rows [start, stop) of the classifier weight and momentum, gathered from every overlapping shard."""
    checkpoint = Path(checkpoint)
    weights, momenta = [], []
    for shard_id in range(load_state(checkpoint)["num_shards"]):
        shard = torch.load(checkpoint / f"shard-{shard_id}.pt", map_location="cpu", weights_only=False)
        lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
        if lo < hi:
            weights.append(shard["weight"][lo - shard["start"]:hi - shard["start"]])
            if shard["momentum"] is not None:
                momenta.append(shard["momentum"][lo - shard["start"]:hi - shard["start"]])
    weight = torch.cat(weights) if weights else torch.empty(0)
    if len(weight) != stop - start:
        raise UsageError(f"{checkpoint} holds {len(weight)} of the rows [{start}, {stop}) this rank needs")
    return weight, (torch.cat(momenta) if len(momenta) == len(weights) and momenta else None)
