"""bench/ablations.py: what it reads from the runs' metrics.jsonl, the table and plots it writes, and the skip
of finished variants (the training itself is the trainer's, tested in tests/test_trainer.py)."""
import argparse
import importlib.util
import json

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", ROOT / "bench" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def epoch_records(epoch, knn20, loss):
    return [{"epoch": epoch, "step": 10 * epoch, "loss": loss + 1},  # a step record: not an epoch value
            {"epoch": epoch, "epoch_loss": loss, "seconds": 1.0}, {"epoch": epoch, "knn20_top1": knn20,
                                                                    "knn200_top1": knn20 - 5}]


@pytest.mark.slow
def test_table_takes_the_last_record_of_a_resumed_epoch_and_plots_are_written(ablations, tmp_path):
    write_run(tmp_path / "defaults" / "seed-0", [*epoch_records(1, 50.0, 8.0), *epoch_records(2, 60.0, 7.0),
                                                 *epoch_records(2, 61.0, 6.5),  # epoch 2 again after a resume
                                                 {"evaluation": "e", "pretrained/linear_top1": 70.25}])
    write_run(tmp_path / "k0" / "seed-0", epoch_records(1, 40.0, 9.0))  # interrupted: no epoch 2, no linear
    ablations.table(tmp_path, ["defaults", "k0"], epochs=2, knn_every=1)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("Ablations on the built-in data, 2 epochs, seed 0; machine ") and "commit " in lines[0]
    assert lines[2] == ("| variant | flags | seeds | kNN20 ep 1 | kNN20 ep 2 | kNN200 | linear top-1 "
                        "| loss (last epoch) |")
    assert lines[4] == "| defaults | - | 1 | 50.0 | 61.0 | 56.0 | 70.2 | 6.500 |"
    assert lines[5] == "| k0 | --smooth-k 0 | 0 | 40.0 | - | - | - | - |"
    assert "| K 10 beats K 0 (plain cross-entropy) | 10.0 (one seed: not judged) | - | - | - |" in lines
    ablations.plots(tmp_path, ["defaults", "k0"])
    for name in ("knn.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_seeds_give_mean_and_deviation_and_paired_differences(ablations, tmp_path):
    # kNN20 at the last epoch: defaults 60, 62, 64; random init 50, 58, 63 -> differences 10, 4, 1:
    # mean 5, sample std 4.58, so not shown; linear: 80, 81, 82 vs 70, 70.5, 71 -> 10, 10.5, 11: shown.
    for seed, (with_it, without) in enumerate([(60.0, 50.0), (62.0, 58.0), (64.0, 63.0)]):
        write_run(tmp_path / "defaults" / f"seed-{seed}",
                  [*epoch_records(1, with_it, 5.0), {"evaluation": "e", "pretrained/linear_top1": 80.0 + seed}])
        write_run(tmp_path / "random-init" / f"seed-{seed}",
                  [*epoch_records(1, without, 6.0), {"evaluation": "e", "pretrained/linear_top1": 70.0 + seed / 2}])
    ablations.table(tmp_path, ["defaults", "random-init"], epochs=1, knn_every=1, seeds=3)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert "mean +- std over seeds 0..2" in lines[0]
    assert lines[4] == "| defaults | - | 3 | 62.0 +- 2.0 | 57.0 +- 2.0 | 81.0 +- 1.0 | 5.000 +- 0.000 |"
    assert lines[5] == ("| random-init | --no-raw-init | 3 | 57.0 +- 6.6 | 52.0 +- 6.6 | 70.5 +- 0.5 "
                        "| 6.000 +- 0.000 |")
    assert lines[-1] == ("| raw-feature init beats random init | 5.0 +- 4.6 (not shown) | 5.0 +- 4.6 (not shown) "
                         "| 10.5 +- 0.5 (shown) |")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["random-init"]["2"] == {"kNN20 ep 1": 63.0, "kNN200": 58.0, "linear top-1": 71.0,
                                         "loss (last epoch)": 6.0}
    ablations.plots(tmp_path, ["defaults", "random-init"], seeds=3)
    assert (tmp_path / "knn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_variant_with_its_linear_evaluation_is_skipped(ablations, tmp_path, capsys):
    write_run(tmp_path / "k1" / "seed-2", [{"evaluation": "e", "pretrained/linear_top1": 1.0}])
    args = argparse.Namespace(out=str(tmp_path), epochs=2, knn_every=1, np=2)
    assert ablations.run_variant("k1", 2, args) == 0.0  # would fail if it launched horovodrun on an empty folder
    assert "k1 seed 2: done, skipped" in capsys.readouterr().out
