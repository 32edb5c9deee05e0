"""The smoothed cosine-softmax cross-entropy over classes split into shards, exact.

Each shard (one per rank in the hybrid-parallel classifier, or the whole W on one device) sees the
normalized features of the whole batch and computes local statistics of its logit block with a
backend's `shard_forward_stats`; the statistics of all shards are exchanged in ONE collective
(`collectives.stats`: [B, S] -> [P, B, S]) and merged exactly into the global logsumexp, target logit and
top-K (kernels.exchange says why the merge is exact); the backward pass turns the merged statistics
into this shard's gradients with the backend's `shard_backward`, so no rank ever sees another shard's
logits. The features themselves reach the shards through `NormalizedExchange`: normalized and packed
with their ids into one block per sample, one collective (`collectives.features`, the identity on one
device), and on the way back the dE of every shard summed and taken through the normalisation.

The collectives come in ONE object: `copies` (P, the shards the features go to), `features`
(packed [P, b, W] -> the global block [B, W] in rank order), `grad_features` (this shard's dE_n [B, D] -> the
partials [P, b, D] of this rank's samples) and `stats` ([B, S] -> [P, B, S], rank order). `SingleDevice` is the
one of a single device (nothing is sent); model.classifier builds the one of a process group.

A backend is the namespace of five functions (`shard_ops`): the loss pair shard_forward_stats /
shard_backward, merge_shard_stats, pack_features and features_backward. 'reference' (dense torch, the
oracle) and 'chunked' (torch, no [B, C] buffer) use the torch exchange glue of kernels.exchange;
'triton' uses the kernels of kernels.triton_topk_xent and kernels.triton_exchange, which makes one
forward + backward 14 launches on a GPU (kernels.launches counts them).

The merge always receives K' = max(K, 1) candidates per shard, so that the best non-target class is
known for the diagnostics (is the own class the top-1?) even without smoothing.
"""
from types import SimpleNamespace

import torch

from kernels import chunked, exchange, reference
from kernels.reference import effective_alpha, effective_k

TORCH_GLUE = dict(merge_shard_stats=exchange.merge_shard_stats, pack_features=exchange.pack_features,
                  features_backward=exchange.features_backward)
BACKENDS = {
    "reference": SimpleNamespace(shard_forward_stats=reference.shard_forward_stats,
                                 shard_backward=reference.shard_backward, **TORCH_GLUE),
    "chunked": SimpleNamespace(shard_forward_stats=chunked.shard_forward_stats, shard_backward=chunked.shard_backward,
                               **TORCH_GLUE),
}
MAX_CLASSES = 2**31  # class ids travel as int32 bits in the fp32 statistics


def shard_ops(backend, device):
    """The backend's functions: 'reference' (dense torch), 'chunked' (torch, no [B, C] buffer) or
    'triton'; 'auto' is Triton on CUDA and the chunked torch path elsewhere."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend == "triton":
        return triton_ops()
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected auto, reference, chunked or triton")
    return BACKENDS[backend]


def triton_ops():
    """The 'triton' backend's functions. Triton is imported here, on first use, not with the package: its import
    costs each process a noticeable start-up, and a CPU rank (the chunked backend) never launches a kernel."""
    from kernels import triton_exchange, triton_topk_xent
    return SimpleNamespace(shard_forward_stats=triton_topk_xent.shard_forward_stats,
                           shard_backward=triton_topk_xent.shard_backward,
                           merge_shard_stats=triton_exchange.merge_shard_stats,
                           pack_features=triton_exchange.pack_features,
                           features_backward=triton_exchange.features_backward)


class SingleDevice:
    """The collectives of one shard on one device: one copy, nothing to send."""
    copies = 1

    def features(self, packed):  # [1, b, W] -> [b, W]
        return packed[0]

    def grad_features(self, grad_features_n):  # [b, D] -> [1, b, D]
        return grad_features_n[None]

    def stats(self, packed):  # [B, S] -> [1, B, S]
        return packed[None]


class NormalizedExchange(torch.autograd.Function):
    """(features_n [B, D], labels [B]) of the global batch from this rank's (features [b, D], ids [b]).

    Forward: ops.pack_features normalizes the features (accumulation dtype) and packs them with their
    ids, `collectives.copies` times; collectives.features sends the packed blocks and returns the global
    block [B, W] in rank order; both outputs are views of it. Backward: collectives.grad_features
    returns the dE_n [copies, b, D] that every shard computed for this rank's samples, and
    ops.features_backward sums them and applies the Jacobian of the normalisation.
    """

    @staticmethod
    def forward(ctx, features, ids, ops, collectives):
        received = collectives.features(ops.pack_features(features, ids, collectives.copies))
        features_n, labels = exchange.unpack_features(received, features.shape[1])
        ctx.save_for_backward(features)
        ctx.ops, ctx.collectives = ops, collectives
        ctx.mark_non_differentiable(labels)
        ctx.set_materialize_grads(False)  # no zero tensors made for the outputs without a gradient
        return features_n, labels

    @staticmethod
    def backward(ctx, grad_features_n, _grad_labels):
        features, = ctx.saved_tensors
        grad = ctx.collectives.grad_features(grad_features_n.contiguous())
        return ctx.ops.features_backward(grad, features), None, None, None


class ShardedTopKXent(torch.autograd.Function):
    """Global-batch mean loss of one shard's view; gradients for the normalized features and the shard.

    features_n [B, D] are the normalized features of the GLOBAL batch, weight [C, D] the raw rows of this
    shard's classes [shard_start, shard_start + C), labels [B] global ids, k already clamped to N - 1.
    features_n.grad is this shard's PARTIAL dE (the caller sums partials over shards). Besides the loss
    it returns the merged per-sample results (kernels.exchange.merge_shard_stats), not differentiable.
    """

    @staticmethod
    def forward(ctx, features_n, weight, labels, shard_start, num_classes, temperature, k, alpha, compute_dtype,
                collectives, ops):
        stats = ops.shard_forward_stats(features_n, weight, labels, shard_start, temperature=temperature,
                                        k=max(k, 1), compute_dtype=compute_dtype)
        merged = ops.merge_shard_stats(collectives.stats(stats), labels, num_classes=num_classes, k=k,
                                       temperature=temperature, alpha=alpha)
        loss = merged.losses.mean()
        topk_indices = merged.topk_indices[:, :k]
        ctx.save_for_backward(features_n, weight, labels, merged.lse, topk_indices)
        ctx.config = (shard_start, temperature, alpha, compute_dtype, ops)
        outputs = (merged.lse, topk_indices, merged.topk_indices[:, 0], merged.own_probability, merged.own_is_top1)
        ctx.mark_non_differentiable(*outputs)
        ctx.set_materialize_grads(False)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_outputs):
        features_n, weight, labels, lse, topk_indices = ctx.saved_tensors
        shard_start, temperature, alpha, compute_dtype, ops = ctx.config
        grad_losses = (grad_loss / len(labels)).expand(len(labels))  # d(mean)/d(loss_i), not copied
        grad_features_n, grad_weight = ops.shard_backward(
            features_n, weight, labels, shard_start, lse, topk_indices, grad_losses,
            temperature=temperature, alpha=alpha, compute_dtype=compute_dtype)
        return grad_features_n, grad_weight, *[None] * 9


def sharded_topk_xent_and_stats(features_n, weight, labels, shard_start, num_classes, *, temperature, k, alpha,
                                compute_dtype=None, collectives=None, backend="auto"):
    """Loss (scalar, differentiable) of one shard, see ShardedTopKXent, and per sample of the global batch a
    namespace of: lse, hardest (merged top-K ids [B, K]), best_other (the best non-target id), and the
    diagnostics own_probability = exp(z_{i,y_i} - lse_i) and own_is_top1 (bool). K and alpha are clamped
    here (K <= N - 1; alpha = 0 when K = 0). `backend` is a name or a namespace from shard_ops; `collectives`
    the exchange's (default: SingleDevice), of which `stats` is used here.
    """
    if num_classes >= MAX_CLASSES:
        raise ValueError(f"at most 2^31 - 1 classes (ids travel as int32), got {num_classes}")
    k = effective_k(k, num_classes)
    ops = shard_ops(backend, weight.device) if isinstance(backend, str) else backend
    loss, lse, hardest, best_other, own_probability, own_is_top1 = ShardedTopKXent.apply(
        features_n, weight, labels, shard_start, num_classes, float(temperature), k, effective_alpha(k, alpha),
        compute_dtype, collectives or SingleDevice(), ops)
    return loss, SimpleNamespace(lse=lse, hardest=hardest, best_other=best_other, own_probability=own_probability,
                                 own_is_top1=own_is_top1)


def sharded_topk_xent(features_n, weight, labels, shard_start, num_classes, **options):
    """Loss (scalar) and merged top-K ids [B, K] of one shard; see sharded_topk_xent_and_stats."""
    loss, merged = sharded_topk_xent_and_stats(features_n, weight, labels, shard_start, num_classes, **options)
    return loss, merged.hardest


def topk_smoothed_xent(features, weight, labels, *, temperature, k, alpha, backend="auto", compute_dtype=None):
    """Single-device loss: mean_i of the smoothed cosine-softmax cross-entropy (see kernels.reference).

    features [B, D] raw (normalized here, in fp32 at least), weight [N, D] raw, labels [B] long in [0, N).
    fp32 or bf16 inputs; the products' operands are rounded to compute_dtype (default: the wider of the inputs'
    dtypes, so bf16 products when both are bf16; bf16 with fp32 inputs is what the classifier does on CUDA);
    statistics and accumulation in fp32 (float64 inputs stay float64 on the torch backends). Autograd flows to
    features and weight, gradients in their dtypes. Limits of the 'triton' backend: fp32 or bf16 only, K <= 32, D <= 256
    (kernels.triton_topk_xent.MAX_K / MAX_FEATURE_DIM).
    """
    ops = shard_ops(backend, weight.device)
    # Normalized in fp32 at least: in bf16 the backward of the normalisation cancels catastrophically
    # (0.24 relative error on dE measured at tau = 1); the products then round to the inputs' dtype.
    features_n, labels = NormalizedExchange.apply(features, labels, ops, SingleDevice())
    compute_dtype = compute_dtype or torch.promote_types(features.dtype, weight.dtype)
    loss, _ = sharded_topk_xent(features_n, weight, labels, 0, weight.shape[0], temperature=temperature, k=k,
                                alpha=alpha, compute_dtype=compute_dtype, backend=ops)
    return loss
