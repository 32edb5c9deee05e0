"""Checkpoints of a hybrid-parallel run: one directory per save, complete or absent.

The names are run/layout.py's. `<out>/checkpoint-<epoch:04d>/` (after `epoch` complete epochs) or
`<out>/checkpoint-<epoch:04d>-step-<step:06d>/` (a stop on a signal `step` steps into the next epoch) holds:
  shard-<rank>.pt  every rank's classifier rows {start, stop, num_instances, weight [C, D],
                   momentum [C, D] or None} and its BatchNorm buffers {name: tensor} (they differ between
                   ranks inside an epoch: they are averaged at its end)
  state.pt         rank 0's data-parallel state (backbone + head, its optimizer, epoch, RNG, config),
                   num_shards, step_losses (the losses of the steps done in the interrupted epoch; [] at an
                   epoch's end) and metrics_lines (lines of metrics.jsonl at the save); written LAST.
The directory is assembled under a hidden partial name and renamed once state.pt is in it, so a crash
mid-save never leaves something that looks like a checkpoint. An epoch's checkpoint written by P ranks
resumes on any P': shard r holds the rows shard_rows(N, P, r), so each rank opens only the shard files that
overlap its own rows, memory-mapped (a resume reads every row once in all, not P times). A checkpoint
taken inside an epoch resumes on the same P only: the rest of the epoch is the remaining batches of that
P's data shards, and each rank gets its own BatchNorm buffers back. (Several hosts need `--out` on a shared
file system, as every rank writes into the same directory.)
"""
import pickle
import shutil
from pathlib import Path

import torch

from run.distributed import barrier, engine, shard_rows
from run.errors import UsageError
from run.faults import raise_on_every_rank
from run.layout import STATE, checkpoint_name, complete_checkpoints, partial_checkpoint, shard_file

# What reading a checkpoint file can raise when the file is missing, cut short or not a checkpoint.
READ_ERRORS = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, KeyError)


def resolve_checkpoint(path):
    """A checkpoint directory, or the newest complete one of a run directory; one-line error otherwise."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    found = complete_checkpoints(path) if path.is_dir() else []
    if not found:
        raise UsageError(f"no complete checkpoint at {path} (expected a checkpoint-NNNN directory "
                         f"with state.pt, or a run directory holding one)")
    return found[-1]


def checkpoint_to_resume(resume, out):
    """--resume: 'auto' = the newest complete checkpoint in --out or None, 'none', or a checkpoint path. Rank 0
    decides for every rank: a rank deciding alone (no shared file system, NFS lag) could start afresh while the
    others resume, and their collectives would part ways."""
    choice = None
    if engine().rank == 0 and resume != "none":
        found = complete_checkpoints(out) if resume == "auto" else [resolve_checkpoint(resume)]
        choice = str(found[-1]) if found else None
    choice = engine().broadcast_object(choice, root=0, name="checkpoint-to-resume")
    return None if choice is None else Path(choice)


def batchnorm_buffers(backbone, head):
    """The floating-point buffers of the encoder (BatchNorm running statistics), by name."""
    return {f"{prefix}.{name}": buffer for prefix, module in (("backbone", backbone), ("head", head))
            for name, buffer in module.named_buffers() if buffer.is_floating_point()}


def save_checkpoint(out_dir, epoch, config, backbone, head, encoder_optimizer, classifier, classifier_optimizer, *,
                    step_losses=(), diagnostics=None, metrics_lines=0):
    """Collective: every rank writes its shard, rank 0 the state, then the directory appears at once.
    epoch: complete epochs; step_losses: the losses of the steps done since (a stop inside an epoch), and
    diagnostics the classifier's totals over them (run.diagnostics.EpochDiagnostics.totals, a list)."""
    rank = engine().rank
    final = Path(out_dir) / checkpoint_name(epoch, len(step_losses))
    partial = partial_checkpoint(final)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier("checkpoint-mkdir")  # the directory exists
    momentum = classifier_optimizer.state.get(classifier.weight, {}).get("momentum_buffer")
    torch.save({"start": classifier.start, "stop": classifier.stop, "num_instances": classifier.num_instances,
                "weight": classifier.weight.detach().cpu(),
                "momentum": None if momentum is None else momentum.cpu(),
                "batchnorm": {name: buffer.cpu() for name, buffer in batchnorm_buffers(backbone, head).items()}},
               shard_file(partial, rank))
    barrier("checkpoint-shards")  # every shard is on disk
    if rank == 0:
        state = {"backbone": backbone.state_dict(), "head": head.state_dict(), "epoch": epoch,
                 "encoder_optimizer": encoder_optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "config": vars(config), "num_shards": engine().size, "step_losses": list(step_losses),
                 "diagnostics": diagnostics, "metrics_lines": metrics_lines}
        torch.save(state, partial / STATE)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    barrier("checkpoint-done")
    return final


def restore_checkpoint(checkpoint, backbone, head, encoder_optimizer, classifier, classifier_optimizer):
    """Collective: everything save_checkpoint wrote, loaded into the run's objects (this rank's rows of the
    classifier and of its momentum, from the shards that hold them) and the RNG; returns the state (epoch,
    num_shards, step_losses, ...). A rank that cannot read what it needs stops every rank with one line."""
    state, rows, error, size = None, None, None, engine().size
    try:
        state = load_state(checkpoint)
        if state["step_losses"] and state["num_shards"] != size:
            raise UsageError(f"{checkpoint} was written inside an epoch by {state['num_shards']} ranks: resume it "
                             f"with {state['num_shards']} ranks, or resume an epoch's checkpoint with --resume")
        own_shard = engine().rank if state["num_shards"] == size else None
        rows = load_rows(checkpoint, classifier.start, classifier.stop, classifier.num_instances, state, own_shard)
    except (UsageError, *READ_ERRORS) as failure:
        error = f"cannot resume from {checkpoint}: {failure}"
    raise_on_every_rank(error)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    encoder_optimizer.load_state_dict(state["encoder_optimizer"])
    weight, momentum, own_batchnorm = rows
    classifier.weight.data.copy_(weight)
    if momentum is not None:
        classifier_optimizer.state[classifier.weight]["momentum_buffer"] = momentum.to(classifier.weight.device)
    if state["step_losses"]:  # inside an epoch: this rank's own running statistics, not rank 0's
        with torch.no_grad():
            for name, buffer in batchnorm_buffers(backbone, head).items():
                buffer.copy_(own_batchnorm[name])
    torch.set_rng_state(state["rng"])
    return state


def load_state(checkpoint):
    return torch.load(Path(checkpoint) / STATE, map_location="cpu", weights_only=False)


def load_rows(checkpoint, start, stop, num_instances, state, own_shard=None):
    """Rows [start, stop) of the classifier weight and momentum, from the shard files that overlap them only
    (memory-mapped: only those rows are read), and the BatchNorm buffers of shard `own_shard` if given.
    Returns (weight, momentum or None, batchnorm or None)."""
    checkpoint, num_shards = Path(checkpoint), state["num_shards"]
    if state["config"]["num_instances"] != num_instances:
        raise UsageError(f"{checkpoint} has {state['config']['num_instances']} classifier rows, the index "
                         f"{num_instances}")
    weights, momenta, batchnorm = [], [], None
    for shard_id in range(num_shards):
        shard_start, shard_stop = shard_rows(num_instances, num_shards, shard_id)
        lo, hi = max(start, shard_start), min(stop, shard_stop)
        own = shard_id == own_shard
        if lo >= hi and not own:
            continue
        shard = torch.load(shard_file(checkpoint, shard_id), map_location="cpu", weights_only=False, mmap=True)
        if (shard["start"], shard["stop"]) != (shard_start, shard_stop):
            raise UsageError(f"{checkpoint}/shard-{shard_id}.pt holds rows [{shard['start']}, {shard['stop']}), "
                             f"not [{shard_start}, {shard_stop})")
        if own:
            batchnorm = shard["batchnorm"]
        if lo < hi:
            weights.append(shard["weight"][lo - shard_start:hi - shard_start].clone())
            if shard["momentum"] is not None:
                momenta.append(shard["momentum"][lo - shard_start:hi - shard_start].clone())
    weight = torch.cat(weights) if weights else torch.empty(0)
    momentum = torch.cat(momenta) if momenta and len(momenta) == len(weights) else None
    return weight, momentum, batchnorm
