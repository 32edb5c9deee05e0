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
P's data shards, and each rank gets its own BatchNorm buffers back; `--resume auto` at another P takes the
epoch's checkpoint before it instead, saying how many steps that redoes (an elastic job that lost a node).
(Several hosts need `--out` on a shared file system, as every rank writes into the same directory.)

Every file is written from a host copy of what it holds (`on_host`), so that the files of a GPU run load with a
plain torch.load on a machine without one. Every file is read back with weights_only=True (`read_file`): tensors
and plain values only, so nothing a file carries runs when it is read, and what is read is checked against the
format written here (`STATE_FORMAT`, `SHARD_FORMAT`); a file that is not one of these is a one-line error naming it.

Room on the disk. Before a byte is written, every rank estimates the size of its files (`estimated_file_bytes`:
the tensors' storages, the pickled rest and the zip records around them) and reads the free space of --out's
file system (`shutil.disk_usage`); one collective shares both, and a checkpoint that does not fit stops every
rank with the same line naming it, what it needs and what is free. A write that fails anyway (something else
filled the disk, a quota, a wrong estimate) is caught on its rank; the ranks agree on it after each round of
writes (the shards, then state.pt), rank 0 removes the partial directory, and every rank stops with one line
naming the rank, the file, its error and the same numbers. Either way the earlier checkpoints are untouched and
`--resume auto` continues from the newest once there is room. What saves and deletions cut short by a kill
left behind (hidden directories) goes at the start of the next save, before the free space is read.

Keeping a few (`--keep-checkpoints`: `prune_checkpoints`, which `save_and_prune` runs on rank 0 after a save
succeeded): of the complete checkpoints up to the one just written, the `keep` newest stay, counting that one;
a checkpoint taken inside an epoch is newer than the epoch's checkpoint before it. The one just written, which
`--resume auto` takes, is never deleted, and checkpoints newer than it (left by a run that went further, when
--resume named an older one) are not touched. A checkpoint is renamed to a hidden name before its files go, so
a deletion cut short never leaves half of one. The disk holds keep + 1 checkpoints while the next one is written.
"""
import copy
import pickle
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from run.distributed import engine, shard_rows
from run.errors import UsageError
from run.faults import raise_on_every_rank
from run.layout import (STATE, checkpoint_name, checkpoint_position, complete_checkpoints, deleted_checkpoint,
                        hidden_checkpoints, partial_checkpoint, shard_count, shard_file)
from run.run_log import human_bytes

# What applying a checkpoint that read well can raise: tensors of other shapes than the run's (load_state_dict,
# copy_, torch.cat, set_rng_state: RuntimeError), an optimizer state of other parameter groups (ValueError,
# KeyError, TypeError), a BatchNorm buffer the shard lacks (KeyError).
APPLY_ERRORS = (RuntimeError, ValueError, KeyError, TypeError)
# What torch.save raises when the disk fills: OSError from open, RuntimeError from its zip writer
# ("basic_ios::clear: iostream error", "unexpected pos").
WRITE_ERRORS = (OSError, RuntimeError)
# What a torch.save file holds besides its tensors' storages and its pickled structure: per storage its zip
# records (local header, padding to 64-byte alignment, zip64 extra, central directory entry) and its rebuild
# call in the pickle; per file the fixed records, and the file system's last partly filled block.
STORAGE_OVERHEAD_BYTES = 512
FILE_OVERHEAD_BYTES = 8192


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


def checkpoint_to_resume(resume, out, say):
    """--resume: 'auto' = the newest complete checkpoint in --out that this number of ranks can resume, or None;
    'none'; or a checkpoint path. Rank 0 decides for every rank: a rank deciding alone (no shared file system,
    NFS lag) could start afresh while the others resume, and their collectives would part ways. say: rank 0's
    print, told when 'auto' passes over a checkpoint (resumable_at)."""
    choice = None
    if engine().rank == 0 and resume != "none":
        found = resumable_at(complete_checkpoints(out), engine().size, say) if resume == "auto" else [
            resolve_checkpoint(resume)]
        choice = str(found[-1]) if found else None
    choice = engine().broadcast_object(choice, root=0, name="checkpoint-to-resume")
    return None if choice is None else Path(choice)


def resumable_at(found, size, say):
    """The complete checkpoints `found` (oldest first) up to the newest that `size` ranks can resume. A checkpoint
    taken inside an epoch resumes on the number of ranks that wrote it only (module docstring): when the newest
    is one of another number's, the newest epoch checkpoint before it is taken instead, and `say` is told what
    that redoes. With none before it, `found` is kept, and the resume refuses it in one line."""
    if not found:
        return found
    newest = found[-1]
    epoch, step = checkpoint_position(newest)
    written_by = shard_count(newest)
    earlier = [path for path in found if checkpoint_position(path)[1] == 0]
    if not step or written_by == size or not earlier:
        return found
    fallback = earlier[-1]
    epochs = epoch - checkpoint_position(fallback)[0]
    say(f"{newest.name} was written inside an epoch by {written_by} ranks and resumes on {written_by} only: "
        f"resuming from {fallback.name} at {size}, which redoes "
        + (f"{epochs} epoch{'s' if epochs > 1 else ''} and " if epochs else "")
        + f"the {step} step{'s' if step > 1 else ''} of epoch {epoch + 1} done by {written_by} ranks")
    return found[:found.index(fallback) + 1]


@dataclass
class TrainingState:
    """The objects of a run that a checkpoint saves and restores: the data-parallel encoder (backbone + head) and
    its optimizer, this rank's classifier shard and its local optimizer."""
    backbone: torch.nn.Module
    head: torch.nn.Module
    encoder_optimizer: torch.optim.Optimizer
    classifier: torch.nn.Module
    classifier_optimizer: torch.optim.Optimizer


def batchnorm_buffers(backbone, head):
    """The floating-point buffers of the encoder (BatchNorm running statistics), by name."""
    return {f"{prefix}.{name}": buffer for prefix, module in (("backbone", backbone), ("head", head))
            for name, buffer in module.named_buffers() if buffer.is_floating_point()}


def save_checkpoint(out_dir, epoch, config, training, *, step_losses=(), diagnostics=None, metrics_lines=0):
    """Collective: every rank writes its shard, rank 0 the state, then the directory appears at once; returns
    its path. training: the run's TrainingState; epoch: complete epochs; step_losses: the losses of the steps done since (a stop inside an epoch),
    and diagnostics the classifier's totals over them (run.diagnostics.EpochDiagnostics.totals, a list).
    A checkpoint that does not fit, or a write that fails, raises the same UsageError on every rank and leaves
    nothing of itself (module docstring)."""
    rank, out_dir = engine().rank, Path(out_dir)
    final = out_dir / checkpoint_name(epoch, len(step_losses))
    partial = partial_checkpoint(final)
    backbone, head, classifier = training.backbone, training.head, training.classifier
    momentum = training.classifier_optimizer.state.get(classifier.weight, {}).get("momentum_buffer")
    shard = on_host({"start": classifier.start, "stop": classifier.stop, "num_instances": classifier.num_instances,
                     "weight": classifier.weight, "momentum": momentum,
                     "batchnorm": batchnorm_buffers(backbone, head)})
    state, previous = None, None
    if rank == 0:
        state = on_host({"backbone": backbone.state_dict(), "head": head.state_dict(), "epoch": epoch,
                         "encoder_optimizer": training.encoder_optimizer.state_dict(), "rng": torch.get_rng_state(),
                         "config": vars(config), "num_shards": engine().size, "step_losses": list(step_losses),
                         "diagnostics": diagnostics, "metrics_lines": metrics_lines})
        found = complete_checkpoints(out_dir)
        previous = found[-1].name if found else None
        for leftover in hidden_checkpoints(out_dir):  # their space counts as free below
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir(parents=True)
    # One collective: every rank's bytes to write and the free space it sees; also the barrier after the mkdir.
    needed = estimated_file_bytes(shard) + (estimated_file_bytes(state) if rank == 0 else 0)
    space = engine().allgather_object((needed, shutil.disk_usage(out_dir).free, previous), name="checkpoint-space")
    needed, free, previous = sum(entry[0] for entry in space), min(entry[1] for entry in space), space[0][2]
    room = f"it needs {human_bytes(needed)} and {human_bytes(free)} were free on the file system of {out_dir}"
    kept = (f"{previous} is intact: free some space (or lower --keep-checkpoints) and --resume auto continues "
            f"from it" if previous else "there is no earlier checkpoint: --resume auto would start afresh")
    if needed > free:
        _abandon(partial, f"cannot write {final.name}: {room}; nothing of it was written, {kept}")
    for part, written, path in (("shards", shard, shard_file(partial, rank)), ("state", state, partial / STATE)):
        error = None if written is None else _write(written, path)
        if part == "state" and rank == 0 and error is None:  # state.pt is the last file: the checkpoint is whole
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
        # Every rank learns of a failed write before anything builds on it: the shards before state.pt is
        # written, state.pt before the run goes on.
        errors = engine().allgather_object(None if error is None else (rank, path.name, error),
                                           name=f"checkpoint-{part}")
        failed = [entry for entry in errors if entry is not None]
        if failed:
            failed_rank, name, reason = failed[0]
            _abandon(partial, f"cannot write {final.name}: rank {failed_rank} failed writing {name} ({reason}); "
                     f"{room} when it started; nothing of it was kept, {kept}")
    return final


def save_and_prune(out_dir, epoch, config, training, log, **progress):
    """Collective: save_checkpoint of the run's TrainingState (progress: the step_losses and diagnostics of a stop inside an epoch), then rank 0
    deletes what config.keep_checkpoints leaves out and prints what it wrote, its size and time, and what it
    deleted (log: the run's RunLog, active on rank 0). Returns the checkpoint."""
    started = time.perf_counter()
    written = save_checkpoint(out_dir, epoch, config, training, metrics_lines=log.lines, **progress)
    seconds = time.perf_counter() - started
    if engine().rank == 0:
        deleted = prune_checkpoints(out_dir, config.keep_checkpoints, written)
        log.print(f"wrote {written.name}: {human_bytes(checkpoint_bytes(written))} in {seconds:.1f}s"
                  + (f"; deleted {', '.join(path.name for path in deleted)} (--keep-checkpoints "
                     f"{config.keep_checkpoints})" if deleted else ""))
    return written


def _abandon(partial, message):
    """Collective: rank 0 removes the partial checkpoint, then every rank raises the same one-line error."""
    if engine().rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    engine().barrier("checkpoint-abandoned")  # when any rank reports, nothing of the checkpoint is left
    raise UsageError(message)


def on_host(obj):
    """obj (dicts, lists and tuples of tensors and plain values) with every tensor detached and in host memory,
    so that a file written from it loads with a plain torch.load on a machine without the device the run used.
    A tensor already on the CPU shares its storage (no copy); a dict keeps its type and attributes (a state_dict's
    _metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        copied = copy.copy(obj)
        copied.update((key, on_host(value)) for key, value in obj.items())
        return copied
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_host(value) for value in obj)
    return obj


def _write(obj, path):
    """torch.save(obj, path) of an object on_host made; None, or the one-line reason it failed (the file cut short
    is removed)."""
    try:
        torch.save(obj, path)
        return None
    except WRITE_ERRORS as error:
        Path(path).unlink(missing_ok=True)
        return first_line(error)


def first_line(error):
    """An exception as one line: its type and the first line of its message (the rest of a C++ error is frames)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def one_line(error):
    """An exception's whole message on one line (load_state_dict lists every key that does not fit on its own)."""
    return " ".join(str(error).split())[:300]


def write_file(obj, path):
    """One process's torch.save of a file outside checkpoints (the exported backbone), its tensors copied to the
    host first (on_host): a one-line UsageError, naming what it needs and what is free, when it does not fit or
    the write fails."""
    path, obj = Path(path), on_host(obj)
    needed, free = estimated_file_bytes(obj), shutil.disk_usage(path.parent).free
    room = f"it needs {human_bytes(needed)} and {human_bytes(free)} were free on its file system"
    if needed > free:
        raise UsageError(f"cannot write {path}: {room}")
    error = _write(obj, path)
    if error is not None:
        raise UsageError(f"cannot write {path}: {error}; {room} when it started")


class _StorageCounter(pickle.Pickler):
    """Pickles what torch.save pickles, but for the tensors, whose storages it records (by address) instead."""

    def __init__(self, stream):
        super().__init__(stream, protocol=2)
        self.storages = {}

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor):
            return None
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), storage.device.type)
        self.storages.setdefault(key, len(self.storages))
        return self.storages[key]


class _ByteCount:
    """A write-only stream that counts the bytes written to it."""

    def __init__(self):
        self.bytes = 0

    def write(self, data):
        self.bytes += len(data)
        return len(data)


def estimated_file_bytes(obj):
    """An upper estimate of the size of torch.save(obj): every tensor's whole storage (torch.save writes a view's
    storage whole, and a storage shared by several tensors once), the pickled rest, and the zip records."""
    stream = _ByteCount()
    counter = _StorageCounter(stream)
    counter.dump(obj)
    storage_bytes = sum(nbytes for _, nbytes, _ in counter.storages)
    return stream.bytes + storage_bytes + STORAGE_OVERHEAD_BYTES * len(counter.storages) + FILE_OVERHEAD_BYTES


def checkpoint_bytes(checkpoint):
    """The bytes of a checkpoint directory's files."""
    return sum(path.stat().st_size for path in Path(checkpoint).iterdir())


def prune_checkpoints(out_dir, keep, written):
    """Rank 0, after `written` was saved: delete the complete checkpoints of out_dir that `keep` leaves out
    (0 keeps every one; module docstring). Returns the deleted ones; one that cannot be renamed stays (the
    next save tries again)."""
    if not keep:
        return []
    older = [path for path in complete_checkpoints(out_dir) if checkpoint_position(path) < checkpoint_position(written)]
    deleted = []
    for path in older[:max(len(older) - (keep - 1), 0)]:
        hidden = deleted_checkpoint(path)
        try:
            path.rename(hidden)  # from here on it is not a checkpoint: half of one is never left
        except OSError:
            continue
        shutil.rmtree(hidden, ignore_errors=True)
        deleted.append(path)
    return deleted


def restore_checkpoint(checkpoint, training):
    """Collective: everything save_checkpoint wrote, loaded into the run's TrainingState (this rank's rows of the
    classifier and of its momentum, from the shards that hold them) and the RNG; returns the state (epoch,
    num_shards, step_losses, ...). A rank that cannot read or apply what it needs stops every rank with one line
    (a rank that applied part of it stops too)."""
    state, error, size = None, None, engine().size
    backbone, head, classifier = training.backbone, training.head, training.classifier
    try:
        state = load_state(checkpoint)
        inside_epoch = bool(state["step_losses"])
        if inside_epoch and state["num_shards"] != size:
            raise UsageError(f"{checkpoint} was written inside an epoch by {state['num_shards']} ranks: resume it "
                             f"with {state['num_shards']} ranks, or resume an epoch's checkpoint with --resume")
        weight, momentum, own_batchnorm = load_rows(checkpoint, classifier.start, classifier.stop,
                                                    classifier.num_instances, state,
                                                    engine().rank if inside_epoch else None)
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        training.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        classifier.weight.data.copy_(weight)
        if momentum is not None:
            training.classifier_optimizer.state[classifier.weight]["momentum_buffer"] = momentum.to(classifier.weight.device)
        if inside_epoch:  # this rank's own running statistics, not rank 0's
            with torch.no_grad():
                for name, buffer in batchnorm_buffers(backbone, head).items():
                    buffer.copy_(own_batchnorm[name])
        torch.set_rng_state(state["rng"])
    except UsageError as failure:
        error = f"cannot resume from {checkpoint}: {failure}"
    except APPLY_ERRORS as failure:
        error = f"cannot resume from {checkpoint}: it does not fit this run ({one_line(failure)})"
    raise_on_every_rank(error)
    return state


# What a checkpoint's files hold (save_checkpoint), judged when they are read back: key -> the types its value may
# take (ints not negative). A state.pt written before the diagnostics were kept has none; a shard's "batchnorm" is
# read from a rank's own shard only, inside an epoch.
STATE_FORMAT = {"backbone": dict, "head": dict, "epoch": int, "encoder_optimizer": dict, "rng": torch.Tensor,
                "config": dict, "num_shards": int, "step_losses": list, "metrics_lines": int}
SHARD_FORMAT = {"start": int, "stop": int, "num_instances": int, "weight": torch.Tensor,
                "momentum": (torch.Tensor, type(None))}
# The config of a checkpoint written before it was saved as a dict is this class, which a weights-only load
# refuses. The conversion also adds what that format lacks: no steps inside an epoch (it saved after epochs only),
# and no lines of metrics.jsonl that the checkpoint vouches for (a resume keeps only its evaluation records).
OLD_CONFIG = "argparse.Namespace"
CONVERT_OLD_STATE = ("python -c \"import sys, torch; s = torch.load(sys.argv[1], weights_only=False); "
                     "s['config'] = vars(s['config']); s.setdefault('step_losses', []); "
                     "s.setdefault('metrics_lines', 0); torch.save(s, sys.argv[1])\"")


def read_file(path, mmap=False):
    """What torch.save wrote to `path`, read with weights_only=True: tensors (on the CPU) and plain values only,
    and nothing in the file runs (unpickling an object with a __reduce__ calls what it names; here the unpickler
    refuses it). A UsageError naming the file otherwise: what it holds besides, the conversion of a checkpoint of
    the older format, or why it is no torch.save file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as error:  # missing or unreadable: its message names the file
        raise UsageError(str(error)) from None
    except Exception as error:  # a file torch.save did not write: its zip reader and unpickler raise many types
        if not zipfile.is_zipfile(path):
            raise UsageError(f"{path} is not a file torch.save wrote: not a zip archive") from None
        if not isinstance(error, pickle.UnpicklingError):
            raise UsageError(f"{path} is not a file torch.save wrote ({first_line(error)})") from None
    callables = pickled_globals(path)
    if callables == [OLD_CONFIG]:
        raise UsageError(f"{path} is of the older checkpoint format (its config an {OLD_CONFIG}), which is not read: "
                         f"if you trust the file, convert it once with {CONVERT_OLD_STATE} {path}")
    held = ", ".join(callables) if callables else "what a weights-only load refuses"
    raise UsageError(f"{path} is refused: it holds {held} besides tensors and plain values; nothing in it was run")


def pickled_globals(path):
    """The callables and classes a torch.save file's pickle names beyond those a weights-only load allows, read
    from its opcodes without unpickling; [] when that cannot be read."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip of torch.save's layout: read_file says so
        return []


def check_format(obj, expected, path):
    """UsageError naming `path` unless obj is a dict holding every key of `expected` with a value of its types."""
    if not isinstance(obj, dict):
        raise UsageError(f"{path} is not a checkpoint file of this trainer: it holds a {type(obj).__name__}")
    missing = [key for key in expected if key not in obj]
    if missing:
        raise UsageError(f"{path} is not a checkpoint file of this trainer: it lacks {', '.join(missing)}")
    for key, types in expected.items():
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, int) and (isinstance(value, bool) or value < 0)):
            kinds = " or ".join(kind.__name__ for kind in (types if isinstance(types, tuple) else (types,)))
            raise UsageError(f"{path} is not a checkpoint file of this trainer: its {key} is {value!r:.60}, not "
                             f"{'an int >= 0' if types is int else kinds}")


def is_number_list(value):
    return isinstance(value, list) and all(isinstance(number, (int, float)) for number in value)


def load_state(checkpoint):
    """state.pt of a checkpoint (read_file), of the format save_checkpoint writes; a UsageError naming it otherwise."""
    path = Path(checkpoint) / STATE
    state = read_file(path)
    check_format(state, STATE_FORMAT, path)
    diagnostics = state.get("diagnostics")
    if not is_number_list(state["step_losses"]) or not (diagnostics is None or is_number_list(diagnostics)):
        raise UsageError(f"{path} is not a checkpoint file of this trainer: its step_losses and diagnostics are not "
                         f"lists of numbers")
    if not state["num_shards"] or not shard_file(checkpoint, state["num_shards"] - 1).is_file():
        raise UsageError(f"{path} names {state['num_shards']} shard files, and {checkpoint} does not hold "
                         f"shard-{state['num_shards'] - 1}.pt")
    return state


def load_rows(checkpoint, start, stop, num_instances, state, own_shard=None):
    """Rows [start, stop) of the classifier weight and momentum, from the shard files that overlap them only
    (memory-mapped: only those rows are read), and the BatchNorm buffers of shard `own_shard` if given.
    Returns (weight, momentum or None, batchnorm or None)."""
    checkpoint, num_shards = Path(checkpoint), state["num_shards"]
    if state["config"].get("num_instances") != num_instances:
        raise UsageError(f"{checkpoint} has {state['config'].get('num_instances')!r:.60} classifier rows, the index "
                         f"{num_instances}")
    weights, momenta, batchnorm = [], [], None
    for shard_id in range(num_shards):
        shard_start, shard_stop = shard_rows(num_instances, num_shards, shard_id)
        lo, hi = max(start, shard_start), min(stop, shard_stop)
        own = shard_id == own_shard
        if lo >= hi and not own:
            continue
        path = shard_file(checkpoint, shard_id)
        shard = read_file(path, mmap=True)
        check_format(shard, {**SHARD_FORMAT, **({"batchnorm": dict} if own else {})}, path)
        if (shard["start"], shard["stop"]) != (shard_start, shard_stop):
            raise UsageError(f"{path} holds rows [{shard['start']}, {shard['stop']}), not [{shard_start}, "
                             f"{shard_stop})")
        if own:
            batchnorm = shard["batchnorm"]
        if lo < hi:  # views of the mapped file: the one copy is torch.cat's, into memory of this process
            weights.append(shard["weight"][lo - shard_start:hi - shard_start])
            if shard["momentum"] is not None:
                momenta.append(shard["momentum"][lo - shard_start:hi - shard_start])
    weight = torch.cat(weights) if weights else torch.empty(0)
    momentum = torch.cat(momenta) if momenta and len(momenta) == len(weights) else None
    return weight, momentum, batchnorm
