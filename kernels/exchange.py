"""What the shards exchange, packed so that every exchange is one collective, and the exact merge, in torch.

The sharded loss needs two exchanges per step (kernels.topk_xent): the normalized features of the global
batch with their instance ids, and the per-shard statistics. Each travels as ONE block:

  features with ids  [b, W] per rank: the normalized features (fp32 at least: Horovod has no bf16) in
                     columns [0, D), then the int64 id in the bits of the last 8 bytes of the row (two
                     float32 columns, one more if D is odd so that the id is 8-byte aligned; one float64
                     column). Copying bytes is exact for every id; the receiver reads both through views.
  statistics         [B, 2 + 2K] per shard, kernels.reference.pack_shard_stats.

Merge (why it is exact), for the statistics of all shards gathered in rank order [P, B, 2 + 2K]:
  * logsumexp: every cosine logit is <= 1/tau, so each shard reports sum_j exp(z_ij - 1/tau) with the
    same fixed shift and lse_i = 1/tau + log(sum over shards); no max exchange is needed.
  * target logit: only the owner of y_i reports a non-zero value, so the sum over shards is exact.
  * top-K: the global top-K of non-target logits is inside the union of the shards' local top-Ks, and
    kernels.reference.select_topk picks it with the oracle's tie rule (larger value, then lower id).
From them, per sample: the loss, and the diagnostics own_probability = exp(z_{i,y_i} - lse_i) and
own_is_top1 (z_{i,y_i} beats the best other class, ties to the lower id as in an argmax): the merge
always gets K >= 1 candidates for that, and smooths with the first K of them. A label outside [0, N)
makes that sample's loss NaN: bad input gives a defined, detectable result without a host check.
This module is the torch version (reference and chunked backends); kernels.triton_exchange does the
same in one kernel per step.
"""
from types import SimpleNamespace

import torch

from kernels.reference import (accumulation_dtype, normalize_backward, normalize_rows, select_topk, smoothed_losses,
                               stats_ids)


def packed_width(dim, dtype):
    """Columns of a features-with-ids row: D, alignment padding, and the 8 bytes of the id."""
    return dim + 1 if dtype == torch.float64 else dim + dim % 2 + 2


def feature_ids(block):
    """The int64 ids of a features-with-ids block [..., W]: a view of its last 8 bytes per row."""
    width = 1 if block.dtype == torch.float64 else 2
    return block[..., block.shape[-1] - width:].view(torch.int64)[..., 0]


def unpack_features(block, dim):
    """(normalized features [B, D], ids [B] int64) of a received block [B, W]: views, no copy."""
    return block[:, :dim], feature_ids(block)


def pack_features(features, ids, copies):
    """`copies` identical blocks [copies, b, W] of the normalized features (in accumulation_dtype) with their
    ids, so that an alltoall sends one to every rank. The padding column, if any, is zero."""
    dtype = accumulation_dtype(features.dtype)
    block = torch.zeros(copies, len(ids), packed_width(features.shape[1], dtype), dtype=dtype, device=features.device)
    block[:, :, :features.shape[1]] = normalize_rows(features.to(dtype))
    feature_ids(block).copy_(ids)
    return block


def features_backward(grad_features_n, features):
    """d/d features of the loss, from the dE_n [copies, b, D] that every rank computed for these samples:
    their SUM, through the normalisation e = f / max(|f|, eps). In the features' dtype."""
    dtype = accumulation_dtype(features.dtype)
    features_c = features.to(dtype)
    grad = normalize_backward(features_c, normalize_rows(features_c), grad_features_n.to(dtype).sum(dim=0))
    return grad.to(features.dtype)


def merge_shard_stats(gathered, labels, *, num_classes, k, temperature, alpha):
    """Merge the exchange blocks of all shards, gathered [P, B, 2 + 2K'] in rank order (K' >= max(k, 1)).

    labels [B]: global ids, to check their range. Returns a namespace of, per sample of the global batch:
    lse, target_logit, losses (NaN where the label is outside [0, num_classes)), own_probability,
    own_is_top1 (bool), and the merged top-K' topk_values / topk_indices (long, -1 padded), descending.
    Deterministic: every rank merges the same gathered block the same way, so the loss is bit-identical
    on every rank.
    """
    batch = gathered.shape[1]
    candidates = (gathered.shape[2] - 2) // 2
    lse = gathered[:, :, 0].sum(dim=0).log() + 1.0 / temperature
    target_logit = gathered[:, :, 1].sum(dim=0)
    values = gathered[:, :, 2:2 + candidates].permute(1, 0, 2).reshape(batch, -1)  # [B, P K']
    indices = stats_ids(gathered, candidates).permute(1, 0, 2).reshape(batch, -1).long()
    topk_values, topk_indices = select_topk(values, indices, candidates)
    losses = smoothed_losses(SimpleNamespace(lse=lse, target_logit=target_logit, topk_values=topk_values[:, :k]), alpha)
    bad_label = (labels < 0) | (labels >= num_classes)
    best_other, best_other_id = topk_values[:, 0], topk_indices[:, 0]
    return SimpleNamespace(
        lse=lse, target_logit=target_logit, topk_values=topk_values, topk_indices=topk_indices,
        losses=torch.where(bad_label, float("nan"), losses),
        own_probability=torch.exp(target_logit - lse),
        own_is_top1=(target_logit > best_other) | ((target_logit == best_other) & (labels < best_other_id)))

