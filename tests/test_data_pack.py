"""`trainer.py pack` (data/pack.py): shards of the given size, the folder's images in one seeded permutation
across them, with their class and source file; reproducible bytes; the run index of the shards maps each id to
the folder's file and label; bad files and bad requests."""
import filecmp
import tarfile

import numpy as np
import pytest

from data.index import build_index
from data.pack import pack
from data.shards import build_shard_index
from run.errors import UsageError
from tests.trainer_runs import main_in_process
from tests.workers.data_images import write_images

PER_SHARD = 4


def quiet(message):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """train/ (3 classes, 14 images and a text file) and val/ (3 classes, 6 images)."""
    root = tmp_path_factory.mktemp("dataset")
    write_images(root / "train", 14, classes=3)
    (root / "train" / "class1" / "notes.jpg").write_text("not an image")
    write_images(root / "val", 6, classes=3, seed=1)
    return root


@pytest.fixture(scope="module")
def packed(dataset, tmp_path_factory):
    to = tmp_path_factory.mktemp("packed") / "shards"
    messages = []
    pack(dataset, to, samples_per_shard=PER_SHARD, seed=5, log=messages.append)
    return to, messages


def members(shard):
    """[(name, bytes)] of a shard, in order."""
    with tarfile.open(shard) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive]


def test_splits_become_shard_folders_of_the_given_size(packed):
    to, messages = packed
    assert sorted(path.name for path in to.iterdir()) == ["train", "val"]
    assert sorted(path.name for path in (to / "train").iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert [len(members(to / "train" / f"0000{shard}.tar")) // 3 for shard in range(4)] == [4, 4, 4, 2]
    assert sorted(path.name for path in (to / "val").iterdir()) == ["00000.tar", "00001.tar"]
    assert any("notes.jpg (not an image DALI decodes" in message for message in messages)  # as the index excludes it
    assert any(f"packed 14 images of " in message and "into 4 shards of up to 4" in message for message in messages)


def test_samples_are_the_folders_images_in_the_seeds_permutation_with_class_and_source(dataset, packed, tmp_path):
    to, _ = packed
    folder = build_index(dataset / "train", out_dir=tmp_path, log=quiet)  # sorted paths, as pack orders them
    order = np.random.default_rng(5).permutation(folder.num_instances)
    samples = [content for shard in sorted((to / "train").iterdir()) for content in members(shard)]
    for position, file_number in enumerate(order):
        (image_name, image), (label_name, label), (source_name, source) = samples[3 * position: 3 * position + 3]
        name = folder.files[file_number]
        assert (image_name, label_name, source_name) == (f"{position:06d}.jpg", f"{position:06d}.cls",
                                                         f"{position:06d}.source.txt")
        assert image == (folder.root / name).read_bytes()
        assert int(label) == folder.labels[file_number] and source.decode() == name
    first_shard_classes = {folder.labels[file_number] for file_number in order[:PER_SHARD]}
    assert len(first_shard_classes) > 1, "a shard should mix the classes"


def test_the_run_index_of_packed_shards_maps_ids_to_the_folders_files_and_labels(dataset, packed, tmp_path):
    to, _ = packed
    folder = build_index(dataset / "train", out_dir=tmp_path, log=quiet)
    shards = build_shard_index(to / "train", index_dir=tmp_path / "index", log=quiet)
    assert shards.num_instances == folder.num_instances and shards.class_names == ["0", "1", "2"]
    label_of = dict(zip(folder.files, folder.labels.tolist()))
    assert sorted(shards.sources) == folder.files
    for instance, source in enumerate(shards.sources):
        assert shards.labels[instance] == label_of[source]
        assert shards.open_image(instance).read() == (folder.root / source).read_bytes()


def test_the_same_folder_and_seed_give_the_same_bytes_and_another_seed_another_order(dataset, packed, tmp_path):
    to, _ = packed
    pack(dataset / "train", tmp_path / "again", samples_per_shard=PER_SHARD, seed=5, log=quiet)
    pack(dataset / "train", tmp_path / "other", samples_per_shard=PER_SHARD, seed=6, log=quiet)
    names = [f"0000{shard}.tar" for shard in range(4)]
    assert all(filecmp.cmp(to / "train" / name, tmp_path / "again" / name, shallow=False) for name in names)
    sources = [[content for name, content in members(folder / "00000.tar") if name.endswith(".source.txt")]
               for folder in (tmp_path / "again", tmp_path / "other")]
    assert sources[0] != sources[1]


def test_a_flat_folder_packs_without_labels_into_the_target_itself(tmp_path):
    write_images(tmp_path / "flat", 3)
    pack(tmp_path / "flat", tmp_path / "shards", samples_per_shard=2, log=quiet)
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == ["00000.tar", "00001.tar"]
    assert [name for name, _ in members(tmp_path / "shards" / "00001.tar")] == ["000002.jpg", "000002.source.txt"]
    assert build_shard_index(tmp_path / "shards", index_dir=tmp_path / "index", log=quiet).class_names == []


def test_bad_requests_are_one_line_errors(dataset, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.tar").write_bytes(b"")
    with pytest.raises(UsageError, match=r"--to .*full exists and is not an empty folder"):
        pack(dataset, tmp_path / "full", samples_per_shard=4, log=quiet)
    with pytest.raises(UsageError, match="--samples-per-shard must be a positive integer, got 0"):
        pack(dataset, tmp_path / "new", samples_per_shard=0, log=quiet)
    with pytest.raises(UsageError, match=r"1 of 15 files in .*train are not usable images \(strict\): class1/notes.jpg"):
        pack(dataset, tmp_path / "strict", samples_per_shard=4, strict=True, log=quiet)
    write_images(tmp_path / "mismatch" / "train", 4, classes=2)
    write_images(tmp_path / "mismatch" / "val", 3, classes=3)
    with pytest.raises(UsageError, match=r"the class folders of .*val differ from those of .*train"):
        pack(tmp_path / "mismatch", tmp_path / "out", samples_per_shard=4, log=quiet)
    assert not (tmp_path / "new").exists() and not (tmp_path / "strict").exists()


def test_trainer_pack_writes_shards_and_reports_errors_in_one_line(dataset, tmp_path, monkeypatch, capsys):
    command = ["pack", "--data", dataset, "--to", tmp_path / "s", "--samples-per-shard", "10"]
    done = main_in_process(monkeypatch, capsys, *command)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in (tmp_path / "s" / "train").iterdir()) == ["00000.tar", "00001.tar"]
    assert "packed 6 images of" in done.stdout
    again = main_in_process(monkeypatch, capsys, *command)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: --to {tmp_path / 's'} exists and is not an empty folder: pack writes into a new one"]
