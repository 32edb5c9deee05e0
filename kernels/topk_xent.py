"""The smoothed cosine-softmax cross-entropy over classes split into shards, exact.

Each shard (one per rank in the hybrid-parallel classifier, or the whole W on one device) computes
local statistics of its logit block with a backend's `shard_forward_stats`; the statistics of all
shards are exchanged in ONE collective (`exchange`: [B, S] -> [P, B, S]) and merged into the global
logsumexp, target logit and top-K; the backward pass turns the merged statistics into this shard's
gradients with the backend's `shard_backward`, so no rank ever sees another shard's logits.

Merge (why it is exact):
  * logsumexp: every cosine logit is <= 1/tau, so each shard reports sum_j exp(z_ij - 1/tau) with the
    same fixed shift and lse_i = 1/tau + log(sum over shards); no max exchange is needed.
  * target logit: only the owner of y_i reports a non-zero value, so the sum over shards is exact.
  * top-K: the global top-K of non-target logits is inside the union of the shards' local top-Ks.
    Shards are contiguous and concatenated in rank order, so a stable descending sort of the
    concatenation breaks ties by the lower class index, as the oracle does.
Statistics travel packed as one [B, 2 + 2K] block in their own dtype, fp32 (values and class ids, the
ids exact below 2^24 classes; float64 beyond that or for float64 inputs).
"""
from types import SimpleNamespace

import torch

from kernels import chunked, reference, triton_topk_xent
from kernels.reference import accumulation_dtype, effective_alpha, effective_k


EXACT_FLOAT32_IDS = 2 ** 24  # float32 holds every integer below this exactly


def pack_shard_stats(sum_exp, target_logit, topk_values, topk_indices, num_classes):
    """One block per sample: [sum_exp, target_logit, K values, K class ids].  [B, 2 + 2K]

    In the statistics' own dtype (fp32 for fp32 and bf16 inputs), so nothing is rounded on the way, and
    float64 when class ids would not fit a float32 exactly (N > 2^24) or the inputs are float64.
    """
    exact_in_float32 = sum_exp.dtype != torch.float64 and num_classes <= EXACT_FLOAT32_IDS
    dtype = torch.float32 if exact_in_float32 else torch.float64
    return torch.cat([sum_exp[:, None], target_logit[:, None], topk_values, topk_indices.to(topk_values.dtype)],
                     dim=1).to(dtype)


def merge_shard_stats(gathered, k, temperature):
    """Merge the stats of all shards, gathered [P, B, 2 + 2K] in rank order, into the global ones.

    Returns a namespace of lse [B], target_logit [B], topk_values [B, K] in the packed dtype and long
    topk_indices [B, K]. Deterministic: every rank merges the same gathered block the same way, so the loss is
    bit-identical on every rank.
    """
    num_shards, batch = gathered.shape[:2]
    lse = gathered[:, :, 0].sum(dim=0).log() + 1.0 / temperature
    target_logit = gathered[:, :, 1].sum(dim=0)
    candidates = gathered[:, :, 2:].permute(1, 0, 2)  # [B, P, 2K]
    values = candidates[:, :, :k].reshape(batch, num_shards * k)
    indices = candidates[:, :, k:].reshape(batch, num_shards * k)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return SimpleNamespace(lse=lse, target_logit=target_logit, topk_values=values.gather(1, order),
                           topk_indices=indices.gather(1, order).long())


def smoothed_losses(merged, alpha):
    """loss_i = lse_i - (1 - alpha) z_{i,y_i} - alpha/K sum_{j in T_i} z_ij, from merged stats.  [B]"""
    loss = merged.lse - (1.0 - alpha) * merged.target_logit
    if merged.topk_values.shape[1] > 0:
        loss = loss - alpha * merged.topk_values.mean(dim=1)
    return loss


def single_shard_exchange(packed):
    """The exchange of a job with one shard: nothing to send."""
    return packed[None]


class ShardedTopKXent(torch.autograd.Function):
    """Global-batch mean loss of one shard's view; gradients for the normalized features and the shard.

    features_n [B, D] are the normalized features of the GLOBAL batch, weight [C, D] the raw rows of this
    shard's classes [shard_start, shard_start + C), labels [B] global ids, k already clamped to N - 1.
    features_n.grad is this shard's PARTIAL dE (the caller sums partials over shards).
    """

    @staticmethod
    def forward(ctx, features_n, weight, labels, shard_start, num_classes, temperature, k, alpha, exchange, ops):
        stats = ops.shard_forward_stats(features_n, weight, labels, shard_start, temperature=temperature, k=k)
        merged = merge_shard_stats(exchange(pack_shard_stats(*stats, num_classes)), k, temperature)
        loss = smoothed_losses(merged, alpha).mean()
        ctx.save_for_backward(features_n, weight, labels, merged.lse, merged.topk_indices)
        ctx.config = (shard_start, temperature, alpha, ops)
        ctx.mark_non_differentiable(merged.topk_indices)
        return loss.to(accumulation_dtype(features_n.dtype)), merged.topk_indices

    @staticmethod
    def backward(ctx, grad_loss, _grad_topk_indices):
        features_n, weight, labels, lse, topk_indices = ctx.saved_tensors
        shard_start, temperature, alpha, ops = ctx.config
        compute_dtype = accumulation_dtype(features_n.dtype)
        grad_losses = (grad_loss.to(compute_dtype) / len(labels)).expand(len(labels)).contiguous()
        grad_features_n, grad_weight = ops.shard_backward(
            features_n, weight, labels, shard_start, lse.to(compute_dtype), topk_indices, grad_losses,
            temperature=temperature, alpha=alpha)
        return grad_features_n, grad_weight, None, None, None, None, None, None, None, None


def shard_ops(backend, device):
    """The local stats / local backward pair: 'reference' (dense torch), 'chunked' (torch, no [B, C]
    buffer) or 'triton'; 'auto' is Triton on CUDA and the chunked torch path elsewhere."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "chunked"
    if backend == "reference":
        return reference
    if backend == "chunked":
        return chunked
    if backend == "triton":
        return triton_topk_xent
    raise ValueError(f"unknown kernel backend {backend!r}; expected auto, reference, chunked or triton")


def sharded_topk_xent(features_n, weight, labels, shard_start, num_classes, *, temperature, k, alpha,
                      exchange=single_shard_exchange, backend="auto"):
    """Loss (scalar) and merged top-K ids [B, K] of one shard; see ShardedTopKXent. K and alpha are
    clamped here (K <= N - 1; alpha = 0 when K = 0)."""
    k = effective_k(k, num_classes)
    return ShardedTopKXent.apply(features_n, weight, labels, shard_start, num_classes, float(temperature), k,
                                 effective_alpha(k, alpha), exchange, shard_ops(backend, weight.device))


def topk_smoothed_xent(features, weight, labels, *, temperature, k, alpha, backend="auto"):
    """Single-device loss: mean_i of the smoothed cosine-softmax cross-entropy (see kernels.reference).

    features [B, D] raw (normalized here), weight [N, D] raw, labels [B] long in [0, N).
    fp32 or bf16 inputs; statistics and accumulation in fp32 (float64 inputs stay float64 on the
    torch backends). Autograd flows to features and weight. Limits of the 'triton' backend: fp32 or
    bf16 only, K <= 32, D <= 256 (kernels.triton_topk_xent.MAX_K / MAX_FEATURE_DIM).
    """
    # Normalized in fp32 at least, then handed over in the input dtype: in bf16 the backward of the
    # normalisation cancels catastrophically (0.24 relative error on dE measured at tau = 1).
    features_n = reference.normalize_rows(features.to(accumulation_dtype(features.dtype))).to(features.dtype)
    loss, _ = sharded_topk_xent(features_n, weight, labels, 0, weight.shape[0],
                                temperature=temperature, k=k, alpha=alpha, backend=backend)
    return loss
