"""model/evaluation.py: the sharded weighted kNN against a dense float64 oracle at P = 1, 2, 3, and the raw-pixel
baseline against the image files read with PIL."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import WORKERS, run_horovod

NUM_CLASSES = 7
KNN_SETTINGS = ((1, 0.07), (20, 0.07), (200, 0.1))  # k = 200 is more than rank 0's bank shard at P = 3


def knn_problem(bank_size=500, num_queries=301, dim=24, seed=0):
    """(bank, bank labels, queries, query labels): unit rows scattered around one center per class, so that kNN
    is right on most queries but not all."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, dim, generator=generator)

    def draw(count):
        labels = torch.randint(NUM_CLASSES, (count,), generator=generator)
        rows = centers[labels] + 1.5 * torch.randn(count, dim, generator=generator)
        return torch.nn.functional.normalize(rows, dim=1), labels
    return (*draw(bank_size), *draw(num_queries))


def knn_oracle(bank, bank_labels, queries, query_labels):
    """Weighted kNN top-1 (%) in float64 over the whole bank: the k most similar vote exp(s / T) for their class."""
    similarity = queries.double() @ bank.double().T
    accuracy = {}
    for k, temperature in KNN_SETTINGS:
        values, nearest = similarity.topk(k, dim=1)
        votes = torch.zeros(len(queries), NUM_CLASSES, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[nearest], (values / temperature).exp())
        accuracy[f"knn{k}_top1"] = 100.0 * float((votes.argmax(dim=1) == query_labels).double().mean())
    return accuracy


@pytest.mark.parametrize("num_ranks", [None, 2, 3])
@pytest.mark.horovod
def test_sharded_knn_matches_the_dense_oracle(num_ranks, tmp_path):
    run_horovod(num_ranks, WORKERS / "knn_shards.py", tmp_path / "knn.json", timeout=180)
    accuracy = json.loads((tmp_path / "knn.json").read_text())
    expected = knn_oracle(*knn_problem())
    assert accuracy == pytest.approx(expected, abs=1e-9)
    assert 30 < expected["knn20_top1"] < 95, "the problem should be neither trivial nor hopeless"


def test_raw_pixels_are_the_image_files_in_0_1(tmp_path):
    from data.augment import IMAGENET_MEAN, IMAGENET_STD
    from data.builtin import builtin_dataset
    from data.index import build_index
    from data.loaders import eval_loader
    from model.evaluation import RawPixels
    from tests.workers.loader_config import ONE_RANK, loader_config
    index = build_index(builtin_dataset() / "val", out_dir=tmp_path, log=lambda *_: None)
    config = loader_config(batch_size=16, image_size=32, crop_ratio=1.0)
    images, ids = next(iter(eval_loader(index, config, group=ONE_RANK)))
    features = RawPixels(32, IMAGENET_MEAN, IMAGENET_STD)(images)
    assert features.shape == (16, 3 * 32 * 32)
    for row, instance in zip(features, ids.tolist()):
        pixels = np.asarray(Image.open(index.root / index.files[instance]).convert("RGB"), dtype=np.float64) / 255
        torch.testing.assert_close(row.double(), torch.from_numpy(pixels).permute(2, 0, 1).flatten(), atol=1e-5,
                                   rtol=0)
