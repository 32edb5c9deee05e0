"""Instance index: stable ids, layouts, bad-file exclusion and reporting, strict mode, errors, persistence."""
import numpy as np
import pytest

from data.index import InstanceIndex, build_index
from tests.workers.data_images import image_bytes, write_images


def quiet(message):
    pass


def test_ids_are_sorted_paths_whatever_the_creation_order(tmp_path):
    write_images(tmp_path / "a", 12, classes=3, order=range(12))
    write_images(tmp_path / "b", 12, classes=3, order=np.random.default_rng(1).permutation(12))
    first = build_index(tmp_path / "a", out_dir=tmp_path / "out", log=quiet)
    second = build_index(tmp_path / "b", out_dir=tmp_path / "out", log=quiet)
    assert first.files == second.files == sorted(first.files)
    assert first.files[0] == "class0/image000.jpg" and first.num_instances == 12
    assert (first.labels == second.labels).all()
    assert first.file_list.read_text().splitlines()[:2] == ["class0/image000.jpg 0", "class0/image003.jpg 1"]


def test_class_folders_give_labels_and_nested_files_belong_to_their_class(tmp_path):
    write_images(tmp_path / "data", 6, classes=2)
    (tmp_path / "data" / "class1" / "deeper").mkdir()
    (tmp_path / "data" / "class1" / "deeper" / "extra.png").write_bytes(image_bytes(np.random.default_rng(0), "PNG"))
    (tmp_path / "data" / "loose.jpg").write_bytes(image_bytes(np.random.default_rng(1)))
    (tmp_path / "data" / ".hidden").mkdir()
    messages = []
    index = build_index(tmp_path / "data", out_dir=tmp_path / "out", log=messages.append)
    assert index.class_names == ["class0", "class1"]
    assert index.labels.dtype == np.int64
    assert dict(zip(index.files, index.labels.tolist()))["class1/deeper/extra.png"] == 1
    assert np.bincount(index.labels).tolist() == [3, 4]
    assert index.num_excluded == 1 and "loose.jpg (outside the class folders)" in messages[0]


def test_flat_folder_has_label_minus_one(tmp_path):
    write_images(tmp_path, 5)
    index = build_index(tmp_path, out_dir=tmp_path / "out", log=quiet)
    assert index.class_names == [] and index.labels.tolist() == [-1] * 5


def write_bad_files(folder):
    """Files the index must exclude, with the reason it should give."""
    generator = np.random.default_rng(0)
    jpeg, png = image_bytes(generator), image_bytes(generator, "PNG")
    (folder / "a-empty.jpg").write_bytes(b"")
    (folder / "b-text.jpg").write_text("<!DOCTYPE html> a web page saved as an image")
    (folder / "c-cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "d-cut.png").write_bytes(png[: len(png) // 2])
    (folder / "e-dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "f-trailing-space.jpg ").write_bytes(jpeg)
    return {"a-empty.jpg": "empty file", "b-text.jpg": "not an image DALI decodes (starts with 3c 21 44 4f)",
            "c-cut.jpg": "truncated JPEG (no end-of-image marker)", "d-cut.png": "truncated PNG (no IEND chunk)",
            "e-dangling.jpg": "unreadable (No such file or directory)",
            "f-trailing-space.jpg ": "name not usable in a DALI file list"}


def test_bad_files_are_excluded_counted_and_the_first_reported(tmp_path):
    write_images(tmp_path, 4)
    reasons = write_bad_files(tmp_path)
    generator = np.random.default_rng(2)
    (tmp_path / "png-named-jpg.jpg").write_bytes(image_bytes(generator, "PNG"))  # content decides, not the name
    (tmp_path / "padded.jpg").write_bytes(image_bytes(generator) + bytes(1000))  # data after the end marker is fine
    messages = []
    index = build_index(tmp_path, out_dir=tmp_path / "out", log=messages.append)
    assert index.num_instances == 6 and index.num_excluded == 6
    assert "png-named-jpg.jpg" in index.files and "padded.jpg" in index.files
    report = messages[0]
    assert report.startswith(f"excluded 6 of 12 files in {tmp_path}")
    for name, reason in list(reasons.items())[:5]:
        assert f"{name} ({reason})" in report
    assert report.endswith("and 1 more")


def test_strict_turns_bad_files_into_an_error(tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"1 of 4 files in .* are not usable images \(strict\): empty.jpg"):
        build_index(tmp_path, out_dir=tmp_path / "out", strict=True, log=quiet)


def test_unusable_folders_are_errors_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset folder {tmp_path / 'missing'} does not exist"):
        build_index(tmp_path / "missing", log=quiet)
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        build_index(tmp_path / "file.jpg", log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"dataset folder {tmp_path / 'empty'} is empty"):
        build_index(tmp_path / "empty", log=quiet)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"no images DALI decodes in {tmp_path / 'notes'}: readme.txt"):
        build_index(tmp_path / "notes", log=quiet)


def test_saved_index_reloads_identically(tmp_path):
    write_images(tmp_path / "data", 7, classes=2)
    index = build_index(tmp_path / "data", out_dir=tmp_path / "out", log=quiet)
    assert index.path.parent.parent == tmp_path / "out" and index.path.parent.name.startswith("index-data-")
    for where in (index.path, index.path.parent):
        again = InstanceIndex.load(where)
        assert (again.root, again.files, again.class_names, again.file_list) == (
            index.root, index.files, index.class_names, index.file_list)
        assert (again.labels == index.labels).all()
    with pytest.raises(FileNotFoundError, match="no instance index at"):
        InstanceIndex.load(tmp_path / "out" / "nothing")


def test_without_out_dir_the_index_is_cached_per_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_images(tmp_path / "one" / "train", 2)
    write_images(tmp_path / "two" / "train", 3)
    first = build_index(tmp_path / "one" / "train", log=quiet)
    second = build_index(tmp_path / "two" / "train", log=quiet)
    assert first.path.is_relative_to(tmp_path / "cache" / "instance-classifier")
    assert first.path.parent != second.path.parent
    assert InstanceIndex.load(first.path).num_instances == 2
