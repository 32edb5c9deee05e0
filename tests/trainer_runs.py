"""What the trainer tests share: a tiny copy of the built-in data, the flags of tiny runs, a launcher, trainer.py's
main() in this process, and readers of what a run writes."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_horovod

# A standard ResNet-18 stem and width (exportable to torchvision) at 32 px: ~37 MFLOPs per image.
TINY = ["--image-size", "32", "--arch", "resnet18", "--width", "64", "--no-small-stem", "--hidden-dim", "64",
        "--feat-dim", "32", "--batch-size", "16", "--threads", "1", "--warmup-epochs", "1", "--lr", "0.3"]
# Width 8 and 4 images per rank: 15 cheap steps per epoch on the tiny data at P = 2, room to stop inside one.
SMALL = ["--image-size", "32", "--arch", "resnet18", "--width", "8", "--small-stem", "--hidden-dim", "32",
         "--feat-dim", "16", "--batch-size", "4", "--threads", "1", "--warmup-epochs", "1", "--lr", "0.3"]
TIMING_FIELDS = ("images_per_s", "seconds")  # the only fields of metrics.jsonl that differ between reruns
# 2 epochs of 15 steps at P = 2, every step logged, a checkpoint after each epoch, the kNN monitor after the last:
# the run that tests interrupt, kill and resume, held to the same run uninterrupted (conftest.py's reference_run).
TWO_EPOCHS = [*SMALL, "--epochs", "2", "--save-every", "1", "--log-every", "1", "--knn-every", "0"]
STEPS_PER_EPOCH = 15  # 120 images / (2 ranks x 4)
# The launchers of multi-rank jobs, as a parameter of the tests whose behaviour must hold under each.
LAUNCHERS = [pytest.param("horovod", marks=pytest.mark.horovod, id="horovodrun"),
             pytest.param("torchrun", marks=pytest.mark.torchrun, id="torchrun")]


def copy_tiny_dataset(root):
    """12 train and 4 val images per digit of the built-in dataset under root (train/ and val/ class folders)."""
    from data.builtin import builtin_dataset
    source = builtin_dataset()
    for split, count in (("train", 12), ("val", 4)):
        for class_folder in sorted((source / split).iterdir()):
            (root / split / class_folder.name).mkdir(parents=True)
            for image in sorted(class_folder.iterdir())[:count]:
                shutil.copy(image, root / split / class_folder.name / image.name)
    return root


def trainer(*args, num_ranks=2, **options):
    return run_horovod(num_ranks, ROOT / "trainer.py", *args, **options)


def main_in_process(monkeypatch, capsys, *argv):
    """trainer.py's main() on argv in this process, as `python trainer.py argv` but for the process start: a
    CompletedProcess (returncode, stdout, stderr). Its exit_now (os._exit, which would end pytest) raises SystemExit
    instead; a main() that returns exited 0. A run or evaluation it starts needs the single_engine fixture."""
    import trainer as trainer_module
    monkeypatch.setattr(sys, "argv", ["trainer.py", *map(str, argv)])
    monkeypatch.setattr(trainer_module, "exit_now", sys.exit)
    capsys.readouterr()
    try:
        trainer_module.main()
        status = 0
    except SystemExit as exited:
        status = exited.code
    written = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, status, written.out, written.err)


def rank_lines(output, rank, launcher="horovod"):
    """What rank `rank` wrote, as the launcher relays it: horovodrun's "[R]<stderr>:line" (of its stderr), torchrun
    --tee's "[defaultR]:line" (of the stream it relays)."""
    prefix = f"[{rank}]<stderr>:" if launcher == "horovod" else f"[default{rank}]:"
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(metrics, epoch):
    return [m["loss"] for m in metrics if m.get("epoch") == epoch and "step" in m]


def training_records(out):
    """metrics.jsonl's training records without their timings: equal for runs that trained the same."""
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in read_metrics(out) if "epoch" in m]


def assert_checkpoints_bitwise_equal(first, second):
    """Every tensor and number of two checkpoint directories equal, but the config (it names --out)."""
    def compare(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                if key != "config":
                    compare(a[key], b[key], f"{where}/{key}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for position, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{position}]")
        elif isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), where
        else:
            assert a == b, where
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        compare(*(torch.load(d / name, weights_only=False) for d in (first, second)), name)
