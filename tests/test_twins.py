"""--twins: the near-duplicate variant of the built-in data (data/builtin.py), the indexes of a run on it
(data/run_index.py: val and the kNN bank without the twins), and bench/experiments/twins.py's measures."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.builtin import (DATASET_NAME, TWIN_BRIGHTNESS, TWIN_MAX_SHIFT, TWIN_QUALITIES, read_twins, shifted,
                          twins_dataset)
from data.run_index import run_indexes, saved_run_indexes
from run.errors import UsageError
from tests.conftest import load_bench_script
from tests.trainer_runs import SMALL, copy_tiny_dataset, read_metrics, trainer

TRAIN_IMAGES = 120  # copy_tiny_dataset: 12 per digit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache whose built-in dataset is the tiny copy, where the trainer's cache looks (XDG_CACHE_HOME)."""
    copy_tiny_dataset(tmp_path / "instance-classifier" / DATASET_NAME)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "instance-classifier"


@pytest.fixture(scope="module")
def twins_bench():
    return load_bench_script("experiments/twins")


def quiet(message):
    pass


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def test_twins_are_recorded_beside_their_unchanged_originals_and_lightly_changed(cache):
    root = twins_dataset(0.3, cache)
    builtin_train = cache / DATASET_NAME / "train"
    pairs = read_twins(root)
    assert len(pairs) == round(0.3 * TRAIN_IMAGES) == len({pair["original"] for pair in pairs})
    files = sorted(path.relative_to(root / "train").as_posix() for path in (root / "train").glob("*/*.jpg"))
    originals = sorted(path.relative_to(builtin_train).as_posix() for path in builtin_train.glob("*/*.jpg"))
    assert files == sorted(originals + [pair["twin"] for pair in pairs])
    assert all((root / "train" / name).read_bytes() == (builtin_train / name).read_bytes() for name in originals)
    assert not (root / "val").exists()
    for pair in pairs:
        assert pair["twin"].split("/")[0] == pair["original"].split("/")[0]  # the same class folder
        assert pair["shift"] != [0, 0] and max(map(abs, pair["shift"])) <= TWIN_MAX_SHIFT
        assert abs(pair["brightness"] - 1) <= TWIN_BRIGHTNESS
        assert TWIN_QUALITIES[0] <= pair["quality"] <= TWIN_QUALITIES[1]
        original, twin = pixels(builtin_train / pair["original"]), pixels(root / "train" / pair["twin"])
        unchanged = np.abs(twin - original).mean()
        # Shifting and brightening the original as the pair says leaves only the re-encoding: far closer than the
        # original itself.
        redone = np.abs(twin - np.clip(shifted(original, *pair["shift"]) * pair["brightness"], 0, 255)).mean()
        assert redone < 4 < unchanged, (pair, redone, unchanged)


def test_twins_are_deterministic(cache, tmp_path_factory):
    other = tmp_path_factory.mktemp("other") / "instance-classifier"
    copy_tiny_dataset(other / DATASET_NAME)
    first, second = twins_dataset(0.3, cache), twins_dataset(0.3, other)
    assert (first / "twins.json").read_text() == (second / "twins.json").read_text()
    for pair in read_twins(first):
        assert (first / "train" / pair["twin"]).read_bytes() == (second / "train" / pair["twin"]).read_bytes()
    assert twins_dataset(0.3, cache) == first and len(read_twins(twins_dataset(0.5, cache))) == 60


def test_a_twins_run_trains_on_the_twins_and_evaluates_on_the_builtin_images(cache, tmp_path, single_engine):
    train, val, bank = run_indexes(None, tmp_path / "run", strict=False, log=quiet, twins=0.3)
    builtin = (cache / DATASET_NAME).resolve()
    assert train.num_instances == TRAIN_IMAGES + 36 and train.root == twins_dataset(0.3).resolve() / "train"
    assert bank.root == builtin / "train" and bank.num_instances == TRAIN_IMAGES
    assert not any(name.endswith("-twin.jpg") for name in bank.files)
    assert np.bincount(bank.labels).tolist() == [12] * 10
    assert val.root == builtin / "val" and val.num_instances == 40
    saved_bank, saved_val = saved_run_indexes(tmp_path / "run")  # what `knn` and `linear` evaluate on
    assert (saved_bank.root, saved_bank.files, saved_val.root) == (bank.root, bank.files, val.root)
    plain_train, _, plain_bank = run_indexes(None, tmp_path / "plain", strict=False, log=quiet)
    assert plain_bank is plain_train and plain_train.root == builtin / "train"
    assert saved_run_indexes(tmp_path / "plain")[0].root == builtin / "train"


@pytest.mark.horovod
def test_two_ranks_write_the_twins_at_once_and_train_on_them(cache, tmp_path):
    twins_root = cache / f"{DATASET_NAME}-twins36-v1"
    assert not twins_root.exists()  # both ranks find no twins and write them: one copy wins the rename
    out = tmp_path / "run"
    trainer("--out", out, "--twins", "0.3", "--epochs", "2", *SMALL, env={"XDG_CACHE_HOME": str(cache.parent)})
    assert [path.name for path in cache.iterdir() if "twins" in path.name] == [twins_root.name]
    metrics = read_metrics(out)
    # 156 instances / (2 ranks x 4 images) = 20 steps an epoch, where the plain 120 images take 15.
    assert max(record["step"] for record in metrics if record.get("epoch") == 1 and "step" in record) == 20
    assert [record["epoch"] for record in metrics if "knn20_top1" in record] == [2]
    assert json.loads((out / "config.json").read_text())["num_instances"] == 156


@pytest.mark.parametrize("argv, message", [(["--twins", "0.3", "--data", "/imagenet"], "it takes no --data"),
                                           (["--twins", "-0.1"], "in [0, 1], got -0.1"),
                                           (["--twins", "1.5"], "in [0, 1], got 1.5")])
def test_bad_twins_flags_are_one_line_errors(argv, message):
    import trainer
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        trainer.resolve_config(trainer.parser.parse_args(argv))


def test_rank_and_probabilities_of_the_twin_match_a_brute_force(twins_bench):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=generator, dtype=torch.float64).round(decimals=1)  # ties happen
    originals, twins = torch.tensor([0, 1, 2, 3, 4, 8]), torch.tensor([5, 7, 3, 0, 6, 4])
    logits[5, [2, 4]] = 10.0  # sample 5 (own class 8, twin 4): class 2 ties with the twin, ahead of it by its id
    measured = twins_bench.pair_measures(logits, originals, twins)
    for sample, (own, twin) in enumerate(zip(originals.tolist(), twins.tolist())):
        # The oracle's order of the other classes (kernels/reference.py): larger logit first, ties to the lower id.
        others = sorted((j for j in range(9) if j != own), key=lambda j: (-logits[sample, j].item(), j))
        assert measured["rank"][sample] == 1 + others.index(twin)
        probabilities = logits[sample].softmax(dim=0)
        assert measured["twin_probability"][sample] == pytest.approx(probabilities[twin].item())
        assert measured["own_probability"][sample] == pytest.approx(probabilities[own].item())
    assert measured["rank"][5] == 2  # class 2 ties with the twin (4) and has the lower id


def test_measure_refuses_a_run_without_twins(twins_bench, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"twins": 0.0}))
    with pytest.raises(UsageError, match="not a run with --twins"):
        twins_bench.measure_run(tmp_path, 10)
