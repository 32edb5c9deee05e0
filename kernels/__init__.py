"""Kernels of the instance classifier: the smoothed cosine-softmax cross-entropy and weight seeding.

Usable alone (no Horovod, no DALI):
    from kernels import topk_smoothed_xent
    loss = topk_smoothed_xent(features, weight, labels, temperature=0.15, k=5, alpha=0.2)

Shard level (what model.classifier uses across ranks): `sharded_topk_xent` with an `exchange`
collective, built on a backend's `shard_forward_stats` / `shard_backward` pair (kernels.reference,
kernels.chunked, kernels.triton_topk_xent) and `merge_shard_stats`. `kernels.reference` is the
float64 oracle.

Backends: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1 set before triton is imported) takes fp32
or bf16 features and weight, K <= 32 and D <= 256, accumulates and returns statistics in fp32;
'chunked' (plain torch, no [B, C] buffer) and 'reference' (dense) take any float dtype and compute in
reference.accumulation_dtype (fp32 at least). 'auto' is Triton on CUDA and chunked elsewhere.
Weight seeding: `seed_rows_`. Names (B, C, N, batch, classes) as defined in kernels.reference.
"""
from kernels import reference, triton_seed
from kernels.topk_xent import (merge_shard_stats, pack_shard_stats, shard_ops, sharded_topk_xent,
                               topk_smoothed_xent)


def seed_rows_(weight, features, ids, shard_start, *, backend="auto"):
    """Raw-feature init: weight[id - shard_start] = features / |features| for the ids this shard owns.

    weight [C, D] is written in place; features [B, D]; ids [B] global ids; duplicate ids: the last
    occurrence wins. Returns the number of rows written. backend: 'auto' (the Triton kernel on CUDA,
    the reference torch code elsewhere), 'triton' or 'reference'.
    """
    if backend == "auto":
        backend = "triton" if weight.is_cuda else "reference"
    seeders = {"reference": reference.seed_rows_, "triton": triton_seed.seed_rows_}
    if backend not in seeders:
        raise ValueError(f"unknown seeding backend {backend!r}; expected auto, reference or triton")
    return seeders[backend](weight, features, ids, shard_start)


__all__ = ["merge_shard_stats", "pack_shard_stats", "seed_rows_", "shard_ops", "sharded_topk_xent",
           "topk_smoothed_xent"]
