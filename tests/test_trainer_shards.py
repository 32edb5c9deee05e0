"""trainer.py on WebDataset shards end to end, in real Horovod jobs: the tiny built-in slice packed by `pack`,
pretrained at P = 2 with the kNN monitor, resumed bitwise, evaluated by `linear`; a folder of shards alone trains
without evaluation."""
import json
import shutil

import pytest

from data.pack import pack
from data.run_index import load_index
from tests.trainer_runs import SMALL, assert_checkpoints_bitwise_equal, read_metrics, trainer, training_records

RUN = ["--epochs", "2", "--save-every", "1", "--knn-every", "1", "--log-every", "1", *SMALL, "--batch-size", "8"]


@pytest.fixture(scope="module")
def shards(tiny_dataset, tmp_path_factory):
    to = tmp_path_factory.mktemp("packed") / "shards"
    pack(tiny_dataset, to, samples_per_shard=16, log=lambda message: None)  # 120 train images in 8 shards
    return to


@pytest.fixture(scope="module")
def shard_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    return out, trainer("--data", shards, "--out", out, *RUN)


@pytest.mark.horovod
def test_pretraining_on_shards_indexes_them_and_monitors_knn(shard_run, tiny_dataset):
    out, result = shard_run
    config = json.loads((out / "config.json").read_text())
    assert config["num_instances"] == 120 and config["world_size"] == 2
    index = load_index(out / "index-train")
    assert index.layout == "shards" and len(index.shards) == 8 and index.class_names == [str(d) for d in range(10)]
    assert sorted(index.sources) == sorted(f"{p.parent.name}/{p.name}" for p in (tiny_dataset / "train").glob("*/*"))
    assert load_index(out / "index-val").num_instances == 40
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics if "knn20_top1" in m] == [1, 2]
    assert all(0 <= m["hardest_same_label"] <= 100 for m in metrics if "epoch_loss" in m)  # labels from .cls
    assert "skipped" not in result.stdout


@pytest.mark.horovod
def test_a_resumed_run_on_shards_ends_bitwise_equal(shard_run, shards, tmp_path):
    out, _ = shard_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoint-0002")
    result = trainer("--data", shards, "--out", resumed, *RUN)
    assert "resumed from" in result.stdout and "checkpoint-0001" in result.stdout
    assert training_records(resumed) == training_records(out)
    assert_checkpoints_bitwise_equal(out / "checkpoint-0002", resumed / "checkpoint-0002")


@pytest.mark.horovod
def test_linear_evaluation_of_a_run_on_shards(shard_run):
    out, _ = shard_run
    trainer("linear", "--ckpt", out, "--epochs", "1", "--batch-size", "16")
    evaluation = [m for m in read_metrics(out) if "evaluation" in m][-1]
    assert 0 <= evaluation["pretrained/linear_top1"] <= evaluation["pretrained/linear_top5"] <= 100


@pytest.mark.horovod
def test_a_folder_of_shards_alone_trains_without_evaluation(shards, tmp_path):
    result = trainer("--data", shards / "train", "--out", tmp_path / "run", *SMALL, "--epochs", "1", "--warmup-epochs",
                     "0", "--batch-size", "8", "--no-raw-init")
    assert "kNN monitor and linear evaluation are skipped: no val/ split" in result.stdout
    assert [m["epoch"] for m in read_metrics(tmp_path / "run") if "epoch_loss" in m] == [1]
    assert not any("knn20_top1" in m for m in read_metrics(tmp_path / "run"))
