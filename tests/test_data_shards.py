"""Tar shards (data/shards.py, data/shard_reader.py): stable ids from sorted shards and member order, ids that
travel with their images, every sample once per epoch across P = 2 and 3 ranks over uneven shards, an order that
is a function of (seed, epoch), batches that mix the classes as well as a folder's, bad samples and damaged
shards, the DALI index files kept out of the data folder."""
import io
import json
import math
import os
import stat
import tarfile

import numpy as np
import pytest
import torch

from data.index import build_index
from data.pack import pack
from data.loaders import eval_loader, pretrain_loader
from data.pipelines import UndecodableImage
from data.run_index import load_index
from data.shards import ShardIndex, build_shard_index, is_shard_folder
from tests.conftest import WORKERS, run_horovod
from tests.workers.data_images import image_bytes, write_images
from tests.workers.data_shards import flat_png, numbers_shown, write_numbered_shards, write_tar
from tests.workers.loader_config import ONE_RANK, loader_config, rank_of

SIZES = [5, 1, 9, 3, 7, 2]  # uneven on purpose: shards end in the middle of ranks and batches
BATCH_SIZE = 4  # as in tests/workers/data_shard_epochs.py
EPOCHS = 3


def quiet(message):
    pass


def index_of(folder, tmp_path, log=quiet, strict=False):
    return build_shard_index(folder, index_dir=tmp_path / "index", log=log, strict=strict)


def test_ids_follow_sorted_shard_names_and_member_order(tmp_path):
    count = write_numbered_shards(tmp_path / "shards", SIZES)
    index = index_of(tmp_path / "shards", tmp_path)
    assert index.num_instances == count == sum(SIZES) and index.counts == SIZES
    assert index.shards == [f"{shard:03d}.tar" for shard in range(len(SIZES))]
    assert [int(key[1:]) for key in index.keys] == list(range(count))  # the number is the key's digits
    assert index.labels.tolist() == [number % 3 for number in range(count)] and index.class_names == ["0", "1", "2"]
    assert [numbers_shown_by(index, instance) for instance in (0, 5, 6, count - 1)] == [0, 5, 6, count - 1]
    assert index.name(6) == f"002.tar/{index.keys[6]}"


def numbers_shown_by(index, instance):
    """The sample number read from instance `instance`'s image bytes, as the index finds them in its shard."""
    from PIL import Image
    with Image.open(index.open_image(instance)) as image:
        red, green, _ = image.getpixel((0, 0))
    return red + 256 * green


def test_saved_index_reloads_identically_and_a_changed_shard_is_refused(tmp_path):
    write_numbered_shards(tmp_path / "shards", SIZES)
    index = index_of(tmp_path / "shards", tmp_path)
    for where in (index.path, index.path.parent):
        again = load_index(where)
        assert isinstance(again, ShardIndex)
        assert (again.root, again.shards, again.counts, again.keys, again.sources, again.dali_index) == (
            index.root, index.shards, index.counts, index.keys, index.sources, index.dali_index)
        for name in ("offsets", "sizes", "labels"):
            assert np.array_equal(getattr(again, name), getattr(index, name))
    shard = tmp_path / "shards" / "002.tar"
    with open(shard, "ab") as file:
        file.write(bytes(tarfile.RECORDSIZE))
    with pytest.raises(ValueError, match=r"shard .*002.tar changed since it was indexed"):
        ShardIndex.load(index.path)


def test_dali_index_files_are_written_beside_the_index_never_beside_the_shards(tmp_path):
    write_numbered_shards(tmp_path / "shards", SIZES)
    before = sorted(os.listdir(tmp_path / "shards"))
    os.chmod(tmp_path / "shards", stat.S_IRUSR | stat.S_IXUSR)  # a read-only data folder
    try:
        index = index_of(tmp_path / "shards", tmp_path)
    finally:
        os.chmod(tmp_path / "shards", stat.S_IRWXU)
    assert sorted(os.listdir(tmp_path / "shards")) == before
    paths, index_paths = index.dali_files()
    assert paths == [str(tmp_path / "shards" / f"{shard:03d}.tar") for shard in range(len(SIZES))]
    assert all(path.startswith(str(tmp_path / "index" / "dali-")) for path in index_paths)
    lines = open(index_paths[2]).read().splitlines()  # shard 2 holds ids 6 .. 14
    assert lines[0] == "v1.2 9" and lines[1] == f"img {index.offsets[6]} {index.sizes[6]} 000000000006"


def test_the_image_is_the_first_image_member_and_labels_are_optional(tmp_path):
    generator = np.random.default_rng(0)
    png, jpeg = image_bytes(generator, "PNG"), image_bytes(generator)
    write_tar(tmp_path / "shards" / "a.tar", [
        ("s0", {"json": b"{}", "png": png, "jpg": jpeg}),
        ("dir/s1", {"seg.jpg": jpeg, "txt": b"a caption"}),
        ("dir/.s2", {"jpg": jpeg}),  # hidden: DALI skips it too
    ])
    index = index_of(tmp_path / "shards", tmp_path)
    assert index.keys == ["s0", "dir/s1"] and index.num_excluded == 0
    assert index.open_image(0).read() == png and index.open_image(1).read() == jpeg
    assert index.labels.tolist() == [-1, -1] and index.class_names == []


def test_only_a_folder_of_tar_files_is_a_shard_folder(tmp_path):
    write_numbered_shards(tmp_path / "shards", [2])
    (tmp_path / "shards" / "000.idx").write_text("made by wds2idx")  # other files do not matter
    write_images(tmp_path / "images", 2, classes=1)
    (tmp_path / "images" / "stray.tar").write_bytes(b"")
    assert is_shard_folder(tmp_path / "shards") and not is_shard_folder(tmp_path / "images")


def bad_samples():
    """Samples that the index must exclude, with the reason it should give."""
    generator = np.random.default_rng(1)
    jpeg = image_bytes(generator)
    gif = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    return [
        ("b-no-image", {"cls": b"1"}, "no image member (has .cls)"),
        ("c-empty", {"jpg": b"", "cls": b"1"}, ".jpg: empty file"),
        ("d-text", {"jpg": b"<!DOCTYPE html>", "cls": b"1"}, ".jpg: not an image DALI decodes (starts with 3c 21 44 4f)"),
        ("e-cut", {"jpg": jpeg[: len(jpeg) // 2], "cls": b"1"}, ".jpg: truncated JPEG (no end-of-image marker)"),
        ("f-label", {"jpg": jpeg, "cls": b"cat"}, ".cls is not a class number (b'cat')"),
        ("g-gif", {"gif": gif.getvalue(), "cls": b"1"}, "no image member (has .gif, .cls)"),
    ]


def test_bad_samples_are_excluded_counted_and_named(tmp_path):
    bad = bad_samples()
    good = [(f"a-good{number}", {"png": flat_png(number), "cls": b"0"}) for number in range(2)]
    write_tar(tmp_path / "shards" / "0.tar", good + [(key, members) for key, members, _ in bad])
    messages = []
    index = index_of(tmp_path / "shards", tmp_path, log=messages.append)
    assert index.keys == ["a-good0", "a-good1"] and index.num_excluded == len(bad)
    report = messages[0]
    assert report.startswith(f"excluded {len(bad)} of {len(bad) + 2} samples in {tmp_path / 'shards'} are not usable")
    for key, _, reason in bad[:5]:  # the report names the first five
        assert f"0.tar/{key} ({reason})" in report
    assert report.endswith("and 1 more")
    with pytest.raises(ValueError, match=r"6 of 8 samples .* \(strict\): 0.tar/b-no-image \(no image member"):
        index_of(tmp_path / "shards", tmp_path, strict=True)


def cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def test_damaged_shards_keep_the_samples_before_the_damage_and_are_named(tmp_path):
    folder = tmp_path / "shards"
    samples = [(f"k{number}", {"png": flat_png(number), "cls": b"0"}) for number in range(6)]
    for name in ("a-whole", "b-cut-in-member", "c-cut-at-member", "d-bad-header", "e-cut-in-header"):
        write_tar(folder / f"{name}.tar", samples)
    members = tarfile.open(folder / "a-whole.tar").getmembers()  # png, cls per sample: member 6 is k3.png
    cut(folder / "b-cut-in-member.tar", members[6].offset_data + 10)  # inside k3.png: k0, k1 kept, k2 dropped
    cut(folder / "c-cut-at-member.tar", members[8].offset)  # at k4.png's header: k0 .. k2 kept, k3 dropped
    damaged = bytearray((folder / "d-bad-header.tar").read_bytes())
    damaged[members[4].offset: members[4].offset + 512] = b"\x7f" * 512  # k2.png's header: k0 kept, k1 dropped
    (folder / "d-bad-header.tar").write_bytes(bytes(damaged))
    cut(folder / "e-cut-in-header.tar", members[10].offset + 100)  # k5.png's header: k0 .. k3 kept, k4 dropped
    (folder / "f-not-a-tar.tar").write_text("not a tar at all")
    write_tar(tmp_path / "plain.tar", samples[:1])
    (folder / "g.tar.gz").write_bytes((tmp_path / "plain.tar").read_bytes())
    messages = []
    index = index_of(folder, tmp_path, log=messages.append)
    assert index.shards == ["a-whole.tar", "b-cut-in-member.tar", "c-cut-at-member.tar", "d-bad-header.tar",
                            "e-cut-in-header.tar", "f-not-a-tar.tar"]
    assert index.counts == [6, 2, 3, 1, 4, 0]
    assert index.keys == ([f"k{n}" for n in range(6)] + ["k0", "k1"] + ["k0", "k1", "k2"] + ["k0"]
                          + ["k0", "k1", "k2", "k3"])
    assert numbers_shown_by(index, 7) == 1  # shard b's second sample is still sample 1
    shards_report, samples_report = messages[:2]
    assert shards_report.startswith(f"excluded 6 of 7 shards in {folder} are damaged or not plain tar (the samples "
                                    f"before any damage are kept)")
    for name, damage in [("b-cut-in-member.tar", "cut short inside k3.png"),
                         ("c-cut-at-member.tar", "cut short: no end-of-archive block after its last member"),
                         ("d-bad-header.tar", f"an unreadable member header at byte {members[4].offset}"),
                         ("e-cut-in-header.tar", f"cut short inside the member header at byte {members[10].offset}"),
                         ("f-not-a-tar.tar", "not a tar archive")]:
        assert f"{name} ({damage}" in shards_report
    assert shards_report.endswith("and 1 more")  # g.tar.gz, compressed
    assert "b-cut-in-member.tar/k2 (the last sample before the damage, which may have lost members)" in samples_report
    with pytest.raises(ValueError, match=r"6 of 7 shards .* \(strict\): b-cut-in-member.tar"):
        index_of(folder, tmp_path, strict=True)
    # what is kept reads back: every kept sample once, each image the sample its id names
    ids, shown = [], []
    for images, batch_ids in eval_loader(index, loader_config(image_size=8, crop_ratio=1.0), group=ONE_RANK):
        ids += batch_ids.tolist()
        shown += numbers_shown(images)
    assert ids == list(range(index.num_instances))
    assert shown == [int(key[1:]) for key in index.keys]


def test_shards_without_usable_samples_are_an_error_naming_them(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "x.tar").write_text("junk")
    with pytest.raises(ValueError, match=r"no samples with an image DALI decodes in the shards of .*: x.tar \(not a tar"):
        index_of(tmp_path / "shards", tmp_path)


def one_epoch(loader):
    return [(views[0], ids) for views, ids in loader]


@pytest.mark.slow
def test_an_epoch_is_a_function_of_its_seed(tmp_path):
    write_numbered_shards(tmp_path / "shards", SIZES)
    index = index_of(tmp_path / "shards", tmp_path)
    first, again, other = (one_epoch(pretrain_loader(index, loader_config(batch_size=BATCH_SIZE, image_size=8, views=1,
                                                                          threads=1, seed=seed), 0, rank_of(1, 2)))
                           for seed in (7, 7, 8))
    assert len(first) == len(again) and all(torch.equal(ids, same) and torch.equal(views, same_views)
                                            for (views, ids), (same_views, same) in zip(first, again))
    assert [ids.tolist() for _, ids in first] != [ids.tolist() for _, ids in other]


def mean_distinct_labels(index, labels, epochs=2):
    """Mean number of distinct labels in a batch of 16 over a few epochs of one pretraining loader."""
    loader = pretrain_loader(index, loader_config(batch_size=16, image_size=8, views=1, threads=1, seed=1), 0, ONE_RANK)
    counts = [len(set(labels[ids.numpy()].tolist())) for _ in range(epochs) for _, ids in loader]
    return sum(counts) / len(counts)


@pytest.mark.slow
def test_batches_of_packed_shards_mix_the_classes_as_well_as_the_folder(tmp_path, monkeypatch):
    """10 classes x 24 images: a folder's batches of 16 hold ~8.2 classes. With a shuffle buffer smaller than a
    class, as on ImageNet (1300 images a class, a buffer of 1024), packed shards are within 10% of that; shards cut
    from the class-sorted folder in order (one class each) are far below: the mixing is pack's random order."""
    write_images(tmp_path / "folder", 240, classes=10)
    folder_index = build_index(tmp_path / "folder", out_dir=tmp_path / "out", log=quiet)
    folder_mean = mean_distinct_labels(folder_index, folder_index.labels)
    monkeypatch.setattr("data.shard_reader.SHUFFLE_BUFFER", 8)
    pack(tmp_path / "folder", tmp_path / "packed", samples_per_shard=30, log=quiet)
    packed_index = index_of(tmp_path / "packed", tmp_path / "packed-index")
    packed_mean = mean_distinct_labels(packed_index, packed_index.labels)
    assert abs(packed_mean - folder_mean) <= 0.1 * folder_mean, (packed_mean, folder_mean)
    for label, name in enumerate(folder_index.class_names):  # what a naive per-class packing writes
        files = [file for file in folder_index.files if file.startswith(f"{name}/")]
        write_tar(tmp_path / "sorted" / f"{name}.tar", [(file.replace("/", "-")[:-4], {
            "jpg": (folder_index.root / file).read_bytes(), "cls": str(label).encode()}) for file in files])
    sorted_index = index_of(tmp_path / "sorted", tmp_path / "sorted-index")
    sorted_mean = mean_distinct_labels(sorted_index, sorted_index.labels)
    assert sorted_mean < 0.5 * folder_mean, (sorted_mean, folder_mean)


@pytest.fixture(scope="module", params=[(2, "train and val"), (3, "folder of shards")], ids=["P2-root", "P3-folder"])
def shard_epochs(request, tmp_path_factory):
    """What each of P Horovod ranks saw over EPOCHS epochs of shards of uneven sizes: at P = 2 a dataset root with
    train/ and val/, at P = 3 a folder of shards itself."""
    num_ranks, layout = request.param
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("out")
    train = data / "train" if layout == "train and val" else data
    count = write_numbered_shards(train, SIZES)
    if layout == "train and val":
        write_numbered_shards(data / "val", [4, 3])
    run_horovod(num_ranks, WORKERS / "data_shard_epochs.py", data, out, EPOCHS, timeout=300)
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(num_ranks)]
    return num_ranks, layout, count, records


LOADERS = ["pretrain", "linear", "eval", "eval_shuffled", "pretrain_per_epoch"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.horovod
def test_each_epoch_is_a_permutation_of_all_ids_across_ranks(shard_epochs, loader):
    num_ranks, _, count, records = shard_epochs
    for epoch in range(EPOCHS):
        ids = [i for record in records for batch in record[loader]["ids"][epoch] for i in batch]
        assert sorted(ids) == list(range(count)), f"epoch {epoch}: duplicates or drops"
    # every rank steps the same number of batches: the reader pads its share to the longest one's
    batches = math.ceil(math.ceil(count / num_ranks) / BATCH_SIZE)
    assert [record[loader]["batches_per_epoch"] for record in records] == [batches] * num_ranks
    assert all(len(epoch) == batches for record in records for epoch in record[loader]["ids"])


@pytest.mark.parametrize("loader", ["eval", "eval_shuffled"])
@pytest.mark.horovod
def test_every_id_comes_with_its_own_image(shard_epochs, loader):
    for record in shard_epochs[3]:
        assert record[loader]["shown"] == record[loader]["ids"]


@pytest.mark.parametrize("loader", ["pretrain", "linear", "eval_shuffled", "pretrain_per_epoch"])
@pytest.mark.horovod
def test_training_order_is_drawn_anew_every_epoch(shard_epochs, loader):
    for record in shard_epochs[3]:
        orders = [tuple(i for batch in epoch for i in batch) for epoch in record[loader]["ids"]]
        assert len(set(orders)) == EPOCHS


@pytest.mark.horovod
def test_evaluation_reads_each_ranks_contiguous_share_in_id_order(shard_epochs):
    num_ranks, _, count, records = shard_epochs
    for rank, record in enumerate(records):
        share = list(range(count * rank // num_ranks, count * (rank + 1) // num_ranks))
        assert all([i for batch in epoch for i in batch] == share for epoch in record["eval"]["ids"])


@pytest.mark.horovod
def test_ranks_load_the_index_rank_zero_built_and_say_what_evaluation_has(shard_epochs):
    _, layout, count, records = shard_epochs
    assert all(record["keys"] == records[0]["keys"] and record["num_instances"] == count for record in records)
    if layout == "train and val":
        assert all(record["val_instances"] == 7 for record in records)
        assert not any("skipped" in message for message in records[0]["messages"])
    else:
        assert all(record["val_instances"] is None for record in records)
        assert "kNN monitor and linear evaluation are skipped: no val/ split" in records[0]["messages"]


def test_an_image_damaged_after_indexing_is_a_one_line_error_naming_its_sample(tmp_path):
    write_numbered_shards(tmp_path / "shards", SIZES)
    index = index_of(tmp_path / "shards", tmp_path)
    with open(tmp_path / "shards" / "002.tar", "r+b") as shard:  # zero instance 7's PNG chunks, in place
        shard.seek(int(index.offsets[7]) + 40)
        shard.write(bytes(int(index.sizes[7]) - 60))
    with pytest.raises(UndecodableImage, match=rf"DALI cannot decode 002.tar/{index.keys[7]} \(instance 7\) in "
                                               rf"{tmp_path / 'shards'} \(truncated or corrupt\)"):
        for _ in eval_loader(index, loader_config(image_size=8), group=ONE_RANK):
            pass
