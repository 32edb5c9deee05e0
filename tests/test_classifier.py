"""The hybrid-parallel classifier against the float64 single-process oracle, in real Horovod jobs."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from kernels import merge_shard_stats, reference
from kernels.reference import relative_error
from model.classifier import random_unit_rows
from run.distributed import shard_rows
from tests.allocations import NewStorages
from tests.classifier_problems import CASES, SGD_STEP, make_problem, tiny_backbone
from tests.conftest import WORKERS, run_horovod

BACKENDS = ["reference", "chunked"]


def oracle(case):
    features, weight, labels = make_problem(case)
    features.requires_grad_(True)
    weight.requires_grad_(True)
    loss = reference.topk_smoothed_xent(features, weight, labels, temperature=case["temperature"],
                                        k=case["k"], alpha=case["alpha"])
    loss.backward()
    return loss.detach(), features.grad, weight.grad


JOBS = [("horovod", None), ("horovod", 2), ("horovod", 3), ("torchrun", 1), ("torchrun", 2), ("torchrun", 3)]


@pytest.fixture(scope="module", params=JOBS, ids=["single", "horovod-np2", "horovod-np3", "torchrun-1",
                                                  "torchrun-2", "torchrun-3"])
def ranks(request, tmp_path_factory):
    """Results of every rank of one job: P = 1 as a plain python process (the single engine), P = 2 and 3 under
    horovodrun, and P = 1, 2, 3 under torchrun (the torch engine); each rank's batch is a different size."""
    launcher, num_ranks = request.param
    out = tmp_path_factory.mktemp(f"classifier-{launcher}-{num_ranks}")
    run_horovod(num_ranks, WORKERS / "classifier_cases.py", out, *BACKENDS, launcher=launcher)
    results = [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]
    expected = {(None, "horovod"): "single", (1, "torchrun"): "torch"}.get((num_ranks, launcher), launcher)
    assert [result["engine"] for result in results] == [expected.replace("torchrun", "torch")] * len(results)
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.horovod
@pytest.mark.torchrun
def test_loss_and_gradients_match_oracle(ranks, name, backend):
    case = CASES[name]
    loss, features_grad, weight_grad = oracle(case)
    got = [rank[(backend, name)] for rank in ranks]
    assert sum(r["stop"] - r["start"] for r in got) == case["instances"]
    for r in got:
        assert torch.equal(r["loss"], got[0]["loss"]), "loss must be bit-identical across ranks"
    assert relative_error(got[0]["loss"], loss) < 1e-6
    assert relative_error(torch.cat([r["features_grad"] for r in got]), features_grad) < 1e-6
    assert relative_error(torch.cat([r["weight_grad"] for r in got]), weight_grad) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.horovod
@pytest.mark.torchrun
def test_merged_topk_equals_dense_topk(ranks, backend):
    case = CASES["smooth"]
    features, weight, labels = make_problem(case)
    logits = F.normalize(features) @ F.normalize(weight).T / case["temperature"]
    logits[torch.arange(len(labels)), labels] = float("-inf")
    expected = torch.topk(logits, case["k"], dim=1).indices
    for rank in ranks:
        assert torch.equal(rank[(backend, "smooth")]["hardest"], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.horovod
@pytest.mark.torchrun
def test_diagnostics_match_the_dense_oracle(ranks, name, backend):
    """Per sample of the global batch, on every rank: its id, exp(z_{i,y_i} - lse_i), whether its own class
    is the argmax, and the merged top-K ids, against the float64 logits."""
    case = CASES[name]
    features, weight, labels = make_problem(case)
    logits = F.normalize(features) @ F.normalize(weight).T / case["temperature"]
    hardest = reference.hardest_classes(logits, labels, reference.effective_k(case["k"], case["instances"]))
    for rank in ranks:
        diagnostics = rank[(backend, name)]["diagnostics"]
        assert torch.equal(diagnostics["ids"], labels)
        assert relative_error(diagnostics["own_probability"], torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0]) < 1e-12
        assert torch.equal(diagnostics["own_is_top1"], logits.argmax(dim=1) == labels)
        assert torch.equal(diagnostics["hardest"], hardest)
    assert diagnostics["own_is_top1"].any() and not diagnostics["own_is_top1"].all()


def test_k_zero_and_alpha_zero_are_cross_entropy():
    for name in ["plain_k0", "plain_alpha0"]:
        case = CASES[name]
        features, weight, labels = make_problem(case)
        logits = F.normalize(features) @ F.normalize(weight).T / case["temperature"]
        assert relative_error(oracle(case)[0], F.cross_entropy(logits, labels)) < 1e-12


def test_oracle_smoothing_changes_the_loss():
    """Guards the comparison above: with K > 0 and alpha > 0 the loss is NOT plain cross-entropy."""
    case = CASES["smooth"]
    features, weight, labels = make_problem(case)
    logits = F.normalize(features) @ F.normalize(weight).T / case["temperature"]
    assert relative_error(oracle(case)[0], F.cross_entropy(logits, labels)) > 1e-3


@pytest.mark.horovod
@pytest.mark.torchrun
def test_seed_writes_exactly_the_owned_rows(ranks):
    case = CASES["smooth"]
    features, _, labels = make_problem(case)
    expected_rows = {int(i): F.normalize(features[j], dim=0) for j, i in enumerate(labels)}
    total = 0
    for rank in ranks:
        seed, start = rank["seed"], rank["seed"]["start"]
        for row in range(len(seed["after"])):
            if start + row in expected_rows:
                assert torch.allclose(seed["after"][row], expected_rows[start + row], rtol=0, atol=1e-15)
            else:
                assert torch.equal(seed["after"][row], seed["before"][row])
        total += seed["written"]
    assert total == len(expected_rows)


@pytest.mark.horovod
@pytest.mark.torchrun
def test_one_sgd_step_equals_single_process(ranks):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    weight = torch.nn.Parameter(random_unit_rows(0, SGD_STEP["instances"], SGD_STEP["dim"], seed=0).double())
    optimizer = torch.optim.SGD([*backbone.parameters(), weight], lr=SGD_STEP["lr"], momentum=0.9)
    loss = reference.topk_smoothed_xent(backbone(SGD_STEP["inputs"]()), weight, SGD_STEP["labels"](),
                                        temperature=0.2, k=3, alpha=0.2)
    loss.backward()
    optimizer.step()
    for rank in ranks:
        for key, value in backbone.state_dict().items():
            assert relative_error(rank["sgd"]["backbone"][key], value) < 1e-10, key
    shards = torch.cat([rank["sgd"]["weight"] for rank in ranks])
    assert relative_error(shards, weight.detach()) < 1e-10


def test_merge_of_simulated_shards_is_exact():
    """The merge alone, on shards of very different sizes (one smaller than K)."""
    case = dict(instances=23, dim=8, batch=6, k=5, alpha=0.2, temperature=0.1)
    features, weight, labels = make_problem(case)
    features_n = reference.normalize_rows(features)
    bounds = [0, 3, 15, 23]
    gathered = torch.stack([reference.shard_forward_stats(features_n, weight[a:b], labels, a, temperature=0.1, k=5)
                            for a, b in zip(bounds, bounds[1:])])
    merged = merge_shard_stats(gathered, labels, num_classes=23, k=5, temperature=0.1, alpha=0.2)
    logits = features_n @ reference.normalize_rows(weight).T / 0.1
    assert relative_error(merged.lse, torch.logsumexp(logits, 1)) < 1e-14
    assert torch.equal(merged.topk_indices, reference.hardest_classes(logits, labels, 5))


@pytest.mark.parametrize("num_instances,num_shards", [(1001, 2), (1001, 3), (10, 4), (3, 5)])
def test_shard_rows_balanced_and_contiguous(num_instances, num_shards):
    bounds = [shard_rows(num_instances, num_shards, r) for r in range(num_shards)]
    sizes = [stop - start for start, stop in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_instances
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(num_shards - 1))
    assert max(sizes) - min(sizes) <= 1


def test_random_init_does_not_depend_on_sharding():
    full = random_unit_rows(0, 70000, 4, seed=3)
    parts = torch.cat([random_unit_rows(*shard_rows(70000, 3, r), 4, seed=3) for r in range(3)])
    assert torch.equal(full, parts)
    assert torch.allclose(full.norm(dim=1), torch.ones(70000))


@pytest.mark.parametrize("features,ids,message", [
    (torch.randn(4, 9), torch.tensor([0, 1, 2, 3]), "features must be [batch, 16]"),
    (torch.randn(4, 16), torch.tensor([0, 1, 2]), "ids must be [4]"),
])
def test_bad_shapes_are_a_clear_error(features, ids, message, single_engine):
    from model.classifier import ShardedInstanceClassifier
    classifier = ShardedInstanceClassifier(1001, 16)
    with pytest.raises(ValueError, match=re.escape(message)):
        classifier(features, ids)


@pytest.mark.parametrize("features,ids,error,message", [
    (torch.randn(4, 16), torch.tensor([0, 1, 2, 1001]), ValueError, "instance ids must be in [0, 1001), got range [0, 1001]"),
    (torch.randn(4, 16), torch.tensor([0, -1, 2, 3]), ValueError, "instance ids must be in [0, 1001), got range [-1, 3]"),
    (torch.tensor([[float("nan")] * 16] * 4), torch.tensor([0, 1, 2, 3]), FloatingPointError, "features contain NaN or Inf"),
    (torch.tensor([[float("inf")] * 16] * 4), torch.tensor([0, 1, 2, 3]), FloatingPointError, "features contain NaN or Inf"),
])
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
def test_bad_input_makes_the_loss_nan_and_check_input_names_it(features, ids, error, message, backend, single_engine):
    """No host check in the forward: the loss is NaN (on every rank: it is computed from the global batch),
    and check_input raises the one-line error. Good input passes check_input."""
    from model.classifier import ShardedInstanceClassifier
    classifier = ShardedInstanceClassifier(1001, 16, smooth_k=5, smooth_alpha=0.2, backend=backend)
    bad = classifier(features, ids)
    assert torch.isnan(bad.loss)
    with pytest.raises(error, match=re.escape(message)):
        classifier.check_input(bad)
    good = classifier(torch.randn(4, 16), torch.tensor([0, 1, 2, 1000]))
    assert torch.isfinite(good.loss)
    classifier.check_input(good)


@pytest.mark.parametrize("options,message", [
    (dict(temperature=0.0), "temperature must be > 0, got 0.0"), (dict(smooth_k=-1), "smooth_k must be >= 0, got -1"),
    (dict(smooth_alpha=1.0), "smooth_alpha must be in [0, 1), got 1.0"),
])
def test_bad_loss_options_are_refused_when_the_classifier_is_built(options, message, single_engine):
    """The ranges of kernels.reference.OPTION_RANGES, under the classifier's names (the flags' are tested with
    the trainer's one-line errors)."""
    from model.classifier import ShardedInstanceClassifier
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardedInstanceClassifier(1001, 16, **options)


def test_seed_rejects_bad_ids_at_once(single_engine):
    from model.classifier import ShardedInstanceClassifier
    classifier = ShardedInstanceClassifier(1001, 16)
    with pytest.raises(ValueError, match=r"instance ids must be in \[0, 1001\)"):
        classifier.seed_(torch.randn(2, 16), torch.tensor([5, 1001]))


def test_bf16_compute_dtype_keeps_fp32_parameters_and_gradients(single_engine):
    """What runs on CUDA by default (bf16 kernel inputs), through the chunked backend on CPU."""
    from model.classifier import ShardedInstanceClassifier
    case = CASES["smooth"]
    features, weight, labels = make_problem(case)
    classifier = ShardedInstanceClassifier(case["instances"], case["dim"], temperature=case["temperature"],
                                           smooth_k=case["k"], smooth_alpha=case["alpha"], backend="chunked",
                                           compute_dtype=torch.bfloat16)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    local_features = features.float().requires_grad_(True)
    loss = classifier(local_features, labels).loss
    loss.backward()
    expected_loss, expected_features_grad, expected_weight_grad = oracle(case)
    assert loss.dtype == classifier.weight.grad.dtype == local_features.grad.dtype == torch.float32
    assert relative_error(loss.detach().double(), expected_loss) < 2e-2
    assert relative_error(local_features.grad.double(), expected_features_grad) < 2e-2
    assert relative_error(classifier.weight.grad.double(), expected_weight_grad) < 2e-2


@pytest.mark.parametrize("cuda,user_value,expected", [(True, None, "0.1"), (True, "2", "2"), (False, None, "5"),
                                                      (False, "1", "1")])
def test_default_horovod_environment(monkeypatch, cuda, user_value, expected):
    """HOROVOD_CYCLE_TIME = 0.1 ms for GPU ranks, 5 ms for CPU ranks, unless the user chose one."""
    from run.horovod_engine import default_horovod_environment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if user_value is None:  # set first, so that monkeypatch restores the variable's absence afterwards
        monkeypatch.setenv("HOROVOD_CYCLE_TIME", "unset by the test")
        monkeypatch.delenv("HOROVOD_CYCLE_TIME")
    else:
        monkeypatch.setenv("HOROVOD_CYCLE_TIME", user_value)
    chosen = default_horovod_environment()
    assert os.environ.get("HOROVOD_CYCLE_TIME") == expected
    assert chosen == ({"HOROVOD_CYCLE_TIME": expected} if user_value is None else {})


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_shard_sgd_updates_bitwise_as_torch_sgd_without_a_copy_of_the_gradient(weight_decay):
    """Three steps of ShardSGD and torch.optim.SGD from the same rows and gradients: the same rows bitwise; after
    the first step (which creates the momentum buffer) ShardSGD allocates nothing the size of the shard, where
    torch's SGD allocates the gradient plus weight decay."""
    from model.classifier import ShardSGD
    torch.manual_seed(0)
    start, gradients = torch.randn(1000, 24), [torch.randn(1000, 24) for _ in range(3)]
    results = {}
    for optimizer_class in (torch.optim.SGD, ShardSGD):
        weight = torch.nn.Parameter(start.clone())
        optimizer = optimizer_class([weight], lr=0.3, momentum=0.9, weight_decay=weight_decay)
        allocated = []
        for step, gradient in enumerate(gradients):
            weight.grad = gradient.clone()
            with NewStorages() as new:
                optimizer.step()
            allocated.append(new.allocated.count(((1000, 24), 1000 * 24 * 4)))
        results[optimizer_class] = weight.detach(), allocated, optimizer.param_groups[0]["weight_decay"]
    assert torch.equal(results[torch.optim.SGD][0], results[ShardSGD][0])
    assert results[ShardSGD][1] == [1, 0, 0]  # the momentum buffer, once
    assert results[torch.optim.SGD][1] == ([2, 1, 1] if weight_decay else [1, 0, 0])
    assert results[ShardSGD][2] == weight_decay  # the group keeps its setting for whoever reads it
