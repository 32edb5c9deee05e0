"""DALI loaders: exact per-epoch permutations across P=2 Horovod ranks, tensors, seeds (also across processes),
flat memory over a loader per epoch, a released loader's pipeline freed at once, flips on and off, eval crops, bad
images."""
import gc
import json
import math
import os
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import IMAGENET_MEAN, IMAGENET_STD
from data.index import build_index
from data.pack import pack
from data.loaders import eval_loader, linear_train_loader, pretrain_loader
from data.pipelines import UndecodableImage, augmentation_seed
from data.shards import build_shard_index
from tests.conftest import WORKERS, run_horovod
from tests.workers import data_batches
from tests.workers.data_images import image_bytes, write_images
from tests.workers.loader_config import ONE_RANK, loader_config

NUM_IMAGES = 53  # not a multiple of ranks x batch size, so shards and last batches are uneven
NUM_RANKS = 2
BATCH_SIZE = 4  # as in tests/workers/data_epochs.py
EPOCHS = 3
NORMALIZED_RANGE = (-0.485 / 0.229, (1 - 0.406) / 0.225)  # where 0..255 pixels land after normalization


def quiet(message):
    pass


@pytest.fixture(scope="module")
def two_rank_record(tmp_path_factory):
    """What each of 2 Horovod ranks saw from each loader over EPOCHS epochs."""
    folder, out = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("out")
    write_images(folder, NUM_IMAGES, classes=3)
    run_horovod(NUM_RANKS, WORKERS / "data_epochs.py", folder, out, EPOCHS, timeout=300)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(NUM_RANKS)]


@pytest.mark.parametrize("loader", ["pretrain", "linear", "eval"])
@pytest.mark.horovod
def test_each_epoch_is_a_permutation_of_all_ids_across_ranks(two_rank_record, loader):
    for epoch in range(EPOCHS):
        shards = [record[loader]["epoch_ids"][epoch] for record in two_rank_record]
        assert sorted(shards[0] + shards[1]) == list(range(NUM_IMAGES)), f"epoch {epoch}: duplicates or drops"
    batches = math.ceil(math.ceil(NUM_IMAGES / NUM_RANKS) / BATCH_SIZE)
    for record in two_rank_record:
        assert record[loader]["batches_per_epoch"] == batches
        assert len(record[loader]["batches"]) == batches * EPOCHS


@pytest.mark.horovod
def test_ranks_index_the_same_files(two_rank_record):
    assert two_rank_record[0]["files"] == two_rank_record[1]["files"]


@pytest.mark.parametrize("loader", ["pretrain", "linear"])
@pytest.mark.horovod
def test_training_shards_are_reshuffled_every_epoch(two_rank_record, loader):
    first_rank_sets = [frozenset(ids) for ids in two_rank_record[0][loader]["epoch_ids"]]
    assert len(set(first_rank_sets)) == EPOCHS


@pytest.mark.horovod
def test_eval_shards_are_in_id_order_and_fixed(two_rank_record):
    shards = [record["eval"]["epoch_ids"] for record in two_rank_record]
    boundary = NUM_IMAGES // NUM_RANKS  # DALI's shard r holds ids [N r // P, N (r + 1) // P)
    assert shards[0] == [list(range(boundary))] * EPOCHS
    assert shards[1] == [list(range(boundary, NUM_IMAGES))] * EPOCHS


@pytest.mark.parametrize("loader", ["pretrain", "linear", "eval"])
@pytest.mark.horovod
def test_only_the_last_batch_of_an_epoch_is_partial(two_rank_record, loader):
    for rank, record in enumerate(two_rank_record):
        shard_size = (NUM_IMAGES * (rank + 1)) // NUM_RANKS - (NUM_IMAGES * rank) // NUM_RANKS  # 26, then 27
        sizes = [batch["shapes"][0][0] for batch in record[loader]["batches"]]
        per_epoch = record[loader]["batches_per_epoch"]
        for epoch in range(EPOCHS):
            *full, last = sizes[epoch * per_epoch: (epoch + 1) * per_epoch]
            assert full == [BATCH_SIZE] * (per_epoch - 1) and last == shard_size - BATCH_SIZE * (per_epoch - 1)


@pytest.mark.parametrize("loader, views", [("pretrain", 2), ("linear", 1), ("eval", 1)])
@pytest.mark.horovod
def test_batches_have_the_promised_shapes_types_and_values(two_rank_record, loader, views):
    for record in two_rank_record:
        for batch in record[loader]["batches"]:
            assert batch["shapes"] == [[batch["shapes"][0][0], 3, 16, 16]] * views
            assert batch["dtypes"] == ["torch.float32"] * views + ["torch.int64"]
            assert batch["finite"]
            assert NORMALIZED_RANGE[0] - 1e-4 <= batch["min"] <= batch["max"] <= NORMALIZED_RANGE[1] + 1e-4
            if loader == "pretrain":
                assert batch["view_difference"] > 0.05, "the two views of an image should be augmented apart"


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    write_images(folder, 10, seed=1)
    return build_index(folder, out_dir=folder / "out", log=quiet)


def one_epoch(loader):
    return [(torch.cat(views) if isinstance(views, list) else views, ids) for views, ids in loader]


def test_same_seed_gives_the_same_epochs_and_another_seed_does_not(small_index):
    first, again = (pretrain_loader(small_index, loader_config(seed=7), 0, ONE_RANK) for _ in range(2))
    other = pretrain_loader(small_index, loader_config(seed=8), 0, ONE_RANK)
    for _ in range(2):
        expected = one_epoch(first)
        for (views, ids), (same_views, same_ids) in zip(expected, one_epoch(again)):
            assert torch.equal(ids, same_ids) and torch.equal(views, same_views)
        other_epoch = one_epoch(other)
        assert not all(torch.equal(views, other_views) for (views, _), (other_views, _) in zip(expected, other_epoch))


@pytest.fixture(scope="module")
def small_shard_index(tmp_path_factory):
    """10 images packed into 4 shards of up to 3 (data/pack.py)."""
    folder, shards = tmp_path_factory.mktemp("small-folder"), tmp_path_factory.mktemp("small-shards") / "shards"
    write_images(folder, 10, seed=1)
    pack(folder, shards, samples_per_shard=3, log=quiet)
    return build_shard_index(shards, index_dir=shards.parent / "index", log=quiet)


@pytest.mark.parametrize("layout", ["small_index", "small_shard_index"])
@pytest.mark.horovod
def test_a_fresh_process_draws_the_same_epoch_for_the_same_seed_and_rank(layout, request, tmp_path):
    """What resuming relies on: an epoch's loader in a new process equals one built after other loaders here, for an
    image folder and for tar shards."""
    index = request.getfixturevalue(layout)
    seed, rank, world_size = 11, 1, 2
    for _ in pretrain_loader(index, loader_config(seed=seed), 0, ONE_RANK):  # must not matter
        pass
    run_horovod(None, WORKERS / "data_batches.py", index.path, tmp_path / "batches.pt", seed, rank, world_size,
                timeout=120)
    fresh = torch.load(tmp_path / "batches.pt")
    here = data_batches.epochs(index, seed, rank, world_size)
    for loader in ("pretrain", "linear"):
        assert len(fresh[loader]) == len(here[loader]) == 2  # 5 of 10 images on rank 1, 4 a batch
        for (fresh_images, fresh_ids), (images, ids) in zip(fresh[loader], here[loader]):
            assert torch.equal(fresh_ids, ids) and torch.equal(fresh_images, images)


MEMORY_WARMUP_LOADERS = 3
MEMORY_LOADERS = MEMORY_WARMUP_LOADERS + 12
# Without malloc_trim (data/pipelines.py) the resident memory grows by 2-3 MiB a loader on these tiny images,
# tens of MiB over the loaders below; with it, it stays within a few MiB.
MEMORY_GROWTH_MIB = 15


@pytest.mark.horovod
def test_memory_stays_flat_over_a_loader_per_epoch(tmp_path):
    """RSS after each of 15 dropped loaders, in a fresh process: the lowest of the last three within
    MEMORY_GROWTH_MIB of the highest of the warm-up, so that a passing spike cannot fail it but steady growth does."""
    write_images(tmp_path, 256)
    index = build_index(tmp_path, out_dir=tmp_path / "out", log=quiet)
    result = run_horovod(None, WORKERS / "data_memory.py", index.path, MEMORY_LOADERS, timeout=120)
    resident = json.loads(result.stdout.strip().splitlines()[-1])
    growth = min(resident[-3:]) - max(resident[:MEMORY_WARMUP_LOADERS])
    assert growth < MEMORY_GROWTH_MIB, f"RSS grew {growth} MiB; after each loader (MiB): {resident}"


def thread_count():
    """Threads of this process: a DALI pipeline's threads end when the pipeline is freed."""
    return len(os.listdir("/proc/self/task"))


def started_loader(index):
    """A pretraining loader one batch into an epoch (so later batches are prefetched), the epoch, and that batch."""
    loader = pretrain_loader(index, loader_config(threads=3), 0, ONE_RANK)
    epoch = iter(loader)
    return loader, epoch, next(epoch)


@pytest.fixture
def threads_without_loaders(small_index):
    """The thread count with no loader alive, after one was built, run and dropped (so the lazily started threads
    of torch and DALI exist already)."""
    started_loader(small_index)[0].close()
    gc.collect()  # loaders of earlier tests left in reference cycles, if any
    return thread_count()


LINUX_ONLY = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")


@LINUX_ONLY
def test_del_frees_the_pipeline_of_a_loader_left_mid_epoch(small_index, threads_without_loaders):
    loader, epoch, (views, ids) = started_loader(small_index)
    copies = [view.clone() for view in views]
    iterator = weakref.ref(loader.iterator)
    assert thread_count() > threads_without_loaders
    del loader, epoch
    assert iterator() is None and thread_count() == threads_without_loaders
    assert all(torch.equal(view, copy) for view, copy in zip(views, copies)), "a batch handed out must stay valid"


@LINUX_ONLY
def test_close_frees_the_pipeline_while_references_remain(small_index, threads_without_loaders):
    loader, epoch, _ = started_loader(small_index)
    loader.close()
    assert thread_count() == threads_without_loaders
    assert list(epoch) == [], "the unfinished epoch ends"
    with pytest.raises(ValueError, match="this loader was closed"):
        iter(loader)


@LINUX_ONLY
def test_leaving_a_with_block_frees_the_pipeline(small_index, threads_without_loaders):
    with eval_loader(small_index, loader_config(threads=3), group=ONE_RANK) as loader:
        next(iter(loader))
        assert thread_count() > threads_without_loaders
    assert thread_count() == threads_without_loaders


def test_ranks_draw_different_augmentation_seeds():
    assert augmentation_seed(0, 0) == augmentation_seed(0, 0) != augmentation_seed(0, 1)


def test_an_epoch_left_early_is_finished_before_the_next(small_index):
    loader = linear_train_loader(small_index, loader_config(), 0, 4, ONE_RANK)
    assert len(loader) == 3
    for _ in loader:
        break
    ids = torch.cat([ids for _, ids in loader])
    assert sorted(ids.tolist()) == list(range(10))


def test_one_view(small_index):
    batches = list(pretrain_loader(small_index, loader_config(image_size=8, views=1), 0, ONE_RANK))
    views, ids = batches[0]
    assert len(batches) == 3 and len(views) == 1 and views[0].shape == (4, 3, 8, 8) and ids.shape == (4,)


@pytest.fixture(scope="module")
def ramp_index(tmp_path_factory):
    """8 grey 64 x 64 PNGs that brighten from left (0) to right (252): every crop, colour twist and blur of such an
    image keeps its left half darker than its right half, so only a mirror can make it brighter."""
    folder = tmp_path_factory.mktemp("ramps")
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # [64, 64]
    for number in range(8):
        Image.fromarray(ramp).save(folder / f"ramp{number}.png")
    return build_index(folder, out_dir=folder / "out", log=quiet)


def mirrored_fraction(loader, epochs=4):
    """Fraction of the views, over a few epochs, whose left half is brighter than their right half."""
    mirrored = []
    for _ in range(epochs):
        for views, _ in loader:
            for view in views if isinstance(views, list) else [views]:  # [b, 3, S, S]
                half = view.shape[-1] // 2
                mirrored += (view[..., :half].mean(dim=(1, 2, 3)) > view[..., half:].mean(dim=(1, 2, 3))).tolist()
    return sum(mirrored) / len(mirrored)


@pytest.mark.parametrize("make_loader", [
    lambda index, config: pretrain_loader(index, config, 0, ONE_RANK),
    lambda index, config: linear_train_loader(index, config, 0, config.batch_size, ONE_RANK),
], ids=["pretrain", "linear"])
def test_flip_false_never_mirrors_and_flip_true_sometimes_does(ramp_index, make_loader):
    assert mirrored_fraction(make_loader(ramp_index, loader_config(batch_size=8, seed=5, flip=False))) == 0
    flipped = mirrored_fraction(make_loader(ramp_index, loader_config(batch_size=8, seed=5, flip=True)))
    assert 0.2 < flipped < 0.8  # p = 0.5 over 32-64 views


def test_blur_false_never_blurs_and_blur_true_blurs_about_half(tmp_path):
    """The same seed draws the same crops and colour twists with blur on and off (the blur's random operators are
    created after the others), so the views differ only where blur=True blurred: about half of them (p = 0.5), each
    with less total variation than its unblurred twin (no less at the smallest sigmas)."""
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for number in range(16):
        Image.fromarray(noise).save(tmp_path / f"noise{number}.png")
    index = build_index(tmp_path, out_dir=tmp_path / "out", log=quiet)
    settings = dict(batch_size=16, image_size=32, views=1, threads=1, seed=7)
    (sharp,), _ = next(iter(pretrain_loader(index, loader_config(blur=False, **settings), 0, ONE_RANK)))
    (maybe_blurred,), _ = next(iter(pretrain_loader(index, loader_config(blur=True, **settings), 0, ONE_RANK)))
    def total_variation(views):
        return (views.diff(dim=-1).abs().mean(dim=(1, 2, 3)) + views.diff(dim=-2).abs().mean(dim=(1, 2, 3)))
    changed = (sharp != maybe_blurred).flatten(1).any(dim=1)
    assert 0.15 < changed.float().mean() < 0.9  # p = 0.5 over 16 views
    sharp_variation, blurred_variation = total_variation(sharp), total_variation(maybe_blurred)
    assert (blurred_variation[changed] <= sharp_variation[changed] + 1e-6).all()  # sigma near 0.1 barely blurs
    assert (blurred_variation < 0.9 * sharp_variation).float().mean() > 0.15


def test_eval_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    (tmp_path / "wide.png").write_bytes(image_bytes(np.random.default_rng(0), "PNG", height=32, width=48))
    index = build_index(tmp_path, out_dir=tmp_path / "out", log=quiet)
    (images, ids), = list(eval_loader(index, loader_config(batch_size=2, image_size=32, crop_ratio=1.0),
                                      group=ONE_RANK))
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "wide.png"))[:, 8:40]).float()  # [32, 32, 3]
    expected = ((pixels - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)
    torch.testing.assert_close(images[0], expected, atol=1e-4, rtol=0)
    (half_size, _), = list(eval_loader(index, loader_config(batch_size=2, image_size=8, crop_ratio=0.5),
                                       group=ONE_RANK))
    assert half_size.shape == (1, 3, 8, 8)  # shorter side to 16, then the central 8 x 8


@pytest.fixture
def damaged_index(tmp_path):
    """An index of 16 images whose last one was cut in half (inside its compressed data) after indexing."""
    generator = np.random.default_rng(3)
    for number in range(16):
        (tmp_path / f"image{number:02d}.jpg").write_bytes(image_bytes(generator, height=64, width=64))
    index = build_index(tmp_path, out_dir=tmp_path / "out", strict=True, log=quiet)
    damaged = index.root / index.files[-1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    return index


def test_a_damaged_image_is_a_one_line_error_naming_it(damaged_index):
    with pytest.raises(UndecodableImage, match=r"DALI cannot decode .*image15.jpg in .* \(truncated or corrupt\)"):
        for _ in eval_loader(damaged_index, loader_config(), group=ONE_RANK):
            pass


@pytest.mark.horovod
def test_a_damaged_image_ends_a_horovod_job_instead_of_hanging(damaged_index):
    with pytest.raises(pytest.fail.Exception, match=r"<stdout>:error: DALI cannot decode .*image15.jpg"):
        run_horovod(NUM_RANKS, WORKERS / "data_decode_failure.py", damaged_index.path, timeout=120)
