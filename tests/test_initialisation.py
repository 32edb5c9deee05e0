"""Raw-feature init and BatchNorm calibration (model/initialisation.py) against a float64 oracle, at P = 1 and 2.

The encoder of tests/workers/batchnorm_calibration.py is a BatchNorm1d over the pixels, so its exact statistics
are the mean and variance of each pixel over the dataset. About a fifth of a pixel's variance over these digits lies
between the classes (where the strokes of a 0 and of a 1 lie): class-sorted batches, one digit at a time, capture
0.80-0.84 of the summed variance and shuffled ones 0.97-1.00 (measured with this slice, batches of 25), so the
bounds below tell them apart, and the control case shows that they do.
"""
import shutil

import pytest
import torch

from tests.conftest import WORKERS, run_horovod
from tests.workers.batchnorm_calibration import BATCH_SIZE, IMAGE_SIZE

pytestmark = pytest.mark.horovod  # every test here starts Horovod jobs

IMAGES_PER_CLASS = 30  # 300 images: 12 (P = 1) or 2 x 6 (P = 2) full batches of 25


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(index, pixels [N, 3 S S] float64 in id order) of a 300-image slice of the built-in train split."""
    from data.builtin import builtin_dataset
    from data.index import build_index
    from data.loaders import eval_loader
    from tests.workers.loader_config import ONE_RANK, loader_config
    root = tmp_path_factory.mktemp("digits")
    for class_folder in sorted((builtin_dataset() / "train").iterdir()):
        (root / class_folder.name).mkdir()
        for image in sorted(class_folder.iterdir())[:IMAGES_PER_CLASS]:
            shutil.copy(image, root / class_folder.name / image.name)
    index = build_index(root, out_dir=root.parent / "index", log=lambda *_: None)
    batches = list(eval_loader(index, loader_config(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, crop_ratio=1.0),
                               group=ONE_RANK))
    assert torch.equal(torch.cat([ids for _, ids in batches]), torch.arange(index.num_instances))
    return index, torch.cat([images.flatten(1) for images, _ in batches]).double()


def run_ranks(digits, order, num_ranks, tmp_path):
    index, _ = digits
    run_horovod(num_ranks, WORKERS / "batchnorm_calibration.py", index.path, tmp_path, order, timeout=300)
    return [torch.load(tmp_path / f"rank-{rank}.pt") for rank in range(num_ranks or 1)]


def variance_captured(ranks, pixels):
    """Summed running variance over the summed variance of the pixels over the dataset (the oracle)."""
    return float(ranks[0]["running_var"].double().sum() / pixels.var(dim=0).sum())


@pytest.mark.parametrize("num_ranks", [None, 2])
def test_raw_init_statistics_match_the_dataset_and_rows_are_eval_mode_features(digits, num_ranks, tmp_path):
    _, pixels = digits
    ranks = run_ranks(digits, "raw-init", num_ranks, tmp_path)
    for rank in ranks[1:]:  # one encoder on every rank
        assert torch.equal(rank["running_mean"], ranks[0]["running_mean"])
        assert torch.equal(rank["running_var"], ranks[0]["running_var"])
    mean, var = ranks[0]["running_mean"].double(), ranks[0]["running_var"].double()
    # The running mean is the mean of equal-size batch means: the dataset mean up to fp32 rounding.
    torch.testing.assert_close(mean, pixels.mean(dim=0), atol=1e-5, rtol=1e-5)
    # Each batch's unbiased variance estimates the dataset's; their average over 12 batches is within a few %.
    assert 0.93 < variance_captured(ranks, pixels) < 1.07
    # Row i is image i normalized with those statistics (eval mode: weight 1, bias 0 at init), then unit norm.
    expected = torch.nn.functional.normalize((pixels - mean) / (var + ranks[0]["eps"]).sqrt(), dim=1)
    rows = torch.cat([rank["rows"] for rank in ranks]).double()
    assert [rank["start"] for rank in ranks] == [len(rows) * r // len(ranks) for r in range(len(ranks))]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_ranks", [None, 2])
def test_class_sorted_batches_miss_the_between_class_variance(digits, num_ranks, tmp_path):
    """The control: the same calibration on the id-ordered loader (what the raw-feature pass used to read)."""
    _, pixels = digits
    assert variance_captured(run_ranks(digits, "id-order", num_ranks, tmp_path), pixels) < 0.9
