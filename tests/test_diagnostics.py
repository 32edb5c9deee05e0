"""run/diagnostics.py against float64 oracles computed from dense logits, and its row norms at P = 1 and over real
shards at P = 2, 3 (including a rank that owns no rows)."""
import json
from types import SimpleNamespace

import pytest
import torch

from tests.allocations import NewStorages
from tests.conftest import WORKERS, run_horovod


def global_rows(num_rows, dim=6):
    """A classifier matrix [num_rows, dim] with row norms spread over 0.5 .. 3."""
    generator = torch.Generator().manual_seed(num_rows)
    rows = torch.nn.functional.normalize(torch.randn(num_rows, dim, generator=generator), dim=1)
    return rows * (0.5 + 2.5 * torch.rand(num_rows, 1, generator=generator))


def step_diagnostics(logits, ids, k):
    """What the classifier reports for one global batch, from its dense logits [B, N] (float64)."""
    others = logits.scatter(1, ids[:, None], float("-inf"))
    hardest = others.topk(k, dim=1).indices if k else torch.empty(len(ids), 0, dtype=torch.long)
    return SimpleNamespace(ids=ids, own_probability=logits.softmax(dim=1).gather(1, ids[:, None])[:, 0].float(),
                           own_is_top1=logits.argmax(dim=1) == ids, hardest=hardest)


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("labelled", [True, False])
def test_epoch_diagnostics_match_the_oracle(k, labelled, single_engine):
    from run.diagnostics import EpochDiagnostics  # summary() reduces the row norms over the engine's ranks
    num_instances, generator = 40, torch.Generator().manual_seed(k)
    labels = torch.randint(4, (num_instances,), generator=generator) if labelled else torch.full((num_instances,), -1)
    weight = global_rows(num_instances)
    diagnostics = EpochDiagnostics(labels, torch.device("cpu"))
    steps = []
    for batch in (16, 16, 7):  # a smaller last batch
        ids = torch.randperm(num_instances, generator=generator)[:batch]
        logits = 3 * torch.randn(batch, num_instances, generator=generator, dtype=torch.float64)
        logits[torch.arange(batch), ids] += 2.0  # own class often, not always, the top-1
        step = step_diagnostics(logits, ids, k)
        if k:
            step.hardest[0, -1] = -1  # a padded id: must not count
        diagnostics.update(step)
        steps.append((logits, ids, step.hardest))
    logits = torch.cat([s[0] for s in steps])
    ids = torch.cat([s[1] for s in steps])
    result = diagnostics.summary(weight)
    top1 = (logits.argmax(dim=1) == ids).double()
    assert 0 < top1.mean() < 1
    assert result["instance_accuracy"] == pytest.approx(100 * float(top1.mean()), abs=1e-9)
    assert result["own_probability"] == pytest.approx(float(logits.softmax(1)[torch.arange(len(ids)), ids].mean()),
                                                      rel=1e-6)
    if k and labelled:
        same = [int(labels[h] == labels[i]) for (_, batch_ids, hardest) in steps
                for i, row in zip(batch_ids, hardest) for h in row if h >= 0]
        assert result["hardest_same_label"] == pytest.approx(100 * sum(same) / len(same), abs=1e-9)
    else:
        assert "hardest_same_label" not in result
    norms = weight.double().norm(dim=1)
    assert result["row_norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-12)
    assert (result["row_norm_min"], result["row_norm_max"]) == pytest.approx((float(norms.min()), float(norms.max())))


def test_row_norms_are_computed_in_blocks_without_a_float64_copy_of_the_shard(single_engine, monkeypatch):
    """The norms of a shard of 3.5 blocks: bitwise those of the whole float64 copy, which is never made."""
    from run import diagnostics
    monkeypatch.setattr(diagnostics, "NORM_BLOCK_ROWS", 8)
    weight = torch.randn(28, 5)
    with NewStorages() as new:
        result = diagnostics.row_norm_statistics(weight)
    norms = weight.double().norm(dim=1)
    assert result == {"row_norm_mean": float(norms.sum() / 28), "row_norm_min": float(norms.min()),
                      "row_norm_max": float(norms.max())}
    assert max(nbytes for _, nbytes in new.allocated) < weight.numel() * 4  # not even a float32 copy


@pytest.mark.parametrize("num_ranks, row_counts", [(2, [9]), (3, [10, 2])])
@pytest.mark.horovod
def test_row_norm_statistics_over_shards(num_ranks, row_counts, tmp_path):
    """P = 1 is the single engine's: the tests above."""
    run_horovod(num_ranks, WORKERS / "row_norms.py", tmp_path, *row_counts, timeout=120)
    for num_rows in row_counts:
        norms = global_rows(num_rows).double().norm(dim=1)
        for rank in range(num_ranks):  # the same on every rank, an empty shard included (3 ranks, 2 rows)
            result = json.loads((tmp_path / f"rows-{num_rows}.rank-{rank}.json").read_text())
            assert result["row_norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-12)
            assert result["row_norm_min"] == pytest.approx(float(norms.min()), rel=1e-12)
            assert result["row_norm_max"] == pytest.approx(float(norms.max()), rel=1e-12)
