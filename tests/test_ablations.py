"""bench/experiments/ablations.py: what it reads from the runs' metrics.jsonl, the table and plots it writes, and the skip
of finished variants (the training itself is the trainer's, tested in tests/test_trainer.py); the twin study end to
end at tiny sizes."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from data.builtin import DATASET_NAME
from tests.conftest import ROOT, load_bench_script
from tests.trainer_runs import SMALL, copy_tiny_dataset


@pytest.fixture(scope="module")
def ablations():
    return load_bench_script("experiments/ablations")


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


def test_a_difference_of_differences_is_paired_by_seed(ablations, tmp_path):
    # kNN20 per seed: defaults - k0 = 1, 2, 3; twins-k10 - twins-k0 = 5, 7, 9: the gain with twins exceeds the one
    # without by 4, 5, 6 (mean 5, std 1: shown); twins-k10 beats twins-k0 by 7 +- 2 (shown).
    for seed, values in enumerate([(61.0, 60.0, 55.0, 50.0), (62.0, 60.0, 57.0, 50.0), (63.0, 60.0, 59.0, 50.0)]):
        for name, value in zip(["defaults", "k0", "twins-k10", "twins-k0"], values):
            write_run(tmp_path / name / f"seed-{seed}", epoch_records(1, value, 5.0))
    ablations.table(tmp_path, ["defaults", "k0", "twins-k10", "twins-k0"], epochs=1, knn_every=1, seeds=3)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert "| K 10 beats K 0 with 30% twins | 7.0 +- 2.0 (shown) | 7.0 +- 2.0 (shown) | - |" in lines
    assert ("| K 10 gains more over K 0 with 30% twins than without | 5.0 +- 1.0 (shown) | 5.0 +- 1.0 (shown) | - |"
            in lines)
    assert "| K 10 beats K 0 (plain cross-entropy) | 2.0 +- 1.0 (not shown) | 2.0 +- 1.0 (not shown) | - |" in lines


@pytest.mark.slow
def test_the_twin_study_runs_end_to_end_at_tiny_sizes_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    copy_tiny_dataset(cache / "instance-classifier" / DATASET_NAME)
    out = tmp_path / "study"
    command = [sys.executable, ROOT / "bench" / "experiments" / "ablations.py", "--study", "twins", "--np", "1", "--epochs", "2",
               "--knn-every", "1", "--seeds", "1", "--out", out, "--trainer-flags=" + " ".join(SMALL)]
    environment = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    first = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = (out / "results.md").read_text().splitlines()
    assert "trainer flags added to every run: " + " ".join(SMALL) in lines[0]
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    for name in ("defaults", "k0", "twins-k10", "twins-k0"):
        assert rows[name].split(" | ")[2] == "1"  # its linear evaluation ran
    assert rows["K 10 beats K 0 with 30% twins"].count("(one seed: not judged)") == 4
    heading = next(number for number, line in enumerate(lines) if line.startswith("Twins' mechanism"))
    mechanism = [line.split(" | ")[:3] for line in lines[heading + 4:]]  # variant, epoch, seeds
    assert mechanism == [["| twins-k10", "1", "1"], ["| twins-k10", "2", "1"], ["| twins-k0", "1", "1"],
                         ["| twins-k0", "2", "1"]]
    for name in ("twins-k10", "twins-k0"):
        run = out / name / "seed-0"
        assert {path.name for path in run.glob("checkpoint-*")} == {"checkpoint-0001", "checkpoint-0002"}
        summaries = json.loads((run / "twins-mechanism.json").read_text())
        assert sorted(summaries) == ["1", "2"] and summaries["2"]["pairs"] == 36
        assert json.loads((run / "index-bank" / "index.json").read_text())["num_instances"] == 120
        assert json.loads((run / "index-train" / "index.json").read_text())["num_instances"] == 156
    assert not (out / "k0" / "seed-0" / "index-bank").exists()
    again = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 4, again.stdout
