"""model.plan / `trainer.py plan` against what really moves and what is really allocated at small scale."""
import json

import pytest

from model.plan import backbone_bytes, plan
from tests.conftest import WORKERS, run_horovod


@pytest.mark.parametrize("num_ranks", [2, 3])
@pytest.mark.horovod
def test_plan_matches_measured_traffic_and_shard_memory(num_ranks, tmp_path):
    instances, batch, dim, k = 1001, 8, 16, 5
    run_horovod(num_ranks, WORKERS / "plan_traffic.py", tmp_path, instances, batch, dim, k)
    measured = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(num_ranks)]
    rows = {name: hybrid for name, hybrid, _ in plan(instances=instances, gpus=num_ranks, batch_size=batch,
                                                     feat_dim=dim, k=k, arch="resnet18", width=8, hidden_dim=32,
                                                     image_size=32)}
    for rank in measured:
        assert rank["received"] == rows["communication/step: classifier"]
    # The plan sizes the largest shard (ceil(N / P) rows).
    assert max(r["weight_bytes"] for r in measured) == rows["classifier weight"]
    assert max(r["grad_momentum_bytes"] for r in measured) == rows["classifier grad + momentum"]


def test_backbone_parameters_traced_on_meta_equal_the_real_model():
    from model import ProjectionHead, build_backbone
    params, activations = backbone_bytes("resnet50", False, 64, 128, 2048, 224, 2)
    backbone = build_backbone("resnet50")
    head = ProjectionHead(backbone.feature_dim, 2048, 128)
    assert params == sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])
    assert activations > 2 * 3 * 224 * 224 * 4  # at least the saved input images


def test_replicated_layout_costs_the_full_weight():
    rows = {name: (hybrid, replicated) for name, hybrid, replicated in
            plan(instances=1_281_167, gpus=64, batch_size=128, feat_dim=128, k=5)}
    hybrid, replicated = rows["classifier weight"]
    assert replicated == 1_281_167 * 128 * 4 and hybrid == 20_019 * 128 * 4  # ceil(1281167 / 64) rows
    hybrid, replicated = rows["communication/step: classifier"]
    assert replicated == 2 * 63 / 64 * 1_281_167 * 128 * 4 and hybrid < replicated / 10
