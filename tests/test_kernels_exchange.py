"""The exchange glue (kernels.exchange and its Triton kernels, kernels.triton_exchange) against the float64
oracle, and what one loss step launches (kernels.launches).

The merge is checked on statistics of simulated shards of very different sizes (one smaller than K), with
labels out of range (their loss must be NaN, the others untouched) and on the ±1 problem of
tests/test_kernels.py where equal logits abound (ties go to the lower class id, for the top-K as for the
top-1 diagnostic). Errors are max |a - e| / max |e| (reference.relative_error).
"""
import pytest
import torch

from kernels import exchange, reference, topk_smoothed_xent, triton_exchange
from kernels.launches import LaunchCounter
from kernels.reference import relative_error
from tests.test_kernels import make_problem, ties_problem

MERGES = {"torch": exchange.merge_shard_stats, "triton": triton_exchange.merge_shard_stats}


def dense_oracle(features_n, weight, labels, temperature, k, alpha):
    """Per sample, from the dense float64 logits: lse, loss, own-class probability, own class is the argmax
    (torch.argmax: the first of equal maxima, i.e. the lower class id), and the k hardest ids."""
    logits = features_n.double() @ reference.normalize_rows(weight.double()).T / temperature
    lse = torch.logsumexp(logits, dim=1)
    target = logits.gather(1, labels[:, None])[:, 0]
    hardest = reference.hardest_classes(logits, labels, k)
    losses = lse - (1 - alpha) * target - alpha * logits.gather(1, hardest).mean(dim=1)
    return dict(lse=lse, losses=losses, own_probability=torch.exp(target - lse),
                own_is_top1=logits.argmax(dim=1) == labels, hardest=hardest)


def simulated_shards(features_n, weight, labels, bounds, temperature, k):
    """The gathered exchange blocks [P, B, 2 + 2k] of shards [bounds[r], bounds[r + 1]), in the inputs'
    dtype (a block is never cast: its ids are integer bits)."""
    return torch.stack([reference.shard_forward_stats(features_n, weight[start:stop], labels, start,
                                                      temperature=temperature, k=k)
                        for start, stop in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("k", [0, 1, 5])
def test_merge_matches_the_dense_oracle(merge, k):
    features, weight, labels = make_problem(37, 41, 16, torch.float32)  # fp32 statistics, as on the wire
    features[::3] = weight[labels[::3]]  # a third of the samples sit on their own class: top-1
    features_n, candidates = reference.normalize_rows(features), max(k, 1)
    gathered = simulated_shards(features_n, weight, labels, [0, 3, 20, 41], 0.1, candidates)  # a shard < K
    bad = labels.clone()
    bad[[4, 9]] = torch.tensor([-1, 41])  # outside [0, N): their loss, and only theirs, is NaN
    merged = MERGES[merge](gathered, bad, num_classes=41, k=k, temperature=0.1, alpha=0.2 if k else 0.0)
    expected = dense_oracle(features_n, weight, labels, 0.1, candidates, 0.2 if k else 0.0)  # K = 0: alpha = 0
    good = torch.ones(len(labels), dtype=torch.bool)
    good[[4, 9]] = False
    assert torch.isnan(merged.losses[~good]).all() and not torch.isnan(merged.losses[good]).any()
    for name in ("lse", "losses", "own_probability"):
        assert relative_error(getattr(merged, name)[good], expected[name][good]) < 1e-6, name
    assert torch.equal(merged.own_is_top1[good], expected["own_is_top1"][good])
    assert merged.own_is_top1.any() and not merged.own_is_top1.all()  # both outcomes are exercised
    assert torch.equal(merged.topk_indices, expected["hardest"])


@pytest.mark.parametrize("merge", MERGES)
def test_merge_ties_go_to_the_lower_class_id(merge):
    """±1 entries: many exactly equal logits, also between the own class and the best other one."""
    features_n, weight, labels = ties_problem(40, 90)  # fp32, every logit exact
    gathered = simulated_shards(features_n, weight, labels, [0, 17, 50, 90], 0.5, 16)
    merged = MERGES[merge](gathered, labels, num_classes=90, k=16, temperature=0.5, alpha=0.2)
    expected = dense_oracle(features_n, weight, labels, 0.5, 16, 0.2)
    logits = features_n.double() @ reference.normalize_rows(weight.double()).T / 0.5
    assert (logits == logits.gather(1, labels[:, None])).sum(dim=1).gt(1).any()  # the own class ties somewhere
    assert torch.equal(merged.topk_indices, expected["hardest"])
    assert torch.equal(merged.own_is_top1, expected["own_is_top1"])


def test_triton_merge_equals_the_torch_merge():
    """Same statistics, same results: values to rounding, ids and flags exactly."""
    features, weight, labels = make_problem(50, 300, 32, torch.float32, seed=4)
    features_n = reference.normalize_rows(features)
    gathered = simulated_shards(features_n, weight, labels, [0, 100, 190, 300], 0.15, 5)
    torch_merge, triton_merge = (merge(gathered, labels, num_classes=300, k=3, temperature=0.15, alpha=0.2)
                                 for merge in MERGES.values())
    for name in ("lse", "losses", "own_probability", "topk_values"):
        assert relative_error(getattr(triton_merge, name), getattr(torch_merge, name).double()) < 1e-6, name
    assert torch.equal(triton_merge.topk_indices, torch_merge.topk_indices)
    assert torch.equal(triton_merge.own_is_top1, torch_merge.own_is_top1)


@pytest.mark.parametrize("dim,dtype", [(16, torch.float32), (13, torch.float32), (13, torch.bfloat16),
                                       (13, torch.float64)])
def test_feature_packing_and_its_backward(dim, dtype):
    """Triton and torch pack the same block (ids exact, padding zero), the views read it back, and both
    backwards equal autograd through F.normalize of the summed copies."""
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(19, dim, generator=generator).to(dtype)
    features[3] = 0  # a zero row: divided by eps, as F.normalize does
    ids = torch.randint(0, 2**40, (19,), generator=generator)  # beyond int32 and float32: bytes, not values
    blocks = [pack(features, ids, 3) for pack in (exchange.pack_features, triton_exchange.pack_features)]
    for block in blocks:
        assert block.shape == (3, 19, exchange.packed_width(dim, block.dtype))
        features_n, unpacked = exchange.unpack_features(block[1], dim)
        assert torch.equal(unpacked, ids)
        assert relative_error(features_n, reference.normalize_rows(features.double())) < 1e-6
        assert not block[..., dim:block.shape[-1] - (1 if dtype == torch.float64 else 2)].any()  # padding
    grad = torch.randn(3, 19, dim, generator=generator, dtype=blocks[0].dtype)
    leaf = features.detach().double().clone().requires_grad_(True)
    reference.normalize_rows(leaf).backward(grad.double().sum(dim=0))
    for backward in (exchange.features_backward, triton_exchange.features_backward):
        got = backward(grad, features)
        assert got.dtype == dtype
        assert relative_error(got, leaf.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("layout", ["transposed", "every_other_column", "every_other_row"])
def test_feature_packing_and_its_backward_read_any_strides(layout):
    """The standalone API takes views as they come: a transposed, column-sliced or row-sliced input gives what
    its contiguous copy gives, bitwise, in the pack and in the backward (the gradient strided too)."""
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(40, 26, generator=generator)
    grad_base = torch.randn(3, 40, 26, generator=generator)
    view = {"transposed": lambda x: x.transpose(-1, -2)[..., :13, :], "every_other_column": lambda x: x[..., ::2],
            "every_other_row": lambda x: x[..., ::2, :13]}[layout]
    features, grad = view(base), view(grad_base)
    assert not features.is_contiguous() and not grad.is_contiguous()
    ids = torch.arange(len(features)) * 7
    assert torch.equal(triton_exchange.pack_features(features, ids, 2),
                       triton_exchange.pack_features(features.contiguous(), ids, 2))
    assert torch.equal(triton_exchange.features_backward(grad, features),
                       triton_exchange.features_backward(grad.contiguous(), features.contiguous()))


def test_triton_rounds_operands_to_the_compute_dtype_like_torch():
    """fp32 inputs with compute_dtype=bf16: the kernels round in registers (under the interpreter, then
    multiply in fp32), the chunked path rounds the tensors; both must see the same operands, which a
    truncating conversion would not give (~4e-3 apart)."""
    from kernels import chunked, triton_topk_xent
    features, weight, labels = make_problem(23, 70, 32, torch.float32, seed=7)
    features_n = reference.normalize_rows(features)
    options = dict(temperature=0.1, k=5, compute_dtype=torch.bfloat16)
    expected, got = (reference.unpack_shard_stats(backend.shard_forward_stats(features_n, weight, labels, 0, **options), 5)
                     for backend in (chunked, triton_topk_xent))
    for want, have in zip(expected[:3], got[:3]):  # sum_exp, target_logit, topk_values
        assert relative_error(have, want.double()) < 1e-5
    assert torch.equal(got[3], expected[3])
    lse, topk_indices = expected[0].log() + 10, expected[3].long()
    grads = [backend.shard_backward(features_n, weight, labels, 0, lse, topk_indices, torch.ones(23), temperature=0.1,
                                    alpha=0.2, compute_dtype=torch.bfloat16) for backend in (chunked, triton_topk_xent)]
    for want, have in zip(*grads):
        assert relative_error(have, want.double()) < 1e-5
    assert grads[1][1].dtype == torch.float32  # dW in the parameter's dtype, not the compute dtype


# The whole single-device loss (normalisation, stats, merge, backward) on the Triton path: 14 launches
# (the budget is 15), no host sync. The torch twin is far above (it is the CPU path), and does not sync either.
TRITON_LOSS_LAUNCHES = 14


@pytest.mark.slow
def test_triton_loss_step_launches_few_kernels_and_never_syncs():
    features, weight, labels = make_problem(33, 200, 32, torch.float32)
    features.requires_grad_(True)
    weight.requires_grad_(True)
    with LaunchCounter() as counted:
        topk_smoothed_xent(features, weight, labels, temperature=0.15, k=5, alpha=0.2, backend="triton").backward()
    assert len(counted.launches) <= TRITON_LOSS_LAUNCHES, counted.launches
    assert sum(name.startswith("triton") for name in counted.launches) >= 8  # the counter sees the kernels
    assert counted.syncs == [] and counted.collectives == []
    with LaunchCounter() as counted_torch:
        topk_smoothed_xent(features, weight, labels, temperature=0.15, k=5, alpha=0.2, backend="chunked").backward()
    assert len(counted_torch.launches) > 3 * TRITON_LOSS_LAUNCHES and counted_torch.syncs == []  # it can fail


def test_launch_counter_sees_syncs_and_views_are_free():
    x = torch.randn(4, 3)
    with LaunchCounter() as counted:
        y = x.T.reshape(12).view(3, 4)  # views: no launch
        z = (y * 2).sum()
        z.item()
        x[x > 0]
        x.tolist()
    assert counted.launches == ["aten.clone.default", "aten.mul.Tensor", "aten.sum.default", "aten.gt.Scalar",
                                "aten.index.Tensor"]
    assert counted.syncs == ["aten._local_scalar_dense.default", "aten.index.Tensor", "tolist"]
