"""Triton raw-feature seeding of classifier rows: W[id - shard_start] = f / |f| for the ids a shard owns.

Same contract as kernels.reference.seed_rows_ (the oracle): duplicate ids in one call, last occurrence
wins; ids outside [shard_start, shard_start + C) are ignored. The host resolves the duplicates first
(reference.last_writers, O(B)), so every program writes distinct classes and the scatter has no race;
the kernel fuses the normalisation, the cast to W's dtype and the scatter, one pass over the batch.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import NORM_EPS, accumulation_dtype, last_writers

# Classes seeded per program: the batch is small (thousands of samples), so a few per program are enough
# to fill the GPU and keep a [BLOCK_N, D] fp32 tile in registers up to D = 256.
BLOCK_N = 16


@triton.jit
def _seed_rows_kernel(features_ptr, sources_ptr, classes_ptr, weight_ptr, num_writes, dim,
                      stride_features, stride_weight, norm_eps,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """weight[classes[n]] = features[sources[n]] / max(|features[sources[n]]|, eps) for n < num_writes.

    features_ptr [B, D]; sources_ptr, classes_ptr [M] int64 (local class ids, distinct); weight_ptr [C, D] written in place
    (row stride stride_weight, unit stride along D). Grid (cdiv(M, BLOCK_N),).
    """
    writes = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    write_ok = writes < num_writes
    dims = tl.arange(0, BLOCK_D)
    mask = write_ok[:, None] & (dims < dim)[None, :]
    sources = tl.load(sources_ptr + writes, mask=write_ok, other=0)
    classes = tl.load(classes_ptr + writes, mask=write_ok, other=0)
    x = tl.load(features_ptr + sources[:, None] * stride_features + dims[None, :], mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), norm_eps)[:, None]
    tl.store(weight_ptr + classes[:, None] * stride_weight + dims[None, :], x.to(weight_ptr.dtype.element_ty), mask=mask)


@torch.no_grad()
def seed_rows_(weight, features, ids, shard_start):
    """Triton version of kernels.reference.seed_rows_; returns the number of rows of W written.

    weight [C, D] (written in place; unit stride along D), features [B, D], ids [B]; any float dtypes,
    normalised in reference.accumulation_dtype like the reference.
    """
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"need features [B, D] and weight [C, D], got {list(features.shape)} and {list(weight.shape)}")
    if ids.shape != features.shape[:1]:
        raise ValueError(f"ids must be [{features.shape[0]}], got {list(ids.shape)}")
    if weight.stride(1) != 1:
        raise ValueError(f"weight is written in place and needs unit stride along D, got strides {weight.stride()}")
    sources, classes = last_writers(ids.to(weight.device), shard_start, weight.shape[0])
    if len(classes):
        features = features.to(weight.device).contiguous()
        _seed_rows_kernel[(triton.cdiv(len(classes), BLOCK_N),)](
            features, sources, classes, weight, len(classes), features.shape[1], features.stride(0), weight.stride(0),
            NORM_EPS, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(features.shape[1]),
            COMPUTE_DTYPE=tl.float64 if accumulation_dtype(features.dtype) == torch.float64 else tl.float32)
    return len(classes)
