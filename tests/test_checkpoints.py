"""Checkpoints that fit the disk (--keep-checkpoints) and a full disk that is one line and loses nothing
(run/checkpoint.py): the estimate of what a save writes, the pruning rule, the refusal before a write and the
failed write, in process (one rank) and in P = 2 trainer jobs, on a simulated and on a real small file system.
The files of a run on a GPU (a stand-in device here) load with a plain torch.load on a machine without one; what
every command reads back runs nothing it carries, and a file that is not such a checkpoint, an older format, or a
config the flags would refuse is one line naming the file."""
import argparse
import copy
import hashlib
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import pytest
import torch
from torch.utils._pytree import tree_map

from run import checkpoint as checkpoints
from run.errors import UsageError
from run.faults import TEST_FAULT_VARIABLE
from run.layout import checkpoint_name, complete_checkpoints, hidden_checkpoints, partial_checkpoint
from run.run_log import human_bytes
from tests.conftest import WORKERS, run_horovod
from tests.trainer_runs import (SMALL, assert_checkpoints_bitwise_equal, main_in_process, rank_lines, read_metrics,
                                trainer)

ENCODER = dict(arch="resnet18", small_stem=True, width=8, hidden_dim=32, feat_dim=16, data=None)


def digest(checkpoint):
    """{file: sha256} of a checkpoint directory: equal before and after means untouched."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(checkpoint.iterdir())}


def names(out):
    return [path.name for path in complete_checkpoints(out)]


def needed_bytes(message):
    """The bytes of "it needs 1.5 MiB" in an error line (human_bytes' units)."""
    value, unit = re.search(r"it needs ([\d.]+) (B|KiB|MiB|GiB) ", message).groups()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


@pytest.fixture(scope="module")
def tiny_run():
    """(config, TrainingState) of one rank after one training step, so that both optimizers hold momentum; the
    single-process engine is this module's process group (as tests/conftest.py's single_engine, for a module)."""
    from model.classifier import ShardedInstanceClassifier
    from model.encoder import build_encoder
    from model.step import train_step
    from run import distributed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distributed, "_started", distributed.SingleProcess())
        torch.manual_seed(0)
        config = argparse.Namespace(**ENCODER, keep_checkpoints=2, num_instances=37)
        backbone, head = build_encoder(config, torch.device("cpu"))
        classifier = ShardedInstanceClassifier(37, 16, smooth_k=2, smooth_alpha=0.1)
        encoder_optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
        classifier_optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
        images = torch.randn(5, 3, 32, 32)
        train_step(backbone, head, classifier, (encoder_optimizer, classifier_optimizer), [images, images],
                   torch.arange(5))
        yield config, checkpoints.TrainingState(backbone, head, encoder_optimizer, classifier, classifier_optimizer)


class SmallFileSystem:
    """A tmpfs of a given size mounted at `path` (CI runs as root); `resize` remounts it with another size."""

    def __init__(self, path):
        self.path = path

    def mount(self, size, *options):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([*options, f"size={size}"]), "tmpfs",
                                 str(self.path)], capture_output=True, text=True)
        return result

    def resize(self, size):
        result = self.mount(size, "remount")
        assert result.returncode == 0, result.stderr

    def free(self):
        return shutil.disk_usage(self.path).free


@pytest.fixture
def small_file_system(tmp_path):
    file_system = SmallFileSystem(tmp_path / "small")
    file_system.path.mkdir()
    result = file_system.mount("64m")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN, which this process lacks "
                    f"({result.stderr.strip()}); CI runs as root and runs this test")
    yield file_system
    subprocess.run(["umount", "-l", str(file_system.path)], check=True)


# -------------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("make", [
    lambda training: {"weight": torch.randn(1001, 13), "momentum": torch.randn(1001, 13), "start": 0},  # a shard
    lambda training: {"view": torch.randn(1000, 10)[:3]},  # torch.save writes the view's whole storage
    lambda training: {"a": (shared := torch.randn(257, 3)), "b": shared[1:]},  # a storage shared: written once
    lambda training: {"backbone": training.backbone.state_dict(), "head": training.head.state_dict(),
                      "rng": torch.get_rng_state(), "encoder_optimizer": training.encoder_optimizer.state_dict(),
                      "step_losses": [0.5] * 3000},  # a state.pt
    lambda training: {},
], ids=["shard", "view", "shared-storage", "state", "empty"])
def test_the_estimate_bounds_what_torch_save_writes_and_is_close(make, tiny_run, tmp_path):
    obj = make(tiny_run[1])
    torch.save(obj, tmp_path / "file.pt")
    written, estimate = (tmp_path / "file.pt").stat().st_size, checkpoints.estimated_file_bytes(obj)
    storages = len({tensor.untyped_storage().data_ptr() for tensor in tensors_of(obj)})
    assert written <= estimate <= written + checkpoints.FILE_OVERHEAD_BYTES \
        + checkpoints.STORAGE_OVERHEAD_BYTES * storages, (written, estimate)


def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [tensor for value in values for tensor in tensors_of(value)]


def test_plan_sizes_the_checkpoint_a_save_writes(tiny_run, tmp_path):
    """model.plan's checkpoint rows (2 C D 4 per shard file, + 2 |theta| 4 for state.pt) against the files; the
    BatchNorm buffers and the files' records are what the formula leaves aside."""
    from model.plan import plan
    config, training = tiny_run
    written = checkpoints.save_checkpoint(tmp_path, 1, config, training)
    rows = {name: hybrid for name, hybrid, _ in plan(instances=37, gpus=1, batch_size=10, feat_dim=16, k=2,
                                                      image_size=32, **{k: v for k, v in ENCODER.items()
                                                                        if k not in ("feat_dim", "data")})}
    in_all = rows["checkpoint in all (every rank's file + state.pt)"]
    shard = rows["checkpoint: classifier file of one rank"]
    assert in_all <= checkpoints.checkpoint_bytes(written) <= 1.1 * in_all
    assert shard == 2 * 37 * 16 * 4 <= (written / "shard-0.pt").stat().st_size


def test_a_resume_copies_its_rows_once(tiny_run, tmp_path):
    """load_rows reads rows [5, 30) from the memory-mapped shard into one copy each of the weight and the
    momentum: at a resume the rank holds its parameter, the rows read and their momentum, no fourth copy."""
    from run.checkpoint import load_rows, load_state
    from tests.allocations import NewStorages
    config, training = tiny_run
    written = checkpoints.save_checkpoint(tmp_path, 1, config, training)
    with NewStorages() as new:
        weight, momentum, _ = load_rows(written, 5, 30, 37, load_state(written))
    classifier, optimizer = training.classifier, training.classifier_optimizer
    assert torch.equal(weight, classifier.weight.detach()[5:30])
    assert torch.equal(momentum, optimizer.state[classifier.weight]["momentum_buffer"][5:30])
    assert [entry for entry in new.allocated if entry[1] >= 25 * 16 * 4] == [((25, 16), 25 * 16 * 4)] * 2


# -------------------------------------------------------------------------------- --keep-checkpoints
def make_checkpoints(out, positions):
    for epoch, step in positions:
        (out / checkpoint_name(epoch, step)).mkdir(parents=True)
        (out / checkpoint_name(epoch, step) / "state.pt").write_bytes(b"state")


@pytest.mark.parametrize("keep, existing, written, left", [
    (2, [(1, 0), (2, 0), (3, 0)], (3, 0), ["checkpoint-0002", "checkpoint-0003"]),
    (1, [(1, 0), (2, 0), (3, 0)], (3, 0), ["checkpoint-0003"]),
    (3, [(1, 0), (2, 0)], (2, 0), ["checkpoint-0001", "checkpoint-0002"]),
    (0, [(1, 0), (2, 0), (3, 0)], (3, 0), ["checkpoint-0001", "checkpoint-0002", "checkpoint-0003"]),
    # a stop inside epoch 3 is newer than the checkpoint of epoch 2, and older than epoch 3's
    (1, [(1, 0), (2, 0), (2, 7)], (2, 7), ["checkpoint-0002-step-000007"]),
    (2, [(1, 0), (2, 0), (2, 7)], (2, 7), ["checkpoint-0002", "checkpoint-0002-step-000007"]),
    (2, [(2, 0), (2, 7), (3, 0)], (3, 0), ["checkpoint-0002-step-000007", "checkpoint-0003"]),
    # --resume named checkpoint-0002 of a run that had gone on to 5: 5 is not this run's to delete, 3 stays
    (1, [(1, 0), (2, 0), (3, 0), (5, 0)], (3, 0), ["checkpoint-0003", "checkpoint-0005"]),
])
def test_the_newest_checkpoints_stay_and_never_the_one_just_written_goes(keep, existing, written, left, tmp_path):
    make_checkpoints(tmp_path, existing)
    (tmp_path / "checkpoint-0000").mkdir()  # no state.pt: not a checkpoint, not counted, not touched
    deleted = checkpoints.prune_checkpoints(tmp_path, keep, tmp_path / checkpoint_name(*written))
    assert names(tmp_path) == left
    assert sorted(path.name for path in deleted) == sorted(set(checkpoint_name(*p) for p in existing) - set(left))
    assert (tmp_path / "checkpoint-0000").is_dir() and not hidden_checkpoints(tmp_path)


def test_keep_checkpoints_is_documented_with_its_default_and_judged():
    import trainer as trainer_module
    help_text = " ".join(trainer_module.parser.format_help().split())
    assert "--keep-checkpoints KEEP_CHECKPOINTS complete checkpoints kept in --out" in help_text
    assert "0 keeps every one. --out holds N + 1 while the next one is written (default: 2)" in help_text
    with pytest.raises(UsageError, match=r"--keep-checkpoints must be >= 0 \(0 keeps every one\), got -1"):
        trainer_module.resolve_config(trainer_module.parser.parse_args(["--keep-checkpoints", "-1"]))


# -------------------------------------------------------------------------------- a full disk, one rank
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_write(tiny_run, tmp_path, monkeypatch):
    config, training = tiny_run
    first = checkpoints.save_checkpoint(tmp_path, 1, config, training)
    before = digest(first)
    writes = []
    monkeypatch.setattr(checkpoints.torch, "save", lambda *args, **kwargs: writes.append(args[1]))
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=0, free=4096))
    with pytest.raises(UsageError) as refused:
        checkpoints.save_checkpoint(tmp_path, 2, config, training)
    message = str(refused.value)
    size = checkpoints.checkpoint_bytes(first)  # checkpoint 2 is as large as checkpoint 1
    assert message.startswith("cannot write checkpoint-0002: it needs ") and size <= needed_bytes(message) < 1.1 * size
    assert f"and 4.0 KiB were free on the file system of {tmp_path}; nothing of it was written, checkpoint-0001 " \
        f"is intact: free some space (or lower --keep-checkpoints) and --resume auto continues from it" in message
    assert "\n" not in message and writes == []
    assert names(tmp_path) == ["checkpoint-0001"] and digest(first) == before and not hidden_checkpoints(tmp_path)


def test_a_write_that_fails_leaves_nothing_of_the_checkpoint(tiny_run, tmp_path, monkeypatch):
    config, training = tiny_run
    real_save = torch.save

    def state_cut_short(obj, path, *args, **kwargs):
        if path.name == "state.pt":  # after the shards: some files of the checkpoint are on disk
            path.write_bytes(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10496 vs 10390\n"
                               "frame #0: c10::Error::Error")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", state_cut_short)
    with pytest.raises(UsageError) as failed:
        checkpoints.save_checkpoint(tmp_path, 1, config, training, step_losses=[1.0, 2.0])
    assert str(failed.value).startswith("cannot write checkpoint-0001-step-000002: rank 0 failed writing state.pt "
                                        "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos "
                                        "10496 vs 10390); it needs ")
    assert str(failed.value).endswith(f"when it started; nothing of it was kept, there is no earlier checkpoint: "
                                      f"--resume auto would start afresh")
    assert list(tmp_path.iterdir()) == []


def test_what_a_killed_save_or_deletion_left_goes_at_the_next_save(tiny_run, tmp_path):
    config, training = tiny_run
    for leftover in (partial_checkpoint(tmp_path / "checkpoint-0003"), tmp_path / ".checkpoint-0001.deleting"):
        leftover.mkdir()
        (leftover / "shard-0.pt").write_bytes(b"x" * 1000)
    checkpoints.save_checkpoint(tmp_path, 2, config, training)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-0002"]


def test_a_real_full_file_system_is_one_line_and_the_previous_checkpoint_stays(tiny_run, small_file_system,
                                                                                 monkeypatch):
    """On a real tmpfs: the refusal reports the file system's real free space; with the estimate made wrong on
    purpose the write itself fails with the real writer's error, and the partial checkpoint goes."""
    config, training = tiny_run
    out = small_file_system.path
    first = checkpoints.save_checkpoint(out, 1, config, training)
    size = checkpoints.checkpoint_bytes(first)
    small_file_system.resize(f"{(size + size // 2) // 1024}k")  # room for 1.5 checkpoints
    before = digest(first)
    with pytest.raises(UsageError, match=f"cannot write checkpoint-0002: it needs .* and "
                                         f"{human_bytes(small_file_system.free())} were free") as refused:
        checkpoints.save_checkpoint(out, 2, config, training)
    assert "checkpoint-0001 is intact" in str(refused.value)
    monkeypatch.setattr(checkpoints, "estimated_file_bytes", lambda obj: 0)  # the check passes, the disk fills
    with pytest.raises(UsageError, match=r"cannot write checkpoint-0002: rank 0 failed writing (shard-0|state)\.pt "
                                         r"\((RuntimeError|OSError): .*\); it needs 0 B and .* were free on the file "
                                         r"system of .* when it started; nothing of it was kept, checkpoint-0001 is "
                                         r"intact") as failed:
        checkpoints.save_checkpoint(out, 2, config, training)
    assert "\n" not in str(failed.value)
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-0001"] and digest(first) == before
    with pytest.raises(UsageError, match=f"cannot write {out / 'backbone.pth'}: (RuntimeError|OSError): .*; it "
                                         f"needs 0 B and .* were free on its file system when it started"):
        checkpoints.write_file({"weight": torch.zeros(2**20)}, out / "backbone.pth")  # 4 MiB: more than is left
    assert not (out / "backbone.pth").exists()


# -------------------------------------------------------------------------------- P = 2 trainer runs
# 4 steps per epoch at P = 2 on the tiny data (120 images / (2 ranks x 16)), a checkpoint after each epoch.
RUN = [*SMALL, "--batch-size", "16", "--save-every", "1", "--knn-every", "0"]


def training_epochs(out):
    return [m["epoch"] for m in read_metrics(out) if "epoch_loss" in m]


@pytest.mark.horovod
def test_keep_checkpoints_at_p2_counts_a_stop_inside_an_epoch_as_the_newest(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = trainer("--data", tiny_dataset, "--out", out, *RUN, "--epochs", "3", "--keep-checkpoints", "2",
                     check=False, env={TEST_FAULT_VARIABLE: "1:3:2:SIGTERM"})
    assert result.returncode != 0 and "stopped by SIGTERM after epoch 3 step 2" in result.stderr
    assert names(out) == ["checkpoint-0002", "checkpoint-0002-step-000002"]
    assert "wrote checkpoint-0002-step-000002: " in result.stdout
    assert "; deleted checkpoint-0001 (--keep-checkpoints 2)" in result.stdout
    trainer("--data", tiny_dataset, "--out", out, *RUN, "--epochs", "3", "--keep-checkpoints", "2")
    assert names(out) == ["checkpoint-0002-step-000002", "checkpoint-0003"] and not hidden_checkpoints(out)
    assert training_epochs(out) == [1, 2, 3]


@pytest.mark.horovod
def test_a_failed_write_and_a_full_file_system_at_p2_are_one_line_on_every_rank_and_the_resume_finishes(
        tiny_dataset, small_file_system):
    """--out on a tmpfs. First a write that fails on rank 1 (tests/workers/trainer_full_disk.py) at the second
    checkpoint: one line on every rank, nothing of it kept. Then, the tmpfs cut to room for 1.5 checkpoints, the
    second is refused on every rank with the real free space before any write. Once the file system is grown,
    --resume auto finishes the run from the first checkpoint, intact throughout, with every epoch once in
    metrics.jsonl."""
    out = small_file_system.path / "run"
    result = run_horovod(2, WORKERS / "trainer_full_disk.py", "1", "checkpoint-0002", "--data", tiny_dataset,
                         "--out", out, *RUN, "--epochs", "2", check=False)
    assert result.returncode != 0
    first = out / "checkpoint-0001"
    for rank in (0, 1):
        lines = rank_lines(result.stderr, rank)
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: cannot write checkpoint-0002: rank 1 failed writing shard-1.pt "
                                   "(RuntimeError: basic_ios::clear: iostream error); it needs "), lines
        assert lines[0].endswith(f"when it started; nothing of it was kept, checkpoint-0001 is intact: free some "
                                 f"space (or lower --keep-checkpoints) and --resume auto continues from it"), lines
    assert names(out) == ["checkpoint-0001"] and not hidden_checkpoints(out)
    before = digest(first)

    size, used = checkpoints.checkpoint_bytes(first), shutil.disk_usage(small_file_system.path).used
    small_file_system.resize(f"{(used + size // 2) // 1024 + 1}k")
    result = trainer("--data", tiny_dataset, "--out", out, *RUN, "--epochs", "2", check=False)
    assert result.returncode != 0
    free = human_bytes(small_file_system.free())  # nothing was written since the check
    for rank in (0, 1):
        lines = rank_lines(result.stderr, rank)
        assert len(lines) == 1 and size <= needed_bytes(lines[0]) < 1.1 * size, result.stderr
        assert re.fullmatch(f"error: cannot write checkpoint-0002: it needs [^ ]+ [KMG]iB and {re.escape(free)} were "
                            f"free on the file system of {re.escape(str(out))}; nothing of it was written, "
                            f"checkpoint-0001 is intact: free some space \\(or lower --keep-checkpoints\\) and "
                            f"--resume auto continues from it", lines[0]), lines
    assert names(out) == ["checkpoint-0001"] and digest(first) == before and not hidden_checkpoints(out)

    small_file_system.resize("64m")
    result = trainer("--data", tiny_dataset, "--out", out, *RUN, "--epochs", "2")
    assert f"resumed from {first}" in result.stdout
    assert names(out) == ["checkpoint-0001", "checkpoint-0002"] and digest(first) == before
    assert training_epochs(out) == [1, 2]


# -------------------------------------------------------------------------------- the files of a run on a GPU
class DeviceTensor(torch.Tensor):
    """A stand-in for a CUDA tensor on a machine without CUDA: it says it lives on cuda:0 (`device`, `is_cuda`),
    every op runs on the host tensor it wraps and returns a DeviceTensor, and a copy to the CPU (`.cpu()`,
    `.to("cpu")`) is a plain host tensor, as for a CUDA tensor. torch.save writes it as what it is, not as host
    data, and a plain torch.load refuses the file, as it refuses one holding CUDA storages where there is no CUDA
    (test_the_stand_in_fails_a_plain_load_as_a_cuda_tensor_does)."""

    @staticmethod
    def __new__(cls, host):
        wrapper = torch.Tensor._make_wrapper_subclass(cls, host.shape, strides=host.stride(), dtype=host.dtype,
                                                      device=torch.device("cuda", 0), requires_grad=host.requires_grad)
        wrapper.host = host
        return wrapper

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*tree_map(host_of, args), **tree_map(host_of, kwargs))
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            return result  # the copy to the host
        return tree_map(lambda value: DeviceTensor(value) if isinstance(value, torch.Tensor) else value, result)


def host_of(value):
    return value.host if isinstance(value, DeviceTensor) else value


def on_stand_in_device(training):
    """A copy of the run's TrainingState with every parameter, buffer and optimizer state on the stand-in device, as
    module.to("cuda") and the optimizer steps after it leave them."""
    training = copy.deepcopy(training)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # a tensor subclass is swapped in, not assigned
    try:
        for module in (training.backbone, training.head, training.classifier):
            module._apply(DeviceTensor)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for optimizer in (training.encoder_optimizer, training.classifier_optimizer):
        for state in optimizer.state.values():
            state.update({key: DeviceTensor(value) for key, value in state.items() if isinstance(value, torch.Tensor)})
    return training


def plain_load(path):
    """torch.load(path) as a user on a machine without a GPU calls it: no map_location (weights_only, torch's
    default); asserts that every tensor in it is a plain host tensor."""
    loaded = torch.load(path)
    assert all(type(tensor) is torch.Tensor and tensor.device.type == "cpu" for tensor in tensors_of(loaded)), path
    return loaded


def test_the_stand_in_fails_a_plain_load_as_a_cuda_tensor_does(tmp_path):
    host = torch.arange(6.0).reshape(2, 3)
    on_device = DeviceTensor(host)
    assert on_device.is_cuda and torch.equal(on_device.cpu(), host) and type(on_device.cpu()) is torch.Tensor
    torch.save({"weight": on_device}, tmp_path / "as-is.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "as-is.pt")


def test_a_checkpoint_of_a_run_on_the_device_loads_on_a_machine_without_one(tiny_run, tmp_path):
    """Every file save_checkpoint writes from objects on the device holds host tensors only, the same as from the
    objects on the host."""
    config, training = tiny_run
    on_device = checkpoints.save_checkpoint(tmp_path / "device", 1, config, on_stand_in_device(training))
    for name in ("state.pt", "shard-0.pt"):
        plain_load(on_device / name)
    assert_checkpoints_bitwise_equal(checkpoints.save_checkpoint(tmp_path / "host", 1, config, training), on_device)


@pytest.mark.parametrize("small_stem, width", [(False, 64), (True, 8)], ids=["torchvision", "own-layout"])
def test_the_backbone_of_a_run_on_the_device_loads_on_a_machine_without_one(small_stem, width, tmp_path):
    """backbone.pth as pretraining writes it: the torchvision export with its zero fc, or (small stem, other
    width) the state_dict in this project's layout; both from the device."""
    from model.export import export_backbone
    from model.resnet import build_backbone
    backbone = build_backbone("resnet18", small_stem=small_stem, width=width)
    on_device = on_stand_in_device(checkpoints.TrainingState(
        backbone, torch.nn.Identity(), torch.optim.SGD(backbone.parameters()), torch.nn.Identity(),
        torch.optim.SGD(backbone.parameters()))).backbone.state_dict()
    exported = on_device if small_stem else export_backbone(on_device)
    checkpoints.write_file(exported, tmp_path / "backbone.pth")
    loaded = plain_load(tmp_path / "backbone.pth")
    assert list(loaded) == list(exported)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in backbone.state_dict().items())


# -------------------------------------------------------------------------------- what a run reads back
class CreatesMarker:
    """A payload: unpickling it calls open(marker, "w"), which creates the file (pickle calls what __reduce__
    names)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def rewritten(path, edit):
    """Rewrite the torch.save file at `path` with what edit(its content) returns, as its author would: trusting it."""
    torch.save(edit(torch.load(path, weights_only=False)), path)


def edited(**changes):
    return lambda loaded: {**loaded, **changes}


def edited_config(**changes):
    return lambda state: {**state, "config": {**state["config"], **changes}}


def with_marker_in_config(marker):
    return edited_config(data=CreatesMarker(marker))


def without(*keys):
    return lambda loaded: {key: value for key, value in loaded.items() if key not in keys}


def plain_pickle(marker):
    """Not torch.save's zip layout: a pickle with a payload, as torch.load also reads it."""
    return lambda path: path.write_bytes(pickle.dumps({"backbone": CreatesMarker(marker)}, protocol=2))


@pytest.mark.parametrize("name, write, message", [
    ("state.pt", lambda marker: lambda path: rewritten(path, with_marker_in_config(marker)),
     "{file} is refused: it holds io.open besides tensors and plain values; nothing in it was run"),
    ("shard-0.pt", lambda marker: lambda path: rewritten(path, edited(note=CreatesMarker(marker))),
     "{file} is refused: it holds io.open besides tensors and plain values; nothing in it was run"),
    ("state.pt", plain_pickle, "{file} is not a file torch.save wrote: not a zip archive"),
    ("state.pt", lambda marker: lambda path: path.write_bytes(b"not a checkpoint"),
     "{file} is not a file torch.save wrote: not a zip archive"),
    ("state.pt", lambda marker: lambda path: path.write_bytes(b""),
     "{file} is not a file torch.save wrote: not a zip archive"),
    ("state.pt", lambda marker: lambda path: zipfile.ZipFile(path, "w").writestr("data.txt", "a zip of another kind"),
     "{file} is not a file torch.save wrote (RuntimeError: "),
    ("state.pt", lambda marker: lambda path: rewritten(path, lambda state: list(state)),
     "{file} is not a checkpoint file of this trainer: it holds a list"),
    ("state.pt", lambda marker: lambda path: rewritten(path, without("step_losses", "rng")),
     "{file} is not a checkpoint file of this trainer: it lacks rng, step_losses"),
    ("state.pt", lambda marker: lambda path: rewritten(path, edited(epoch="1")),
     "{file} is not a checkpoint file of this trainer: its epoch is '1', not an int >= 0"),
    ("state.pt", lambda marker: lambda path: rewritten(path, edited(metrics_lines=-1)),
     "{file} is not a checkpoint file of this trainer: its metrics_lines is -1, not an int >= 0"),
    ("state.pt", lambda marker: lambda path: rewritten(path, edited(step_losses=["nan"])),
     "{file} is not a checkpoint file of this trainer: its step_losses and diagnostics are not lists of numbers"),
    ("state.pt", lambda marker: lambda path: rewritten(path, edited(num_shards=10**12)),
     "{file} names 1000000000000 shard files, and {checkpoint} does not hold shard-999999999999.pt"),
    ("shard-0.pt", lambda marker: lambda path: rewritten(path, edited(weight=[[0.0]])),
     "{file} is not a checkpoint file of this trainer: its weight is [[0.0]], not Tensor"),
    ("state.pt", lambda marker: lambda path: rewritten(path, edited(rng=torch.zeros(3, dtype=torch.uint8))),
     "it does not fit this run ("),
], ids=["payload", "shard-payload", "plain-pickle", "junk", "empty", "other-zip", "not-a-dict", "lacks-keys",
        "epoch-type", "negative-lines", "losses-type", "shards-absent", "shard-weight-type", "rng-size"])
def test_a_file_that_is_not_such_a_checkpoint_stops_a_resume_in_one_line_naming_it(name, write, message, tiny_run,
                                                                                 tmp_path):
    config, training = tiny_run
    written = checkpoints.save_checkpoint(tmp_path, 1, config, training)
    marker = tmp_path / "marker"
    write(marker)(written / name)
    with pytest.raises(UsageError) as refused:
        checkpoints.restore_checkpoint(written, copy.deepcopy(training))
    assert str(refused.value).startswith(f"cannot resume from {written}: ") and "\n" not in str(refused.value)
    assert message.format(file=written / name, checkpoint=written) in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("changes, message", [
    ({"width": 0}, "--width must be positive, got 0"),
    ({"smooth_alpha": 1.5}, "--smooth-alpha must be in [0, 1), got 1.5"),
    ({"width": "8"}, "--width '8': not an integer"),
    ({"width": True}, "--width True: not an integer"),
    ({"lr": "0.3"}, "--lr '0.3': not a number"),
    ({"arch": "resnet1000"}, "--arch 'resnet1000': not one of resnet18, resnet50"),
    ({"small_stem": 1}, "--small-stem 1: not true or false"),
    ({"data": ["/elsewhere"]}, "--data ['/elsewhere']: not a string"),
    ({"out": {"path": "/elsewhere"}}, "--out {'path': '/elsewhere'}: not a string"),
    ({"crop_ratio": "1"}, "crop_ratio '1': not a number"),
])
def test_a_saved_config_is_judged_as_the_flags_are(changes, message):
    """The checks of the command line (its ranges in the same words) and what its parser ensures (types, choices)."""
    import trainer as trainer_module
    saved = {**vars(trainer_module.resolve_config(trainer_module.parser.parse_args([]))), **changes}
    with pytest.raises(UsageError) as refused:
        trainer_module.saved_config(saved, "run/checkpoint-0001/state.pt")
    assert str(refused.value) == f"run/checkpoint-0001/state.pt holds a config that the flags refuse: {message}"
    if "must be" in message:  # the command line's own line
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in changes.items()]
        with pytest.raises(UsageError, match=re.escape(message)):
            trainer_module.resolve_config(trainer_module.parser.parse_args(flags))


def test_a_saved_config_before_a_flag_existed_takes_the_flags_default():
    import trainer as trainer_module
    saved = vars(trainer_module.resolve_config(trainer_module.parser.parse_args(["--width", "8"])))
    config = trainer_module.saved_config(without("blur", "keep_checkpoints")(saved), "state.pt")
    assert (config.width, config.blur, config.keep_checkpoints) == (8, True, 2)


# -------------------------------------------------------------------------------- every command that reads one
# A 1-epoch run of one process, its checkpoint at the end.
ONE_PROCESS_RUN = [*SMALL, "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--knn-every", "0"]


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer("--data", tiny_dataset, "--out", out, *ONE_PROCESS_RUN, num_ranks=None)
    return out


def copied_run(finished_run, tmp_path, edit=None, name="state.pt"):
    """A copy of the finished run, its checkpoint's file `name` rewritten by `edit`."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if edit is not None:
        rewritten(run / "checkpoint-0001" / name, edit)
    return run


READERS = {  # every command that reads a checkpoint back: argv of `trainer.py`, given the run and the data
    "knn": lambda run, data: ["knn", "--ckpt", run],
    "linear": lambda run, data: ["linear", "--ckpt", run, "--epochs", "1"],
    "export": lambda run, data: ["export", "--ckpt", run, "--to", run / "exported.pth"],
    "resume": lambda run, data: ["--data", data, "--out", run, *ONE_PROCESS_RUN, "--epochs", "2"],
}


def assert_one_line_error(result, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


@pytest.fixture
def in_process(monkeypatch, capsys, single_engine):
    """in_process(*argv): trainer.py's main() on argv in this process, the single engine its process group
    (tests/trainer_runs.py's main_in_process)."""
    return lambda *argv: main_in_process(monkeypatch, capsys, *argv)


@pytest.mark.horovod
@pytest.mark.parametrize("command", READERS)
def test_a_checkpoint_carrying_a_payload_runs_nothing_under_every_command(command, finished_run, tiny_dataset,
                                                                          tmp_path, in_process):
    marker = tmp_path / "marker"
    run = copied_run(finished_run, tmp_path, with_marker_in_config(marker))
    assert_one_line_error(in_process(*READERS[command](run, tiny_dataset)), f"{run / 'checkpoint-0001' / 'state.pt'} "
                          f"is refused: it holds io.open besides tensors and plain values; nothing in it was run")
    assert not marker.exists() and not (run / "exported.pth").exists() and not (run / "checkpoint-0002").exists()


@pytest.mark.horovod
def test_a_checkpoint_carrying_a_payload_is_refused_on_every_rank(finished_run, tmp_path):
    from tests.test_reliability import assert_every_rank_stopped_with
    marker = tmp_path / "marker"
    run = copied_run(finished_run, tmp_path, with_marker_in_config(marker))
    result = trainer("knn", "--ckpt", run, check=False)
    assert result.returncode != 0
    assert_every_rank_stopped_with(result.stderr, f"error: {run / 'checkpoint-0001' / 'state.pt'} is refused: ")
    assert not marker.exists()


@pytest.mark.horovod
def test_a_hostile_saved_config_is_the_command_lines_one_line(finished_run, tmp_path, in_process):
    run = copied_run(finished_run, tmp_path, edited_config(width=0))
    assert_one_line_error(in_process("knn", "--ckpt", run),
                          f"{run / 'checkpoint-0001' / 'state.pt'} holds a config that the flags refuse: --width must "
                          f"be positive, got 0")


def to_older_format(state):
    """state.pt as it was before the config was saved as a dict: an argparse.Namespace, and none of the keys
    added since."""
    return {**without("step_losses", "metrics_lines", "diagnostics")(state),
            "config": argparse.Namespace(**state["config"])}


@pytest.mark.horovod
def test_a_checkpoint_of_the_older_format_is_refused_naming_a_conversion_that_works(finished_run, tiny_dataset,
                                                                                     tmp_path, in_process):
    run = copied_run(finished_run, tmp_path, to_older_format)
    rewritten(run / "checkpoint-0001" / "shard-0.pt", without("batchnorm"))
    state = run / "checkpoint-0001" / "state.pt"
    for command in ("knn", "resume"):
        result = in_process(*READERS[command](run, tiny_dataset))
        assert_one_line_error(result, f"{state} is of the older checkpoint format (its config an argparse.Namespace)"
                                      f", which is not read: if you trust the file, convert it once with python -c ")
    conversion = result.stderr.strip().split("convert it once with python ")[1]
    assert conversion.endswith(f" {state}")
    subprocess.run(f"{sys.executable} {conversion}", shell=True, check=True)
    knn, resume = (in_process(*READERS[command](run, tiny_dataset)) for command in ("knn", "resume"))
    assert knn.returncode == 0 and "kNN of" in knn.stdout, knn.stderr
    assert resume.returncode == 0 and f"resumed from {state.parent}" in resume.stdout, resume.stderr
    assert names(run) == ["checkpoint-0001", "checkpoint-0002"]


@pytest.mark.horovod
def test_nothing_read_back_makes_a_run_write_outside_its_out(finished_run, tiny_dataset, tmp_path, in_process):
    """The paths a checkpoint's config names (its --out, --resume, --data) point elsewhere: a resume from it into
    another --out and a kNN of it write nothing there, and the resume leaves the checkpoint read untouched."""
    elsewhere = tmp_path / "elsewhere"
    run = copied_run(finished_run, tmp_path, edited_config(out=str(elsewhere), resume=str(elsewhere / "run"),
                                                            data=str(elsewhere / "data")))
    before = digest(run / "checkpoint-0001")
    out = tmp_path / "resumed"
    for argv in (["--data", tiny_dataset, "--out", out, *ONE_PROCESS_RUN, "--epochs", "2", "--resume",
                  run / "checkpoint-0001"], ["knn", "--ckpt", run]):
        result = in_process(*argv)
        assert result.returncode == 0, result.stderr
    assert not elsewhere.exists() and digest(run / "checkpoint-0001") == before and names(run) == ["checkpoint-0001"]
    assert names(out) == ["checkpoint-0002"]
