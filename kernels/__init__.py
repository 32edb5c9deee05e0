"""Kernels of the instance classifier: the smoothed cosine-softmax cross-entropy and weight seeding.

Usable alone (no Horovod, no DALI):
    from kernels import topk_smoothed_xent
    loss = topk_smoothed_xent(features, weight, labels, temperature=0.15, k=5, alpha=0.2)

Shard level (what model.classifier uses across ranks): `sharded_topk_xent` with an `exchange`
collective, built on a backend's `shard_forward_stats` / `shard_backward` pair (kernels.reference,
kernels.chunked, kernels.triton_topk_xent) and `merge_shard_stats`. `kernels.reference` is the
float64 oracle.
"""
from kernels.topk_xent import (merge_shard_stats, pack_shard_stats, shard_ops, sharded_topk_xent,
                               topk_smoothed_xent)

__all__ = ["merge_shard_stats", "pack_shard_stats", "shard_ops", "sharded_topk_xent", "topk_smoothed_xent"]
