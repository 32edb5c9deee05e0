"""--data synthetic: the loader deals out instances like the DALI reader; the whole trainer runs without DALI;
bench/train_step.py's CPU mode runs."""
import json
import subprocess
import sys

import pytest
import torch

from data.synthetic import SyntheticLoader
from tests.conftest import ROOT, WORKERS, run_horovod


@pytest.mark.parametrize("num_instances,world_size,batch_size", [(100, 3, 8), (64, 2, 16), (7, 1, 4)])
def test_every_instance_comes_in_an_epoch_and_ranks_agree_on_the_permutation(num_instances, world_size, batch_size):
    def epoch(seed):
        loaders = [SyntheticLoader(num_instances, batch_size=batch_size, image_size=8, views=2, rank=rank,
                                   world_size=world_size, seed=seed, device=torch.device("cpu"))
                   for rank in range(world_size)]
        assert len({len(loader) for loader in loaders}) == 1  # every rank runs the same number of steps
        ids = []
        for loader in loaders:
            for views, batch_ids in loader:
                assert len(views) == 2 and all(v.shape == (len(batch_ids), 3, 8, 8) for v in views)
                assert batch_ids.dtype == torch.int64 and 0 < len(batch_ids) <= batch_size
                ids += batch_ids.tolist()
        return ids
    ids = epoch(seed=1)
    assert set(ids) == set(range(num_instances))
    assert len(ids) == -(-num_instances // world_size) * world_size  # the last shard wraps around
    assert ids == epoch(seed=1) and (num_instances < 8 or ids != epoch(seed=2))


def test_steps_per_epoch_cuts_the_epoch_and_eval_batches_are_single_tensors():
    loader = SyntheticLoader(1000, batch_size=10, image_size=4, views=None, rank=0, world_size=1, seed=0,
                             device=torch.device("cpu"), steps_per_epoch=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert all(images.shape == (10, 3, 4, 4) and len(ids) == 10 for images, ids in batches)


TINY = ["--image-size", "32", "--arch", "resnet18", "--width", "8", "--small-stem", "--hidden-dim", "32",
        "--feat-dim", "16", "--batch-size", "8", "--warmup-epochs", "1", "--log-every", "1"]


@pytest.mark.horovod
def test_trainer_runs_on_synthetic_data_without_dali(tmp_path):
    out = tmp_path / "run"
    result = run_horovod(2, WORKERS / "trainer_without_dali.py", "--data", "synthetic", "--instances", "50",
                         "--epochs", "2", "--steps-per-epoch", "2", "--out", out, *TINY)
    assert "skipped" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["num_instances"] == 50 and config["world_size"] == 2 and config["versions"]["torch"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "step" in m] == [1, 2, 3, 4]
    assert not any("knn20_top1" in m for m in metrics)
    assert sorted(p.name for p in (out / "checkpoint-0002").iterdir()) == ["shard-0.pt", "shard-1.pt", "state.pt"]
    shards = [torch.load(out / "checkpoint-0002" / f"shard-{rank}.pt") for rank in range(2)]
    assert [(s["start"], s["stop"]) for s in shards] == [(0, 25), (25, 50)]


@pytest.mark.parametrize("args,message", [
    (["--data", "synthetic", "--instances", "1"], "--instances must be at least 2"),
    (["--steps-per-epoch", "3"], "with --data synthetic only"),
])
@pytest.mark.slow
def test_synthetic_flags_are_judged_first(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *args, "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.horovod
def test_train_step_bench_cpu_mode_prints_both_heads():
    result = run_horovod(2, ROOT / "bench" / "train_step.py", "cpu", "--instances", "500", "--steps", "1",
                         "--warmup", "1")
    rows = [line for line in result.stdout.splitlines() if line.startswith("[0]<stdout>:| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["linear-1,000", "instance-500"], result.stdout
    assert "rows per rank" in rows[0] and "| 250 |" in rows[2]
