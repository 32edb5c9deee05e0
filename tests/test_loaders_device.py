"""Every consumer of the loaders gets its batches on the rank's device, whatever device DALI made them on
(--dali-device cpu on a GPU machine): the meta device stands in for the GPU, and pinning (which needs CUDA) is
recorded."""
import pytest
import torch


class FirstBatchSeen(Exception):
    """Raised by the stand-in network at the first batch it is given: its consumer has shown where it gets them."""


class DeviceRecorder(torch.nn.Module):
    """A network that records the device of the images it is given (through `record`, so that a deep copy of it
    records to the same list), then stops its caller."""

    feature_dim = 8

    def __init__(self, record):
        super().__init__()
        self.record = record

    def forward(self, images):
        self.record(images.device)
        raise FirstBatchSeen


@pytest.fixture
def rank_on_another_device(monkeypatch, single_engine):
    """The rank's device is the meta device, a stand-in for its GPU: not where DALI's CPU pipeline (or the CPU)
    makes batches. Returns the devices of the tensors pinned on the way (pinning needs CUDA: recorded only)."""
    single_engine.device = torch.device("meta")
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor: pinned.append(tensor.device) or tensor)
    return pinned


@pytest.fixture(scope="module")
def labelled_index(tmp_path_factory):
    from data.index import build_index
    from tests.workers.data_images import write_images
    folder = tmp_path_factory.mktemp("labelled")
    write_images(folder, 12, classes=3)
    return build_index(folder, out_dir=folder / "out", log=lambda message: None)


def run_config(data):
    import trainer
    config = trainer.resolve_config(trainer.parser.parse_args([
        "--data", str(data), "--dali-device", "cpu", "--batch-size", "4", "--image-size", "16", "--threads", "1",
        "--epochs", "2", "--warmup-epochs", "0", "--instances", "12"]))
    config.base_lr = config.lr  # what pretraining derives before its first epoch
    return config


def pretraining(network, index, config, device):
    import trainer
    from data.loaders import pretrain_loader
    from run.run_log import RunLog
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    training = trainer.TrainingState(network, network, optimizer, None, optimizer)
    trainer.train_one_epoch(0, pretrain_loader(index, config, 0), training, config, RunLog(None, False), diagnostics=None)


def raw_feature_init(network, index, config, device):
    from model.initialisation import raw_feature_init
    raw_feature_init(network, network, None, index, config)


def baseline_calibration(network, index, config, device, monkeypatch):
    from model import evaluation
    monkeypatch.setattr(evaluation, "build_encoder", lambda config, device: (network, None))
    evaluation.baselines(config, device, index)


def knn(network, index, config, device):
    from model.evaluation import knn_monitor
    knn_monitor(network, index, index, config, device)


def linear_evaluation(network, index, config, device):
    from types import SimpleNamespace

    from model.evaluation import linear_evaluation
    from run.run_log import RunLog
    settings = SimpleNamespace(epochs=1, lr=0.1, momentum=0.9, weight_decay=0.0, milestones=[], batch_size=4)
    linear_evaluation(network, index, index, config, settings, device, RunLog(None, False))


@pytest.mark.parametrize("consumer", [pretraining, raw_feature_init, baseline_calibration, knn, linear_evaluation])
def test_every_consumer_gets_dali_cpu_batches_on_the_ranks_device(consumer, labelled_index, rank_on_another_device,
                                                                  monkeypatch):
    """--dali-device cpu on a GPU machine: the training step, the raw-feature init, the baselines' BatchNorm
    calibration, the kNN pass and the linear evaluation each get their images on the rank's device, pinned on
    the host first (so the copy does not make the host wait)."""
    seen, device = [], torch.device("meta")
    arguments = dict(monkeypatch=monkeypatch) if consumer is baseline_calibration else {}
    with pytest.raises(FirstBatchSeen):
        consumer(DeviceRecorder(seen.append), labelled_index, run_config(labelled_index.root), device, **arguments)
    assert seen == [device]
    assert rank_on_another_device and set(rank_on_another_device) == {torch.device("cpu")}


def test_synthetic_batches_are_made_on_the_ranks_device(rank_on_another_device, tmp_path):
    seen = []
    config = run_config("synthetic")
    with pytest.raises(FirstBatchSeen):
        pretraining(DeviceRecorder(seen.append), None, config, torch.device("meta"))
    assert seen == [torch.device("meta")] and rank_on_another_device == []  # made there: nothing to copy


def test_ids_come_on_the_ranks_device_and_a_batch_already_there_is_not_copied(labelled_index,
                                                                               rank_on_another_device):
    from data.loaders import eval_loader
    from data.pipelines import to_device
    images, ids = next(iter(eval_loader(labelled_index, run_config(labelled_index.root))))
    assert images.device == ids.device == torch.device("meta") and ids.dtype == torch.int64
    batch = torch.ones(2, 3)
    assert to_device(batch, torch.device("cpu")) is batch and to_device(batch, None) is batch
