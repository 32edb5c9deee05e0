"""Kernels of the instance classifier: the smoothed cosine-softmax cross-entropy and weight seeding.

Usable alone (no Horovod, no DALI):
    from kernels import topk_smoothed_xent
    loss = topk_smoothed_xent(features, weight, labels, temperature=0.15, k=5, alpha=0.2)

Shard level (what model.classifier uses across ranks): `NormalizedExchange` brings the normalized
features of the global batch with their ids (one collective), `sharded_topk_xent` computes a shard's
loss with one collective for the statistics; both take the collectives as one object (kernels.topk_xent
says what it holds; `SingleDevice` is the one of a single device), built on a backend's functions
(`shard_ops`: kernels.reference, kernels.chunked, kernels.triton_topk_xent with the exchange glue of
kernels.exchange / kernels.triton_exchange). `kernels.reference` is the float64 oracle;
`kernels.launches` counts launches, collectives and host syncs of a piece of code, on any machine.

Backends: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1 set before triton is imported) takes fp32
or bf16 features and weight, K <= 32 and D <= 256, accumulates and returns statistics in fp32;
'chunked' (plain torch, no [B, C] buffer) and 'reference' (dense) take any float dtype and compute in
reference.accumulation_dtype (fp32 at least). All round the products' operands to `compute_dtype`
when given. 'auto' is Triton on CUDA and chunked elsewhere. Weight seeding: `seed_rows_`.
Names (B, C, N, batch, classes) as defined in kernels.reference.
"""
from kernels import reference
from kernels.exchange import merge_shard_stats
from kernels.reference import pack_shard_stats
from kernels.topk_xent import (NormalizedExchange, SingleDevice, shard_ops, sharded_topk_xent,
                               sharded_topk_xent_and_stats, topk_smoothed_xent)


def seed_rows_(weight, features, ids, shard_start, *, backend="auto"):
    """Raw-feature init: weight[id - shard_start] = features / |features| for the ids this shard owns.

    weight [C, D] is written in place; features [B, D]; ids [B] global ids; duplicate ids: the last
    occurrence wins. Returns the number of rows written. backend: 'auto' (the Triton kernel on CUDA,
    the reference torch code elsewhere), 'triton' or 'reference'.
    """
    if backend == "auto":
        backend = "triton" if weight.is_cuda else "reference"
    if backend == "triton":
        from kernels import triton_seed  # imports Triton: on first use, as kernels.topk_xent.triton_ops says why
        return triton_seed.seed_rows_(weight, features, ids, shard_start)
    if backend != "reference":
        raise ValueError(f"unknown seeding backend {backend!r}; expected auto, reference or triton")
    return reference.seed_rows_(weight, features, ids, shard_start)


__all__ = ["NormalizedExchange", "SingleDevice", "merge_shard_stats", "pack_shard_stats", "seed_rows_", "shard_ops",
           "sharded_topk_xent", "sharded_topk_xent_and_stats", "topk_smoothed_xent"]
