"""Triton kernels of the exchange glue around the loss kernels: one launch for each piece of kernels.exchange.

At the classifier's batch sizes (a few thousand samples, D = 128) this glue moves kilobytes, so what it
costs on a GPU is launches, not bandwidth: done with torch ops the merge, the packing and the
normalisation backward were ~60 launches per step. Here each is one kernel:

  _pack_features_kernel      features [b, D] -> `copies` blocks [b, W] of f / max(|f|, eps) with the
                             int64 id in the row's last 8 bytes (kernels.exchange.pack_features)
  _features_backward_kernel  sum of the received dE_n [copies, b, D], then the Jacobian of the
                             normalisation (kernels.exchange.features_backward)
  _merge_splits_kernel       the class splits of the forward kernel -> this shard's exchange block
  _merge_shards_kernel       the gathered blocks of all shards -> lse, losses, diagnostics, top-K
                             (kernels.exchange.merge_shard_stats)

Both merges read "parts" laid out like an exchange block, [parts, B, 2 + 2 KC] (sum_exp, target logit,
KC candidate values, KC candidate ids as integer bits): sums over parts in part order, and the top-K of
the union of the candidates with the oracle's tie rule (larger value, then lower id), found by
streaming the candidates through a running top-K_PAD per sample (_merge_parts). Deterministic, no
atomics, so every rank merges the same gathered block into the same bits.
"""
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from kernels.exchange import feature_ids, packed_width
from kernels.reference import NORM_EPS, accumulation_dtype, stats_ids

# Samples per program of the glue kernels: B is a few thousand at most, so 16 samples per program give
# hundreds of programs, and a [16, CANDIDATE_CHUNK] tile of candidates stays small.
GLUE_BATCH_BLOCK = 16
# Candidates (part, slot) streamed per step of a merge: the forward kernel's class splits give up to
# ~500 parts x K_PAD candidates per sample at small B, so a few hundred per step keep the loop short.
CANDIDATE_CHUNK = 128
# Parts summed per step of a merge (sum_exp and target logit).
PART_CHUNK = 64
NO_ID = tl.constexpr(2**62)  # sorts after every class id: the id of an empty slot of a running top-K


@triton.jit
def _pack_features_kernel(features_ptr, ids_ptr, block_ptr, block_ids_ptr, batch, dim, copies,
                          stride_features, stride_features_dim, stride_ids, stride_block, stride_block_ids, norm_eps,
                          BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, COLUMNS: tl.constexpr):
    """block[c, i, :D] = f_i / max(|f_i|, eps), block[c, i, D:COLUMNS] = 0 (alignment padding) and the id
    of sample i in block_ids[c, i], for every copy c.  Grid (cdiv(b, BLOCK_B),).

    features_ptr [b, D] any float dtype, any strides; ids_ptr [b] int64; block_ptr [copies * b, W] in the accumulation
    dtype (row stride stride_block), block_ids_ptr its int64 view (row stride stride_block_ids).
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    dims = tl.arange(0, BLOCK_D)
    f = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :] * stride_features_dim,
                mask=batch_ok[:, None] & (dims < dim)[None, :], other=0.0).to(block_ptr.dtype.element_ty)
    e = f / tl.maximum(tl.sqrt(tl.sum(f * f, axis=1)), norm_eps)[:, None]
    ids = tl.load(ids_ptr + batch_idx * stride_ids, mask=batch_ok)
    for copy in range(copies):
        rows = copy * batch + batch_idx
        tl.store(block_ptr + rows[:, None] * stride_block + dims[None, :], e,
                 mask=batch_ok[:, None] & (dims < COLUMNS)[None, :])
        tl.store(block_ids_ptr + rows * stride_block_ids, ids, mask=batch_ok)


@triton.jit
def _features_backward_kernel(grad_ptr, features_ptr, out_ptr, batch, dim, copies, stride_grad_copy, stride_grad,
                              stride_grad_dim, stride_features, stride_features_dim, stride_out, norm_eps,
                              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_i = (g_i - e_i <g_i, e_i>) / |f_i| with g_i = sum_c grad[c, i] (in copy order) and e_i = f_i / |f_i|;
    g_i / eps where |f_i| <= eps (as reference.normalize_backward).  Grid (cdiv(b, BLOCK_B),).

    grad_ptr [copies, b, D] fp32 or float64 (the accumulation dtype) and features_ptr [b, D], any strides (a
    stride equal to 1 is specialised by the JIT, so contiguous inputs lose nothing); out_ptr [b, D] contiguous
    in the features' dtype.
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    dims = tl.arange(0, BLOCK_D)
    mask = (batch_idx < batch)[:, None] & (dims < dim)[None, :]
    g = tl.zeros([BLOCK_B, BLOCK_D], grad_ptr.dtype.element_ty)
    for copy in range(copies):
        g += tl.load(grad_ptr + copy * stride_grad_copy + batch_idx[:, None] * stride_grad
                     + dims[None, :] * stride_grad_dim, mask=mask, other=0.0)
    f = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :] * stride_features_dim,
                mask=mask, other=0.0).to(grad_ptr.dtype.element_ty)
    norm = tl.sqrt(tl.sum(f * f, axis=1))
    e = f / tl.maximum(norm, norm_eps)[:, None]
    radial = tl.sum(g * e, axis=1)
    out = tl.where((norm > norm_eps)[:, None], (g - e * radial[:, None]) / tl.maximum(norm, norm_eps)[:, None],
                   g / norm_eps)
    tl.store(out_ptr + batch_idx[:, None] * stride_out + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_parts(stats_ptr, ids_ptr, num_parts, stride_part, stride_batch, id_offset, batch_idx, batch_ok,
                 BLOCK_B: tl.constexpr, KC: tl.constexpr, K_PAD: tl.constexpr, PART_CHUNK: tl.constexpr,
                 CANDIDATE_CHUNK: tl.constexpr):
    """Sums of columns 0 and 1 over the parts, and the running top-K_PAD of the candidates, for a block
    of samples: (sum_exp [BLOCK_B], target [BLOCK_B], top_value [BLOCK_B, K_PAD], top_id [BLOCK_B, K_PAD]).

    Part p of sample i starts at stats_ptr + p * stride_part + i * stride_batch; its KC candidate values
    at columns [2, 2 + KC), their ids (integers, + id_offset) at ids_ptr + the same offsets + [0, KC).
    Candidates with value -inf are padding. top_* is unordered; empty slots hold (-inf, NO_ID + slot).
    """
    dtype = stats_ptr.dtype.element_ty
    sum_exp = tl.zeros([BLOCK_B], dtype)
    target = tl.zeros([BLOCK_B], dtype)
    for part_start in range(0, num_parts, PART_CHUNK):
        parts = part_start + tl.arange(0, PART_CHUNK)
        offsets = parts[None, :] * stride_part + batch_idx[:, None] * stride_batch
        mask = batch_ok[:, None] & (parts < num_parts)[None, :]
        sum_exp += tl.sum(tl.load(stats_ptr + offsets, mask=mask, other=0.0), axis=1)
        target += tl.sum(tl.load(stats_ptr + offsets + 1, mask=mask, other=0.0), axis=1)

    slots = tl.arange(0, K_PAD)
    top_value = tl.full([BLOCK_B, K_PAD], float("-inf"), dtype)
    top_id = tl.zeros([BLOCK_B, K_PAD], tl.int64) + slots[None, :] + NO_ID
    if KC > 0:
        # The worst member: smallest value, then highest id (the one a tie would remove).
        worst_value = tl.min(top_value, axis=1)
        worst_id = tl.max(tl.where(top_value == worst_value[:, None], top_id, -1), axis=1)
        for first in range(0, num_parts * KC, CANDIDATE_CHUNK):
            flat = first + tl.arange(0, CANDIDATE_CHUNK)
            offsets = (flat // KC)[None, :] * stride_part + batch_idx[:, None] * stride_batch + (flat % KC)[None, :]
            mask = batch_ok[:, None] & (flat < num_parts * KC)[None, :]
            value = tl.load(stats_ptr + 2 + offsets, mask=mask, other=float("-inf"))
            ids = tl.load(ids_ptr + offsets, mask=mask, other=0).to(tl.int64) + id_offset
            value = tl.where(value > float("-inf"), value, float("-inf"))  # NaN never enters
            beats = (value > worst_value[:, None]) | ((value == worst_value[:, None]) & (ids < worst_id[:, None]))
            beats = beats & (value > float("-inf"))
            # After the first chunks hardly any candidate beats the worst member: zero or one pass.
            while tl.max(beats.to(tl.int32)) > 0:
                best = tl.max(tl.where(beats, value, float("-inf")), axis=1)
                best_id = tl.min(tl.where(beats & (value == best[:, None]), ids, NO_ID), axis=1)
                insert = best > float("-inf")
                evict = (top_value == worst_value[:, None]) & (top_id == worst_id[:, None]) & insert[:, None]
                top_value = tl.where(evict, best[:, None], top_value)
                top_id = tl.where(evict, best_id[:, None], top_id)
                worst_value = tl.min(top_value, axis=1)
                worst_id = tl.max(tl.where(top_value == worst_value[:, None], top_id, -1), axis=1)
                value = tl.where(ids == best_id[:, None], float("-inf"), value)  # taken (ids are distinct)
                beats = ((value > worst_value[:, None]) | ((value == worst_value[:, None]) & (ids < worst_id[:, None])))
                beats = beats & (value > float("-inf"))
    return sum_exp, target, top_value, top_id


@triton.jit
def _pop_best(top_value, top_id):
    """The best member (largest value, then lowest id) and the list without it (its value set to -inf):
    (value, id, top_value, top_id); (-inf, -1) once only empty slots are left."""
    best = tl.max(top_value, axis=1)
    best_id = tl.min(tl.where(top_value == best[:, None], top_id, NO_ID), axis=1)
    top_value = tl.where(top_id == best_id[:, None], float("-inf"), top_value)
    return best, tl.where(best > float("-inf"), best_id, -1), top_value, top_id


@triton.jit
def _merge_splits_kernel(partial_ptr, partial_ids_ptr, num_splits, batch, shard_start, out_ptr, out_ids_ptr,
                         BLOCK_B: tl.constexpr, KC: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         PART_CHUNK: tl.constexpr, CANDIDATE_CHUNK: tl.constexpr):
    """This shard's exchange block [B, 2 + 2K] from the forward kernel's class splits.  Grid (cdiv(B, BLOCK_B),).

    partial_ptr [S, B, 2 + 2 KC] fp32, partial_ids_ptr the int32 view of its last KC columns (local ids);
    out_ptr [B, 2 + 2K] fp32 with out_ids_ptr its int32 view: sums, then the K best candidates in
    descending order with their global ids (-inf / -1 padded).
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    sum_exp, target, top_value, top_id = _merge_parts(
        partial_ptr, partial_ids_ptr, num_splits, batch * (2 + 2 * KC), 2 + 2 * KC, shard_start,
        batch_idx, batch_ok, BLOCK_B, KC, K_PAD, PART_CHUNK, CANDIDATE_CHUNK)
    row = out_ptr + batch_idx * (2 + 2 * K)
    tl.store(row, sum_exp, mask=batch_ok)
    tl.store(row + 1, target, mask=batch_ok)
    for slot in tl.static_range(K):
        best, best_id, top_value, top_id = _pop_best(top_value, top_id)
        tl.store(row + 2 + slot, best, mask=batch_ok)
        tl.store(out_ids_ptr + batch_idx * (2 + 2 * K) + 2 + K + slot, best_id.to(tl.int32), mask=batch_ok)


@triton.jit
def _merge_shards_kernel(gathered_ptr, gathered_ids_ptr, num_shards, batch, labels_ptr, stride_labels, num_classes,
                         inv_temperature, alpha, lse_ptr, losses_ptr, own_probability_ptr, own_is_top1_ptr,
                         topk_value_ptr, topk_id_ptr,
                         BLOCK_B: tl.constexpr, KC: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                         PART_CHUNK: tl.constexpr, CANDIDATE_CHUNK: tl.constexpr):
    """Merge the exchange blocks of all shards, gathered [P, B, 2 + 2 KC], into the per-sample results
    of kernels.exchange.merge_shard_stats.  Grid (cdiv(B, BLOCK_B),).

    K smoothing classes (K <= KC, KC >= 1). Outputs [B]: lse, losses (NaN where the label is outside
    [0, num_classes)), own_probability, own_is_top1 (bool); [B, KC]: the merged topk values and int64 ids.
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    sum_exp, target, top_value, top_id = _merge_parts(
        gathered_ptr, gathered_ids_ptr, num_shards, batch * (2 + 2 * KC), 2 + 2 * KC, 0,
        batch_idx, batch_ok, BLOCK_B, KC, K_PAD, PART_CHUNK, CANDIDATE_CHUNK)
    lse = tl.log(tl.where(batch_ok, sum_exp, 1.0)) + inv_temperature  # (past the batch: no log(0))
    labels = tl.load(labels_ptr + batch_idx * stride_labels, mask=batch_ok, other=0)
    smoothing = tl.zeros([BLOCK_B], lse.dtype)
    best_other, best_other_id = tl.zeros([BLOCK_B], lse.dtype), tl.zeros([BLOCK_B], tl.int64)
    for slot in tl.static_range(KC):
        best, best_id, top_value, top_id = _pop_best(top_value, top_id)
        tl.store(topk_value_ptr + batch_idx * KC + slot, best, mask=batch_ok)
        tl.store(topk_id_ptr + batch_idx * KC + slot, best_id, mask=batch_ok)
        if slot == 0:
            best_other, best_other_id = best, best_id
        if slot < K:
            smoothing += tl.where(batch_ok, best, 0.0)  # (past the batch: no 0 * -inf when alpha = 0)
    losses = lse - (1.0 - alpha) * target
    if K > 0:
        losses -= alpha / K * smoothing
    bad_label = (labels < 0) | (labels >= num_classes)
    tl.store(lse_ptr + batch_idx, lse, mask=batch_ok)
    tl.store(losses_ptr + batch_idx, tl.where(bad_label, float("nan"), losses), mask=batch_ok)
    tl.store(own_probability_ptr + batch_idx, tl.exp(target - lse), mask=batch_ok)
    own_is_top1 = (target > best_other) | ((target == best_other) & (labels < best_other_id))
    tl.store(own_is_top1_ptr + batch_idx, own_is_top1, mask=batch_ok)


def _merge_config(candidates):
    """K_PAD (running top-K width, a power of two), and the chunk of candidates per step."""
    return dict(K_PAD=triton.next_power_of_2(max(candidates, 1)), PART_CHUNK=PART_CHUNK,
                CANDIDATE_CHUNK=CANDIDATE_CHUNK, BLOCK_B=GLUE_BATCH_BLOCK)


def merge_splits(partial, batch, candidates, k, shard_start):
    """The exchange block [B, 2 + 2k] (fp32) of a shard from the forward kernel's split partials
    [S, B, 2 + 2 candidates] (fp32, local ids as int32 bits in the last `candidates` columns)."""
    out = torch.empty(batch, 2 + 2 * k, dtype=torch.float32, device=partial.device)
    _merge_splits_kernel[(triton.cdiv(batch, GLUE_BATCH_BLOCK),)](
        partial, stats_ids(partial, candidates), partial.shape[0], batch, shard_start, out, out.view(torch.int32),
        KC=candidates, K=k, **_merge_config(candidates))
    return out


def merge_shard_stats(gathered, labels, *, num_classes, k, temperature, alpha):
    """kernels.exchange.merge_shard_stats in one launch (gathered [P, B, 2 + 2K'] fp32 or float64)."""
    num_shards, batch, width = gathered.shape
    candidates = (width - 2) // 2
    if not 0 <= k <= candidates or candidates < 1:
        raise ValueError(f"the merge needs 1 <= K' and K <= K' candidates per shard, got K = {k}, K' = {candidates}")
    gathered = gathered.contiguous()
    out = dict(dtype=gathered.dtype, device=gathered.device)
    merged = SimpleNamespace(lse=torch.empty(batch, **out), losses=torch.empty(batch, **out),
                             own_probability=torch.empty(batch, **out),
                             own_is_top1=torch.empty(batch, dtype=torch.bool, device=gathered.device),
                             topk_values=torch.empty(batch, candidates, **out),
                             topk_indices=torch.empty(batch, candidates, dtype=torch.long, device=gathered.device))
    _merge_shards_kernel[(triton.cdiv(batch, GLUE_BATCH_BLOCK),)](
        gathered, stats_ids(gathered, candidates), num_shards, batch, labels, labels.stride(0), num_classes,
        1.0 / temperature, alpha, merged.lse, merged.losses, merged.own_probability, merged.own_is_top1,
        merged.topk_values, merged.topk_indices, KC=candidates, K=k, **_merge_config(candidates))
    return merged


def pack_features(features, ids, copies):
    """kernels.exchange.pack_features in one launch."""
    batch, dim = features.shape
    dtype = accumulation_dtype(features.dtype)
    width = packed_width(dim, dtype)
    block = torch.empty(copies, batch, width, dtype=dtype, device=features.device)
    block_ids = feature_ids(block)
    columns = width - (1 if dtype == torch.float64 else 2)  # the features and the padding
    _pack_features_kernel[(triton.cdiv(batch, GLUE_BATCH_BLOCK),)](
        features, ids, block, block_ids, batch, dim, copies, *features.stride(), ids.stride(0), block.stride(1),
        block_ids.stride(1), NORM_EPS, BLOCK_B=GLUE_BATCH_BLOCK, BLOCK_D=triton.next_power_of_2(columns),
        COLUMNS=columns)
    return block


def features_backward(grad_features_n, features):
    """kernels.exchange.features_backward in one launch (grad_features_n [copies, b, D])."""
    copies, batch, dim = grad_features_n.shape
    grad_features_n = grad_features_n.to(accumulation_dtype(features.dtype))
    out = torch.empty(batch, dim, dtype=features.dtype, device=features.device)
    _features_backward_kernel[(triton.cdiv(batch, GLUE_BATCH_BLOCK),)](
        grad_features_n, features, out, batch, dim, copies, *grad_features_n.stride(), *features.stride(),
        out.stride(0), NORM_EPS, BLOCK_B=GLUE_BATCH_BLOCK, BLOCK_D=triton.next_power_of_2(dim))
    return out
