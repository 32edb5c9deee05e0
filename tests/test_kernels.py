"""The chunked torch and Triton backends of the smoothed cosine-softmax cross-entropy, and the Triton
seeding, against the float64 oracle (kernels.reference).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), which is slow: the
Triton cases are a hand-picked set that covers every value of each parameter at least once, with odd
sizes and small tiles so that row blocks, class tiles and class splits all have ragged edges; the
fast chunked path gets the broad grid.

Errors are relative to the largest entry: max |a - e| / max |e|. Tolerances: 1e-5 for fp32 inputs,
2e-2 for bf16 ones (against the oracle run on the same bf16-rounded values in float64).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import chunked, reference, seed_rows_, shard_ops, topk_smoothed_xent, triton_topk_xent
from kernels.launches import LaunchCounter
from kernels.reference import effective_k, relative_error
from tests.conftest import ROOT

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_problem(batch, num_classes, dim, dtype, seed=0):
    """Raw features [B, D] and weight [C, D] in dtype, labels [B] (repeats allowed when B > C)."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, generator=generator).to(dtype)
    weight = torch.randn(num_classes, dim, generator=generator).to(dtype)
    return features, weight, torch.randint(0, num_classes, (batch,), generator=generator)


def loss_and_grads(loss_fn, features, weight):
    features, weight = features.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = loss_fn(features, weight)
    loss.backward()
    return loss.detach(), features.grad, weight.grad


def check_against_oracle(backend, batch, num_classes, dim, k, alpha, temperature, dtype):
    """Loss, dE and dW of the single-device autograd API vs the float64 oracle on the same values;
    the backend's local statistics (top-K ids included) vs the reference's on the same features_n."""
    features, weight, labels = make_problem(batch, num_classes, dim, dtype)
    features_n = reference.normalize_rows(features.float()).to(dtype)  # as topk_smoothed_xent hands them on
    check_shard_stats(shard_ops(backend, weight.device), features_n, weight, labels, 0, effective_k(k, num_classes),
                      temperature)
    options = dict(temperature=temperature, k=k, alpha=alpha)
    expected = loss_and_grads(lambda f, w: reference.topk_smoothed_xent(f, w, labels, **options),
                              features.double(), weight.double())
    actual = loss_and_grads(lambda f, w: topk_smoothed_xent(f, w, labels, backend=backend, **options), features, weight)
    assert actual[1].dtype == actual[2].dtype == dtype  # gradients in the inputs' dtype
    for name, got, want in zip(["loss", "dE", "dW"], actual, expected):
        assert relative_error(got, want) < TOLERANCE[dtype], (name, relative_error(got, want))


def check_shard_stats(ops, features_n, weight, labels, shard_start, k, temperature, exact_ids=True, **tiles):
    """shard_forward_stats of a backend vs the reference on the float64 values; every output written."""
    expected = reference.unpack_shard_stats(reference.shard_forward_stats(
        features_n.double(), weight.double(), labels, shard_start, temperature=temperature, k=k), k)
    block = ops.shard_forward_stats(features_n, weight, labels, shard_start, temperature=temperature, k=k, **tiles)
    assert block.shape == (len(labels), 2 + 2 * k)
    sum_exp, target_logit, topk_values, topk_indices = reference.unpack_shard_stats(block, k)
    tolerance = TOLERANCE[features_n.dtype]
    assert relative_error(sum_exp, expected[0]) < tolerance
    assert relative_error(target_logit, expected[1]) < tolerance
    assert topk_values.shape == topk_indices.shape == (len(labels), k)
    assert torch.equal(topk_values == float("-inf"), expected[2] == float("-inf"))
    finite = expected[2] > float("-inf")
    if finite.any():
        assert relative_error(topk_values[finite], expected[2][finite]) < tolerance
    if exact_ids:
        assert torch.equal(topk_indices.long(), expected[3])
    return expected


def check_shard_backward(ops, features_n, weight, labels, shard_start, lse, topk_indices, temperature, alpha, **tiles):
    grad_losses = torch.rand(len(labels), generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    expected = reference.shard_backward(features_n.double(), weight.double(), labels, shard_start, lse, topk_indices,
                                        grad_losses, temperature=temperature, alpha=alpha)
    actual = ops.shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_losses,
                                temperature=temperature, alpha=alpha, **tiles)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < TOLERANCE[features_n.dtype]
    return actual


# ---------------------------------------------------------------------------------------------
# Chunked torch backend: the broad grid (it is fast), several chunks per call.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [0.07, 0.15, 1.0])
@pytest.mark.parametrize("k", [0, 1, 5, 16, 32])
def test_chunked_matches_oracle(monkeypatch, k, temperature, dtype):
    # Cycle the other parameters through their values so every combination of them is seen somewhere.
    case = 5 * [0.07, 0.15, 1.0].index(temperature) + [0, 1, 5, 16, 32].index(k)
    batch, dim, alpha = [1, 7, 64][case % 3], [16, 64, 128][case // 5 % 3], [0.0, 0.2][case % 2]
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * batch)  # 7-class chunks: 43 classes make 7 ragged chunks
    check_against_oracle("chunked", batch, 43, dim, k, alpha, temperature, dtype)


@pytest.mark.parametrize("batch,shard_classes,shard_start,k", [(9, 40, 30, 5), (6, 3, 4, 5), (1, 50, 0, 32)])
def test_chunked_shard_level_with_offsets_and_padding(batch, shard_classes, shard_start, k):
    """Labels inside and outside the shard; a shard with fewer classes than K pads with -inf / -1."""
    features, weight, _ = make_problem(batch, shard_classes, 16, torch.float32)
    labels = torch.randint(0, shard_start + shard_classes + 20, (batch,), generator=torch.Generator().manual_seed(3))
    features_n = reference.normalize_rows(features)
    check_shard_stats(chunked, features_n, weight, labels, shard_start, k, 0.1, chunk_elements=2 * batch)
    lse = torch.logsumexp(torch.randn(batch, 4, dtype=torch.float64), 1) + 10
    check_shard_backward(chunked, features_n, weight, labels, shard_start, lse,
                         merged_topk_like(labels, shard_start + shard_classes + 20, k), 0.1, 0.2, chunk_elements=2 * batch)


def merged_topk_like(labels, num_classes, k):
    """What the merge hands the backward: k distinct non-target global ids per row, from every shard,
    -1 padded (here every third row ends with padding)."""
    scores = torch.rand(len(labels), num_classes, generator=torch.Generator().manual_seed(4))
    topk_indices = reference.hardest_classes(scores, labels, k)
    topk_indices[::3, -1] = -1
    return topk_indices


def ties_problem(batch, num_classes, dim=16):
    """Entries +-1 (norm 4, a power of two) and tau = 0.5: every logit is exact, and equal logits
    abound, so the top-K tie rule (lower class id first) is tested across chunks, tiles and splits."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randint(0, 2, (batch, dim), generator=generator).float() * 2 - 1
    weight = torch.randint(0, 2, (num_classes, dim), generator=generator).float() * 2 - 1
    return reference.normalize_rows(features), weight, torch.randint(0, num_classes, (batch,), generator=generator)


@pytest.mark.parametrize("k, chunk_classes", [(16, 7), (5, 30)])  # chunks narrower than K, and groups straddling K
def test_chunked_ties_go_to_the_lower_class_id(k, chunk_classes):
    features_n, weight, labels = ties_problem(12, 90)
    check_shard_stats(chunked, features_n, weight, labels, 0, k, 0.5, chunk_elements=12 * chunk_classes)


def test_exact_topk_gives_a_group_straddling_the_kth_place_its_lowest_columns():
    """Rows of few distinct values (most have a group of equal values across the k-th place), against a stable
    sort; the order inside the k is free (select_topk orders the candidates), the set is not."""
    logits = torch.randint(0, 4, (200, 9), generator=torch.Generator().manual_seed(6)).float()
    logits[0] = torch.tensor([3.0, 1, 2, 2, 2, 2, 0, 2, 1])  # k = 3: one 3, then the first two of five 2s
    for k in (1, 3, 8):
        values, columns = chunked.exact_topk(logits, k)
        stable = torch.sort(logits, dim=1, descending=True, stable=True)
        assert torch.equal(values, stable.values[:, :k])
        assert torch.equal(columns.sort(dim=1).values, stable.indices[:, :k].sort(dim=1).values), k
    assert chunked.exact_topk(logits[:1], 3)[1].sort().values.tolist() == [[0, 2, 3]]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_chunked_forward_and_backward_never_make_the_host_wait(device):
    """On CUDA every read of a device value by the host (`if t.any()`, a boolean index, nonzero, item) waits for
    the GPU, once per class chunk here. Counted on the CPU (kernels.launches), and run on the meta device, whose
    values no host can read: ties straddling the K-th place, targets inside, outside and across 7 chunks."""
    features_n, weight, labels = ties_problem(12, 90)
    labels[::4] += 90  # another shard's classes
    k, chunks = 5, dict(chunk_elements=12 * 13)
    topk_indices = merged_topk_like(labels, 180, k)
    features_n, weight, labels, lse, topk_indices, grad_losses = [tensor.to(device) for tensor in (
        features_n, weight, labels, torch.rand(12) + 9, topk_indices, torch.ones(12))]
    with LaunchCounter() as counted:
        block = chunked.shard_forward_stats(features_n, weight, labels, 0, temperature=0.5, k=k, **chunks)
        grads = chunked.shard_backward(features_n, weight, labels, 0, lse, topk_indices, grad_losses,
                                       temperature=0.5, alpha=0.2, **chunks)
    assert counted.syncs == []
    assert block.shape == (12, 2 + 2 * k) and [grad.shape for grad in grads] == [features_n.shape, weight.shape]


@pytest.mark.slow
def test_chunked_extra_memory_does_not_grow_with_classes():
    """Peak RSS of a fresh process around the chunked forward + backward at B = 256, D = 16 with 2^18-
    element (1 MiB) chunks, for C = 50k and 200k: a [B, C] fp32 buffer would be 49 / 195 MiB; the
    chunked path needs a few [B, chunk] blocks whatever C is, plus O(C D) buffers of the weight
    normalisation and the dW output ([C, D] = 3 / 12 MiB; the output is subtracted)."""
    script = textwrap.dedent("""
        import sys, torch
        from kernels import chunked, reference
        def rss_mib(field):
            return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) / 1024
        chunked.CHUNK_ELEMENTS, num_classes = 2**18, int(sys.argv[1])
        features_n = reference.normalize_rows(torch.randn(256, 16))
        weight = torch.randn(num_classes, 16)
        labels = torch.randint(0, num_classes, (256,))
        torch.ones(8).sum()  # warm up the allocator and thread pool
        before = rss_mib('VmRSS')
        sum_exp, _, _, topk_indices = reference.unpack_shard_stats(
            chunked.shard_forward_stats(features_n, weight, labels, 0, temperature=0.1, k=5), 5)
        chunked.shard_backward(features_n, weight, labels, 0, sum_exp.log() + 10, topk_indices.long(), torch.ones(256),
                               temperature=0.1, alpha=0.2)
        print(rss_mib('VmHWM') - before - num_classes * 16 * 4 / 2**20)
    """)
    extra = {}
    for num_classes in (50_000, 200_000):
        result = subprocess.run([sys.executable, "-c", script, str(num_classes)], cwd=ROOT, capture_output=True,
                                text=True, check=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
        extra[num_classes] = float(result.stdout.split()[-1])
    # From 50k to 200k classes one [B, C] buffer would add 146 MiB, one [C, D] buffer 9 MiB: allow three
    # [C, D] temporaries (the allocator may or may not reuse them) and RSS noise, far below one [B, C].
    column_growth = (200_000 - 50_000) * 16 * 4 / 2**20
    assert extra[200_000] - extra[50_000] < 3 * column_growth, extra
    assert extra[200_000] < 256 * 200_000 * 4 / 2**20 / 4, extra  # and far below one [B, C] buffer (195 MiB)


# ---------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU): every parameter value at least once.

TRITON_CASES = [
    # batch, num_classes, dim, k, alpha, temperature, dtype
    (1, 37, 16, 1, 0.2, 0.07, torch.float32),
    (7, 53, 64, 5, 0.2, 0.15, torch.float32),
    (33, 300, 128, 16, 0.0, 1.0, torch.float32),
    (20, 45, 48, 32, 0.2, 0.15, torch.float32),
    (9, 100, 16, 0, 0.2, 0.07, torch.float32),
    (3, 6, 16, 16, 0.2, 0.15, torch.float32),  # K clamped to C - 1 = 5
    (17, 131, 64, 5, 0.2, 0.15, torch.bfloat16),
    (5, 40, 128, 32, 0.2, 1.0, torch.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("batch,num_classes,dim,k,alpha,temperature,dtype", TRITON_CASES)
def test_triton_matches_oracle(batch, num_classes, dim, k, alpha, temperature, dtype):
    check_against_oracle("triton", batch, num_classes, dim, k, alpha, temperature, dtype)


# Small tiles and explicit splits: many row blocks, class tiles and splits, all with ragged edges.
SMALL_TILES = [dict(block_batch=16, block_classes=16, num_splits=3), dict(block_batch=16, block_classes=32, num_splits=1)]


@pytest.mark.slow
@pytest.mark.parametrize("tiles", SMALL_TILES, ids=["splits3", "splits1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_shard_level_tiles_splits_offsets(tiles, dtype):
    """Labels inside and outside the shard, top-K ids of other shards and -1 padding in the backward."""
    batch, shard_classes, shard_start, k = 19, 70, 25, 5
    features, weight, _ = make_problem(batch, shard_classes, 16, dtype)
    labels = torch.randint(0, 120, (batch,), generator=torch.Generator().manual_seed(3))
    features_n = reference.normalize_rows(features.float()).to(dtype)
    check_shard_stats(triton_topk_xent, features_n, weight, labels, shard_start, k, 0.1, **tiles)
    topk_indices = merged_topk_like(labels, 120, k)
    lse = torch.logsumexp(torch.randn(batch, 4, dtype=torch.float64), 1) + 10
    check_shard_backward(triton_topk_xent, features_n, weight, labels, shard_start, lse, topk_indices, 0.1, 0.2, **tiles)


def test_triton_shard_smaller_than_k_is_padded():
    features, weight, labels = make_problem(4, 3, 16, torch.float32)
    check_shard_stats(triton_topk_xent, reference.normalize_rows(features), weight, labels, 0, 8, 0.2)


@pytest.mark.parametrize("tiles", SMALL_TILES, ids=["splits3", "splits1"])
def test_triton_ties_go_to_the_lower_class_id(tiles):
    features_n, weight, labels = ties_problem(12, 90)
    check_shard_stats(triton_topk_xent, features_n, weight, labels, 0, 16, 0.5, **tiles)


@pytest.mark.slow
def test_triton_writes_every_output_and_is_deterministic(monkeypatch):
    """Fill every buffer the launchers allocate with NaN (ints with a bogus id): the results must be
    bit-identical to a clean run, so every element was written and nothing depends on run order."""
    features, weight, labels = make_problem(21, 75, 16, torch.float32)
    features_n = reference.normalize_rows(features)
    options = dict(temperature=0.1, **SMALL_TILES[0])
    lse = torch.logsumexp(torch.randn(21, 4), 1) + 10
    grad_losses = torch.rand(21)

    def run():
        stats = triton_topk_xent.shard_forward_stats(features_n, weight, labels, 0, k=5, **options)
        topk_indices = reference.unpack_shard_stats(stats, 5)[3].long()
        return (stats, *triton_topk_xent.shard_backward(features_n, weight, labels, 0, lse, topk_indices, grad_losses,
                                                        alpha=0.2, **options))

    clean = run()
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else 7777)

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for got, want in zip(run(), clean):
        assert torch.equal(got, want)  # NaN != NaN: a NaN left in a buffer fails here


@pytest.mark.parametrize("call,message", [
    (lambda ops, f, w, y: ops.shard_forward_stats(f, w, y, 0, temperature=0.1, k=33), "k must be in [0, 32], got 33"),
    (lambda ops, f, w, y: ops.shard_forward_stats(f.double(), w, y, 0, temperature=0.1, k=1),
     "features_n must be float32 or bfloat16 for the Triton kernels, got torch.float64"),
    (lambda ops, f, w, y: ops.shard_forward_stats(f, w, y[:2], 0, temperature=0.1, k=1),
     "labels must be integer ids [4], got torch.int64 [2]"),
    (lambda ops, f, w, y: ops.shard_forward_stats(f, w, y, 0, temperature=0.1, k=1, compute_dtype=torch.float16),
     "compute_dtype must be float32 or bfloat16 for the Triton kernels, got torch.float16"),
    (lambda ops, f, w, y: ops.shard_backward(f, w, y, 0, y.float(), y[:, None], y.float(), temperature=0.0, alpha=0.1),
     "temperature must be > 0, got 0.0"),
    (lambda ops, f, w, y: ops.shard_forward_stats(torch.zeros(4, 300), torch.zeros(5, 300), y, 0, temperature=0.1, k=1),
     "feature dim must be in [1, 256], got 300"),
])
def test_triton_bad_input_is_a_clear_error(call, message):
    features, weight, labels = make_problem(4, 5, 16, torch.float32)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(triton_topk_xent, features, weight, labels)


# ---------------------------------------------------------------------------------------------
# Seeding.

@pytest.mark.parametrize("weight_dtype,features_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                         (torch.float64, torch.float64), (torch.float32, torch.bfloat16)])
def test_triton_seed_equals_reference(weight_dtype, features_dtype):
    """Duplicate ids (last one wins), ids outside the shard, D not a power of two."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(40, 24, generator=generator).to(features_dtype)
    ids = torch.randint(90, 160, (40,), generator=generator)
    ids[7] = ids[31] = 120  # duplicates
    weight = torch.randn(50, 24, generator=generator).to(weight_dtype)
    expected, actual = weight.clone(), weight.clone()
    written = reference.seed_rows_(expected, features, ids, 100)
    assert seed_rows_(actual, features, ids, 100, backend="triton") == written > 0
    tolerance = {torch.float64: 1e-15, torch.float32: 1e-7, torch.bfloat16: 4e-3}[weight_dtype]
    assert (actual.double() - expected.double()).abs().max() <= tolerance
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids[(ids >= 100) & (ids < 150)] - 100] = False
    assert torch.equal(actual[untouched], weight[untouched])


def test_seed_dispatch():
    weight, features, ids = torch.zeros(4, 3), torch.ones(2, 3), torch.tensor([1, 9])
    assert seed_rows_(weight, features, ids, 0) == 1  # auto on CPU: the reference
    assert torch.allclose(weight[1], torch.full((3,), 3**-0.5)) and not weight[[0, 2, 3]].any()
    with pytest.raises(ValueError, match="unknown seeding backend 'cuda'"):
        seed_rows_(weight, features, ids, 0, backend="cuda")
