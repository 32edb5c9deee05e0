"""trainer.py end to end in real Horovod jobs on a tiny slice of the built-in data."""
import argparse
import copy
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.trainer_runs import (TINY, assert_checkpoints_bitwise_equal, main_in_process, read_metrics, step_losses,
                                trainer, training_records)


@pytest.fixture(scope="module")
def run_two_epochs(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    result = trainer("--data", tiny_dataset, "--out", out, "--epochs", "2", "--save-every", "1", "--knn-every", "1",
                     "--log-every", "1", *TINY)
    return out, result


@pytest.mark.horovod
def test_pretraining_writes_config_metrics_checkpoints_and_backbone(run_two_epochs):
    from model import expected_torchvision_keys
    out, result = run_two_epochs
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 32 and config["num_instances"] == 120
    assert config["torch_threads"] == "1 (OMP_NUM_THREADS)"  # tests/conftest.py sets it
    metrics = read_metrics(out)
    epochs = [m for m in metrics if "epoch_loss" in m]
    assert [m["epoch"] for m in epochs] == [1, 2]
    # 120 images / (2 ranks x 16) -> 4 steps per epoch, every one logged
    assert len(step_losses(metrics, 1)) == 4 and len(step_losses(metrics, 2)) == 4
    assert all(0 < m["epoch_loss"] < 2 * torch.log(torch.tensor(120.0)) for m in epochs)
    for m in epochs:  # the classifier's diagnostics of the epoch (run/diagnostics.py)
        assert 0 <= m["instance_accuracy"] <= 100 and 0 < m["own_probability"] <= 1
        assert 0 <= m["hardest_same_label"] <= 100 and 0 < m["row_norm_min"] <= m["row_norm_mean"] <= m["row_norm_max"]
    knn = [m for m in metrics if "knn20_top1" in m]
    assert [m["epoch"] for m in knn] == [1, 2] and all(0 <= m["knn20_top1"] <= 100 for m in knn)
    for epoch in (1, 2):
        assert sorted(p.name for p in (out / f"checkpoint-000{epoch}").iterdir()) == ["shard-0.pt", "shard-1.pt", "state.pt"]
    assert list(torch.load(out / "backbone.pth")) == expected_torchvision_keys(18)
    assert "global batch 32" in result.stdout and "global batch" not in result.stderr
    assert "engine horovod: 2 ranks; rank 0 cpu; rank 1 cpu; torch threads 1 (OMP_NUM_THREADS); precision fp32; " \
        "HOROVOD_CYCLE_TIME=5 (this trainer's default)" in result.stdout and config["engine"] == "horovod"


@pytest.mark.horovod
def test_resume_continues_bitwise_and_metrics_read_as_one_run(run_two_epochs, tiny_dataset, tmp_path):
    """Killed after epoch 2's records were written but before its checkpoint was complete: the resume from
    checkpoint 1 ends bitwise equal to the uninterrupted run, and metrics.jsonl holds each record once."""
    out, _ = run_two_epochs
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-0002")
    result = trainer("--data", tiny_dataset, "--out", resumed, "--epochs", "2", "--save-every", "1", "--knn-every", "1",
                     "--log-every", "1", *TINY)
    assert "resumed from" in result.stdout and "checkpoint-0001" in result.stdout
    assert len(step_losses(read_metrics(resumed), 2)) == 4  # not 8: the replayed steps replaced the first ones
    assert training_records(resumed) == training_records(out)
    assert_checkpoints_bitwise_equal(out / "checkpoint-0002", resumed / "checkpoint-0002")


@pytest.mark.horovod
def test_checkpoint_of_two_ranks_reshards_exactly(run_two_epochs):
    """Rows written by P = 2 read back for P = 1 and P = 3 are the same rows."""
    from run.checkpoint import load_rows, load_state
    from run.distributed import shard_rows
    checkpoint = run_two_epochs[0] / "checkpoint-0002"
    state = load_state(checkpoint)
    shards = [torch.load(checkpoint / f"shard-{r}.pt") for r in range(2)]
    full_weight = torch.cat([s["weight"] for s in shards])
    full_momentum = torch.cat([s["momentum"] for s in shards])
    weight, momentum, _ = load_rows(checkpoint, 0, 120, 120, state)
    assert torch.equal(weight, full_weight) and torch.equal(momentum, full_momentum)
    for rank in range(3):
        start, stop = shard_rows(120, 3, rank)
        weight, momentum, _ = load_rows(checkpoint, start, stop, 120, state)
        assert torch.equal(weight, full_weight[start:stop]) and torch.equal(momentum, full_momentum[start:stop])


@pytest.mark.horovod
def test_resume_with_one_rank_from_two_rank_checkpoint(run_two_epochs, tiny_dataset, tmp_path, monkeypatch, capsys,
                                                       single_engine):
    """A one-process (P = 1) resume trains on from the rows the two ranks wrote."""
    resumed = tmp_path / "resumed1"
    shutil.copytree(run_two_epochs[0], resumed)
    result = main_in_process(monkeypatch, capsys, "--data", tiny_dataset, "--out", resumed, "--epochs", "3",
                             "--knn-every", "0", *TINY)
    assert result.returncode == 0, result.stderr
    assert "written by 2 ranks" in result.stdout
    assert sorted(p.name for p in (resumed / "checkpoint-0003").iterdir()) == ["shard-0.pt", "state.pt"]
    assert [m["epoch"] for m in read_metrics(resumed) if "epoch_loss" in m] == [1, 2, 3]


@pytest.mark.horovod
def test_linear_evaluation_knn_and_export(run_two_epochs, tmp_path, monkeypatch, capsys, single_engine):
    from model import expected_torchvision_keys
    out, _ = run_two_epochs
    result = trainer("linear", "--ckpt", out, "--epochs", "2", "--batch-size", "32", "--baseline")
    evaluation = [m for m in read_metrics(out) if "evaluation" in m][-1]
    for backbone in ("pretrained", "random init"):
        assert 0 <= evaluation[f"{backbone}/linear_top1"] <= evaluation[f"{backbone}/linear_top5"] <= 100
        assert 0 <= evaluation[f"{backbone}/knn20_top1"] <= 100
    assert "pretrained" in result.stdout and "random init" in result.stdout
    target = tmp_path / "exported" / "backbone.pth"
    for argv in (["knn", "--ckpt", out / "checkpoint-0001"], ["export", "--ckpt", out, "--to", target]):
        done = main_in_process(monkeypatch, capsys, *argv)  # one process, as `python trainer.py ...`
        assert done.returncode == 0, done.stderr
    assert "kNN of" in [m for m in read_metrics(out) if "evaluation" in m][-1]["evaluation"]
    exported = torch.load(target)
    assert list(exported) == expected_torchvision_keys(18)
    state = torch.load(out / "checkpoint-0002" / "state.pt", weights_only=False)
    assert torch.equal(exported["layer4.1.conv2.weight"], state["backbone"]["layer4.1.conv2.weight"])


@pytest.mark.slow
def test_raw_feature_init_writes_each_images_feature(tiny_dataset, tmp_path, single_engine):
    """After the init, row i of W is the normalized head output of image i in eval mode under the BatchNorm
    statistics of the shuffled pass (tests/test_initialisation.py checks those against their oracle), the weights
    are untouched and the encoder is back in train mode."""
    from data.index import build_index
    from data.loaders import eval_loader
    from model.classifier import ShardedInstanceClassifier
    from model.encoder import build_encoder, embed
    from model.initialisation import raw_feature_init
    index = build_index(tiny_dataset / "train", out_dir=tmp_path, log=lambda *_: None)
    config = argparse.Namespace(arch="resnet18", small_stem=True, width=8, hidden_dim=32, feat_dim=16, data=None,
                                batch_size=16, image_size=32, dali_device="cpu", threads=1, crop_ratio=1.0, seed=0,
                                precision="fp32")
    backbone, head = build_encoder(config, torch.device("cpu"))
    classifier = ShardedInstanceClassifier(index.num_instances, 16)
    before = copy.deepcopy((backbone, head))
    raw_feature_init(backbone, head, classifier, index, config)
    assert backbone.training and head.training
    assert not torch.equal(backbone.bn1.running_mean, before[0].bn1.running_mean), "BN statistics must move"
    assert not torch.equal(head.mlp[1].running_var, before[1].mlp[1].running_var), "head BN statistics too"
    assert torch.equal(backbone.conv1.weight, before[0].conv1.weight), "weights must not move"
    calibrated = copy.deepcopy((backbone, head))
    for module in calibrated:
        module.eval()
    seen = set()
    with torch.no_grad():
        for images, ids in eval_loader(index, config, batch_size=7):  # eval mode: batch-size independent
            expected = torch.nn.functional.normalize(embed(*calibrated, images), dim=1)
            assert torch.allclose(classifier.weight[ids], expected, atol=1e-5)
            seen.update(ids.tolist())
    assert seen == set(range(index.num_instances))


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "no such folder"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--smooth-alpha", "1.5"], "--smooth-alpha"),
    (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3.0 must be in [0, --epochs 3)"),
    (["--resume", "/no/such/checkpoint"], "no complete checkpoint"),
    (["linear", "--ckpt", "/no/such/run"], "no complete checkpoint"),
    (["knn", "--ckpt", "/no/such/run"], "no complete checkpoint"),
    (["plan", "--gpus", "0"], "must be positive"),
    (["--smooth-k", "4000"], "--smooth-k 4000: the K hardest classes are among an image's 3,999 other instances"),
    (["plan", "--instances", "5", "--smooth-k", "5"], "K must be below 5"),
    (["--data", "synthetic", "--instances", "1"], "--instances must be at least 2"),
    (["--steps-per-epoch", "3"], "with --data synthetic only"),  # before the built-in data is read
])
def test_bad_flags_and_paths_are_one_line_errors(args, message, tmp_path, monkeypatch, capsys, single_engine):
    """main() in this process; the run that --smooth-k 4000 starts (the single engine) stops once the built-in
    index says how many instances there are."""
    result = main_in_process(monkeypatch, capsys, *args, *(["--out", tmp_path] if args[0].startswith("--") else []))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
        result.stderr


@pytest.mark.slow
def test_a_bad_flag_ends_the_trainer_process_with_status_2_and_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "trainer.py"), "--batch-size", "0", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr == "error: --batch-size must be positive, got 0\n", result.stderr


@pytest.mark.horovod
def test_export_of_a_small_stem_backbone_is_a_one_line_error(reference_run, tmp_path, monkeypatch, capsys):
    small_stem_run, _ = reference_run("horovod")  # tests/trainer_runs.py's SMALL flags
    target = tmp_path / "x.pth"
    result = main_in_process(monkeypatch, capsys, "export", "--ckpt", small_stem_run, "--to", target)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "small-image stem" in result.stderr
    assert not target.exists()


@pytest.mark.horovod
def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(run_two_epochs, tiny_dataset, tmp_path,
                                                                       monkeypatch, capsys, single_engine):
    out = tmp_path / "diverge"
    shutil.copytree(run_two_epochs[0], out)
    handlers = [signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)]
    result = main_in_process(monkeypatch, capsys, "--data", tiny_dataset, "--out", out, "--epochs", "3", *TINY,
                             "--lr", "1e30")
    assert result.returncode == 2, result.stderr
    # The training loop's stop handlers are gone with it, though it ended in an error: this process goes on.
    assert [signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)] == handlers
    assert "at epoch 3 step" in result.stderr and "Traceback" not in result.stderr
    assert (out / "checkpoint-0002" / "state.pt").is_file() and not (out / "checkpoint-0003").exists()


def test_plan_prints_hybrid_and_replicated_memory(monkeypatch, capsys):
    import trainer as trainer_module
    monkeypatch.setenv("COLUMNS", "200")  # the table's rows on one line each
    trainer_module.plan_command(["--instances", "1281167", "--gpus", "64", "--batch-size", "64", "--feat-dim", "128"])
    weight_row = next(line for line in capsys.readouterr().out.splitlines() if "classifier weight" in line)
    # ceil(1281167 / 64) = 20019 rows x 128 x 4 bytes = 9.8 MiB per GPU vs 625.6 MiB replicated
    assert "9.8 MiB" in weight_row and "625.6 MiB" in weight_row
