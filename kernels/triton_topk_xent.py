"""Triton backend of the sharded smoothed cosine-softmax cross-entropy: fused, no [B, C] buffer.

Math (see kernels.reference): for the normalized features e_i of the global batch and this shard's
raw rows W_j, z_ij = <e_i, W_j / |W_j|> / tau <= 1/tau. The forward returns the local statistics the
exchange merges (kernels.topk_xent); the backward gets the merged lse_i and top-K ids T_i and returns
this shard's gradients of sum_i grad_losses_i loss_i with

    G_ij  = grad_losses_i / tau * (exp(z_ij - lse_i) - q_ij),   q = 1 - alpha on y_i, alpha / K on T_i
    dE_n  = G W_n,     dW_n = G^T E_n,     dW_j = (dW_n,j - W_n,j <dW_n,j, W_n,j>) / |W_j|

Why kernels: at B = 4096 samples against C = 160,000 classes (D = 128) the logits are a 2.6 GB fp32 slab.
The plain way writes it, reads it for topk and softmax, writes G, reads G for each backward product:
~6 passes, ~16 GB of HBM traffic (~5 ms at 3.3 TB/s), while the products are 3 x 2BCD = 0.5 TFLOP
(well under 1 ms of bf16 tensor-core time). Here every logit tile lives in registers only:

  pre-pass  |W_j| in fp32 [C] (_row_norms_kernel), so W tiles only ever feed tl.dot: the product is
            taken with the raw W tile and scaled by 1/|W_j| per column (bf16 operands stay exact).
  forward   programs (batch block, class split) stream over the split's class tiles: z tile, sum of
            exp(z - 1/tau) (fixed shift), an exact streaming top-K per sample (_insert_candidates); split 0
            also computes the target logit. Per-split partials are O(B K); the host sums / merges them.
  backward  G is recomputed tile by tile, never stored (FlashAttention-2 style):
            dW kernel: one program per class block owns its dW tile and loops over all batch blocks
                       (dW_n += G^T E, on transposed logit tiles), adds the sparse -q part from
                       (sample, class) pairs sorted by class, then the normalisation Jacobian: no atomics;
            dE kernel: programs (batch block, class split) accumulate the softmax part of G W_n, and
                       _target_rows_kernel the -q part (K + 1 gathered rows of W per sample); the
                       partials [S + 1, B, D] are summed on the host in order. Deterministic.
  So 5 products of 2BCD flops in all (1 forward, 2 per backward kernel), each tile streamed once.
  `python bench/kernel.py compile` shows registers / spills / shared memory of every kernel for sm_90.

Dtypes: features_n and weight fp32 or bf16 (any mix). Both bf16: bf16 tensor-core products with fp32
accumulation. Otherwise fp32 products with input_precision="ieee": TF32 (the default on GPUs) would
cost ~1e-3 relative error. Statistics, G and accumulators are fp32. With bf16 operands the softmax and
the -q parts of G reach the products separately rounded to bf16, so an entry where p_ij ~ q_ij (a target
the model already fits) has relative error ~2^-9 (p + q) / |p - q| instead of 2^-9. Under TRITON_INTERPRET=1 (set it
before triton is imported) operands are always upcast to fp32 first: the triton 3.9 interpreter returns
garbage for tl.dot on bf16 operands, so the bf16 tensor-core product is only exercised on a GPU.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import NORM_EPS, local_class_ids, select_topk

# K of the top-K smoothing: the running top-K of a batch block lives in registers ([BLOCK_B, K_PAD]
# values and ids), and the first tile of every program costs K_PAD extraction passes.
MAX_K = 32
# D: whole feature rows are held on chip (an E tile and a W tile of [BLOCK, D], no loop over D).
# Above 128 the tiles are halved to stay within registers and shared memory.
MAX_FEATURE_DIM = 256
# (sample, class) target pairs scattered per one-hot product in the dW kernel: tl.dot needs >= 16, and
# a class tile rarely holds more (B (K + 1) / (C / BLOCK_C) pairs: ~20 at B = 4096, C = 160,000, K = 5).
PAIR_BLOCK = 16
# Samples per program of the dE target-part kernel: it gathers K + 1 whole rows of W per sample.
TARGET_BATCH_BLOCK = 32
# Classes per program of the norm pre-pass: a [64, D] tile is 32 KB of fp32 at D = 128, and 2,500 programs
# at C = 160,000 fill every SM of a GPU.
NORM_BLOCK = 64
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _row_norms_kernel(weight_ptr, norm_ptr, shard_classes, dim, stride_weight, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pre-pass: norm_ptr[j] = |W_j| in fp32 for the classes of one block.  Grid (cdiv(C, BLOCK_C),)."""
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = tl.arange(0, BLOCK_D)
    w = tl.load(weight_ptr + classes[:, None].to(tl.int64) * stride_weight + dims[None, :],
                mask=(classes < shard_classes)[:, None] & (dims < dim)[None, :], other=0.0).to(tl.float32)
    tl.store(norm_ptr + classes, tl.sqrt(tl.sum(w * w, axis=1)), mask=classes < shard_classes)


@triton.jit
def _load_batch_block(features_ptr, batch, dim, stride_features, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch block: batch_idx [BLOCK_B], batch_ok, dims [BLOCK_D], dim_ok and E [BLOCK_B, BLOCK_D]
    (zero where masked), in the input dtype."""
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    e = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :],
                mask=batch_ok[:, None] & dim_ok[None, :], other=0.0)
    return batch_idx, batch_ok, dims, dim_ok, e


@triton.jit
def _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps):
    """Raw rows W_j [BLOCK_C, BLOCK_D] (zero where masked), 1 / max(|W_j|, eps) and |W_j| > eps, both [BLOCK_C].

    The norms come from a pre-pass ([C] fp32, once per launch) so that the W tile only feeds tl.dot and
    never has to sit in registers for a reduction.
    """
    w = tl.load(weight_ptr + classes[:, None].to(tl.int64) * stride_weight + dims[None, :],
                mask=class_ok[:, None] & dim_ok[None, :], other=0.0)
    norm = tl.load(norm_ptr + classes, mask=class_ok, other=0.0)
    return w, 1.0 / tl.maximum(norm, norm_eps), norm > norm_eps


@triton.jit
def _cosine_logits(e, w, inv_norm, class_ok, inv_temperature, INPUT_PRECISION: tl.constexpr):
    """z = E W_n^T / tau, fp32 [BLOCK_B, BLOCK_C], -inf on columns past the shard.

    e [BLOCK_B, BLOCK_D] and w [BLOCK_C, BLOCK_D] in the dot dtype; normalising after the product
    (one scale per column) keeps the bf16 operands exact instead of rounding W / |W| to bf16.
    """
    z = tl.dot(e, tl.trans(w), input_precision=INPUT_PRECISION) * (inv_norm * inv_temperature)[None, :]
    return tl.where(class_ok[None, :], z, float("-inf"))


@triton.jit
def _insert_candidates(z, tile_start, target, top_value, top_index, threshold, BLOCK_C: tl.constexpr):
    """Stream one logit tile into every sample's running top-K_PAD (unordered), exactly.

    z [BLOCK_B, BLOCK_C] logits of classes tile_start + [0, BLOCK_C); target [BLOCK_B] local id of
    y_i (never a candidate); top_value / top_index [BLOCK_B, K_PAD] the members; threshold [BLOCK_B]
    their minimum. A logit can enter only if it beats the worst member, z_ij > threshold_i: an equal
    value has a higher class id (tiles come in class order), which loses the tie. Entries are taken
    best first (largest value, then lowest id) and each replaces the worst member (smallest value,
    then highest id). After the first tiles hardly any logit beats the threshold, so the loop runs zero
    or one time per tile: about three compare/selects per logit instead of a sort.
    """
    positions = tl.arange(0, BLOCK_C)
    candidates = tl.where(z > threshold[:, None], z, float("-inf"))
    while tl.max(candidates) > float("-inf"):
        best, best_position = tl.max(candidates, axis=1, return_indices=True, return_indices_tie_break_left=True)
        best_index = tile_start + best_position  # [BLOCK_B]
        insert = (best > threshold) & (best_index != target)
        worst_index = tl.max(tl.where(top_value == threshold[:, None], top_index, -2147483647), axis=1)
        evict = (top_index == worst_index[:, None]) & insert[:, None]
        top_value = tl.where(evict, best[:, None], top_value)
        top_index = tl.where(evict, best_index[:, None], top_index)
        threshold = tl.min(top_value, axis=1)
        candidates = tl.where((candidates > threshold[:, None]) & (positions[None, :] != best_position[:, None]),
                              candidates, float("-inf"))
    return top_value, top_index, threshold


@triton.jit
def _shard_forward_kernel(
    features_ptr, weight_ptr, norm_ptr, target_ptr,
    sum_exp_ptr, topk_value_ptr, topk_index_ptr, target_logit_ptr,
    batch, shard_classes, dim, classes_per_split, stride_features, stride_weight,
    inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    TOPK: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Local statistics of one batch block against one class split.  Grid (cdiv(B, BLOCK_B), S).

    features_ptr   [B, D] normalized features (row stride stride_features)
    weight_ptr     [C, D] raw rows of the shard (row stride stride_weight)
    norm_ptr       [C] fp32 |W_j|
    target_ptr     [B] int32 local id of y_i, -1 when another shard owns it
    sum_exp_ptr    [S, B] fp32 out: sum over the split's classes of exp(z_ij - 1/tau)
    topk_value_ptr [S, B, K_PAD] fp32 out: the split's K_PAD largest non-target logits (unordered, -inf padded)
    topk_index_ptr [S, B, K_PAD] int32 out: their local ids (negative where padded)
    target_logit_ptr [B] fp32 out (split 0 only): z_{i, y_i}, 0 when not owned
    classes_per_split: a multiple of BLOCK_C; split s covers [s * classes_per_split, ...) within [0, C)
    """
    split = tl.program_id(1)
    batch_idx, batch_ok, dims, dim_ok, e = _load_batch_block(features_ptr, batch, dim, stride_features, BLOCK_B, BLOCK_D)
    target = tl.load(target_ptr + batch_idx, mask=batch_ok, other=-1)  # [BLOCK_B]

    # 1. Target logit, once per batch block: a row-wise dot with the gathered rows W_{y_i}.
    if split == 0:
        owned = target >= 0
        w_target, inv_norm_target, _ = _load_class_tile(weight_ptr, norm_ptr, target, owned, dims, dim_ok, stride_weight,
                                                        norm_eps)
        z_target = tl.sum(e.to(tl.float32) * w_target.to(tl.float32), axis=1) * inv_norm_target * inv_temperature
        tl.store(target_logit_ptr + batch_idx, tl.where(owned, z_target, 0.0), mask=batch_ok)

    # 2. Stream over the split's class tiles. Empty top-K slots hold -inf with distinct negative ids
    #    (so exactly one is evicted at a time); positions past the batch hold +inf so nothing ever enters.
    e = e.to(DOT_DTYPE)
    slots = tl.arange(0, K_PAD)
    top_value = tl.where(batch_ok[:, None], float("-inf"), float("inf")) + tl.zeros([BLOCK_B, K_PAD], tl.float32)
    top_index = -1 - slots[None, :] + tl.zeros([BLOCK_B, K_PAD], tl.int32)
    threshold = tl.min(top_value, axis=1)
    sum_exp = tl.zeros([BLOCK_B], tl.float32)
    class_start = split * classes_per_split
    class_stop = tl.minimum(class_start + classes_per_split, shard_classes)
    for tile_start in range(class_start, class_stop, BLOCK_C):
        classes = tile_start + tl.arange(0, BLOCK_C)
        class_ok = classes < class_stop
        w, inv_norm, _ = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
        z = _cosine_logits(e, w.to(DOT_DTYPE), inv_norm, class_ok, inv_temperature, INPUT_PRECISION)
        # Fixed shift: z <= 1/tau, so exp(z - 1/tau) <= 1 and the splits' sums add up without rescaling.
        sum_exp += tl.sum(tl.exp(z - inv_temperature), axis=1)
        if TOPK:
            top_value, top_index, threshold = _insert_candidates(z, tile_start, target, top_value, top_index,
                                                                 threshold, BLOCK_C)

    # 3. Per-split partials; the host merges the S splits.
    tl.store(sum_exp_ptr + split * batch + batch_idx, sum_exp, mask=batch_ok)
    if TOPK:
        out = (split * batch + batch_idx)[:, None] * K_PAD + slots[None, :]
        tl.store(topk_value_ptr + out, top_value, mask=batch_ok[:, None])
        tl.store(topk_index_ptr + out, top_index, mask=batch_ok[:, None])


@triton.jit
def _shard_backward_weight_kernel(
    features_ptr, weight_ptr, norm_ptr, lse_ptr, grad_scale_ptr, grad_weight_ptr,
    pair_offsets_ptr, pair_batch_idx_ptr, pair_classes_ptr, pair_grads_ptr,
    batch, shard_classes, dim, stride_features, stride_weight, inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dW of one class block: dW_n = G^T E_n over all batch blocks, then the Jacobian.  Grid (cdiv(C, BLOCK_C),).

    lse_ptr [B] fp32 merged logsumexp; grad_scale_ptr [B] fp32 grad_losses / tau; grad_weight_ptr [C, D]
    out, contiguous, in the weight's dtype. The sparse -q part of G comes as (sample, class, value) pairs
    sorted by class: pair_batch_idx_ptr / pair_classes_ptr int32 and pair_grads_ptr fp32 [M] (value
    -q_ij grad_losses_i / tau), the pairs of class tile t at [pair_offsets_ptr[t], pair_offsets_ptr[t + 1]).
    """
    tile = tl.program_id(0)
    tile_start = tile * BLOCK_C
    positions = tl.arange(0, BLOCK_C)
    classes = tile_start + positions
    class_ok = classes < shard_classes
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    w, inv_norm, long_row = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
    w = w.to(DOT_DTYPE)

    # 1. Softmax part: dW_n tile [BLOCK_C, BLOCK_D] += softmax^T E, owned by this program, in registers.
    grad_weight_n = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for batch_start in range(0, batch, BLOCK_B):
        batch_idx = batch_start + tl.arange(0, BLOCK_B)
        batch_ok = batch_idx < batch
        e = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :],
                    mask=batch_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + batch_idx, mask=batch_ok, other=0.0)
        grad_scale = tl.load(grad_scale_ptr + batch_idx, mask=batch_ok, other=0.0)  # 0 past the batch: no gradient
        # Logits transposed, z^T = W_n E^T [BLOCK_C, BLOCK_B], so that G^T comes out of the product in
        # the layout of the next product's left operand (transposing a register tile costs a trip
        # through shared memory; the FlashAttention-2 dK/dV pass does the same).
        z_t = tl.dot(w, tl.trans(e), input_precision=INPUT_PRECISION) * (inv_norm * inv_temperature)[:, None]
        softmax_grad_t = tl.exp(z_t - lse[None, :]) * grad_scale[None, :]  # [BLOCK_C, BLOCK_B]
        grad_weight_n = tl.dot(softmax_grad_t.to(DOT_DTYPE), e, acc=grad_weight_n, input_precision=INPUT_PRECISION)

    # 2. Target part: the tile's few (sample, class) pairs, scattered by a one-hot product in the same
    #    dot dtype as step 1 (so the accumulator keeps its layout; the one-hot operand is exact).
    pair_end = tl.load(pair_offsets_ptr + tile + 1)
    for pair_start in range(tl.load(pair_offsets_ptr + tile), pair_end, BLOCK_P):
        pairs = pair_start + tl.arange(0, BLOCK_P)
        pair_ok = pairs < pair_end
        pair_batch_idx = tl.load(pair_batch_idx_ptr + pairs, mask=pair_ok, other=0)
        pair_positions = tl.load(pair_classes_ptr + pairs, mask=pair_ok, other=-1) - tile_start
        pair_grads = tl.load(pair_grads_ptr + pairs, mask=pair_ok, other=0.0)
        e = tl.load(features_ptr + pair_batch_idx[:, None] * stride_features + dims[None, :],
                    mask=pair_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
        one_hot = (positions[:, None] == pair_positions[None, :]).to(DOT_DTYPE)  # [BLOCK_C, BLOCK_P]
        grad_weight_n = tl.dot(one_hot, (pair_grads[:, None] * e).to(DOT_DTYPE), acc=grad_weight_n,
                               input_precision=INPUT_PRECISION)

    # 3. Through W_n = W / max(|W|, eps): dW = (dW_n - W_n <dW_n, W_n>) / |W|, written with the raw W
    #    (reloaded rather than kept in registers through the loop) to keep one [BLOCK_C, BLOCK_D] fp32 tile
    #    live besides the accumulator. Rows not longer than eps were divided by the constant eps: no
    #    radial term (reference.normalize_backward).
    w, _, _ = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
    w = w.to(tl.float32)
    radial = tl.where(long_row, tl.sum(grad_weight_n * w, axis=1) * inv_norm * inv_norm, 0.0)  # <dW_n, W_n> / |W|
    grad_weight = (grad_weight_n - w * radial[:, None]) * inv_norm[:, None]
    tl.store(grad_weight_ptr + classes[:, None].to(tl.int64) * dim + dims[None, :],
             grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=class_ok[:, None] & dim_ok[None, :])


@triton.jit
def _shard_backward_features_kernel(
    features_ptr, weight_ptr, norm_ptr, lse_ptr, grad_scale_ptr, grad_features_ptr,
    batch, shard_classes, dim, classes_per_split, stride_features, stride_weight, inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Partial dE_n = softmax-part of G, times W_n, for one batch block over one class split.  Grid (cdiv(B, BLOCK_B), S).

    lse_ptr, grad_scale_ptr as in _shard_backward_weight_kernel; grad_features_ptr [S + 1, B, D] fp32
    out: slice s is split s's partial (slice S is the target part, _target_rows_kernel); the host
    sums the slices in order, so the result is deterministic.
    """
    split = tl.program_id(1)
    batch_idx, batch_ok, dims, dim_ok, e = _load_batch_block(features_ptr, batch, dim, stride_features, BLOCK_B, BLOCK_D)
    e = e.to(DOT_DTYPE)
    lse = tl.load(lse_ptr + batch_idx, mask=batch_ok, other=0.0)
    grad_scale = tl.load(grad_scale_ptr + batch_idx, mask=batch_ok, other=0.0)
    class_start = split * classes_per_split
    class_stop = tl.minimum(class_start + classes_per_split, shard_classes)

    # Softmax part only (the sparse -q part is _target_rows_kernel), tile by tile: G W_n =
    # (G diag(1 / |W_j|)) W, so the raw tile stays the exact operand.
    grad_features_n = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for tile_start in range(class_start, class_stop, BLOCK_C):
        classes = tile_start + tl.arange(0, BLOCK_C)
        class_ok = classes < class_stop
        w, inv_norm, _ = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
        w = w.to(DOT_DTYPE)
        z = _cosine_logits(e, w, inv_norm, class_ok, inv_temperature, INPUT_PRECISION)
        softmax_grad = tl.exp(z - lse[:, None]) * (grad_scale[:, None] * inv_norm[None, :])  # [BLOCK_B, BLOCK_C]
        grad_features_n = tl.dot(softmax_grad.to(DOT_DTYPE), w, acc=grad_features_n, input_precision=INPUT_PRECISION)

    tl.store(grad_features_ptr + (split * batch + batch_idx)[:, None] * dim + dims[None, :], grad_features_n,
             mask=batch_ok[:, None] & dim_ok[None, :])


@triton.jit
def _target_rows_kernel(
    weight_ptr, norm_ptr, grad_scale_ptr, targets_ptr, grad_features_ptr,
    batch, shard_classes, dim, num_targets, stride_weight, stride_targets, target_weight, topk_weight, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Target part of dE_n: -grad_losses_i / tau sum_j q_ij W_n,j over the K + 1 targets of each sample.  Grid (cdiv(B, BLOCK_B),).

    targets_ptr [B, 1 + K] int32 local ids of y_i, then of the merged top-K (-1: not in this shard),
    weighted 1 - alpha and alpha / K; grad_features_ptr [B, D] fp32 out. A separate kernel: gathering
    whole rows next to the accumulator of the softmax part would spill registers there.
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    grad_scale = tl.load(grad_scale_ptr + batch_idx, mask=batch_ok, other=0.0)
    grad_features_n = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for slot in range(num_targets):
        target = tl.load(targets_ptr + batch_idx * stride_targets + slot, mask=batch_ok, other=-1)
        w, inv_norm, _ = _load_class_tile(weight_ptr, norm_ptr, target, target >= 0, dims, dim_ok, stride_weight,
                                          norm_eps)
        q = tl.where(slot == 0, target_weight, topk_weight)
        grad_features_n -= (q * grad_scale * inv_norm)[:, None] * w.to(tl.float32)
    tl.store(grad_features_ptr + batch_idx[:, None] * dim + dims[None, :], grad_features_n,
             mask=batch_ok[:, None] & dim_ok[None, :])


def _check_inputs(features_n, weight, labels, temperature):
    """Host-side validation shared by both launchers; raises ValueError naming the bad value."""
    if features_n.dim() != 2 or weight.dim() != 2 or features_n.shape[1] != weight.shape[1]:
        raise ValueError(f"need features_n [B, D] and weight [C, D], got {list(features_n.shape)} and {list(weight.shape)}")
    if labels.shape != features_n.shape[:1]:
        raise ValueError(f"labels must be [{features_n.shape[0]}], got {list(labels.shape)}")
    for name, tensor in (("features_n", features_n), ("weight", weight)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16 for the Triton kernels, got {tensor.dtype}")
    if not features_n.device == weight.device == labels.device:
        raise ValueError(f"all inputs must be on one device, got {features_n.device}, {weight.device}, {labels.device}")
    batch, dim = features_n.shape
    if not 1 <= dim <= MAX_FEATURE_DIM:
        raise ValueError(f"feature dim must be in [1, {MAX_FEATURE_DIM}], got {dim}")
    if batch < 1 or not 1 <= weight.shape[0] < 2**31:
        raise ValueError(f"need B >= 1 and 1 <= C < 2^31 (int32 local ids), got B = {batch}, C = {weight.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _rows_contiguous(x):
    """The kernels take a row stride but need unit stride along D."""
    return x if x.stride(1) == 1 else x.contiguous()


def _row_norms(weight):
    """|W_j| in fp32 [C]: one read of W (40 MB at 160,000 x 128 bf16, ~15 us on an H100), no fp32 copy."""
    shard_classes, dim = weight.shape
    norms = torch.empty(shard_classes, dtype=torch.float32, device=weight.device)
    _row_norms_kernel[(triton.cdiv(shard_classes, NORM_BLOCK),)](weight, norms, shard_classes, dim, weight.stride(0),
                                                         BLOCK_C=NORM_BLOCK, BLOCK_D=triton.next_power_of_2(dim))
    return norms


def _local_ids(ids, shard_start, shard_classes):
    """Global class ids -> int32 positions in this shard; -1 for ids it does not own and for -1 padding."""
    local, owned = local_class_ids(ids, shard_start, shard_classes)
    return torch.where(owned, local, -1).to(torch.int32).contiguous()


# Largest (BLOCK_B, BLOCK_C) of each kernel for bf16 operands and D <= 128, as in FlashAttention-2 on
# Hopper: the forward and dE kernels hold E tiles and stream class tiles (128 x 64, like its forward);
# the dW kernel holds a class tile and streams batch blocks (64 x 128, like its dK/dV pass). Halved in
# both directions for fp32 operands or D > 128 (4x the register / shared-memory bytes per tile).
TILE_CAPS = {"forward": (128, 64), "features": (128, 64), "weight": (64, 128)}


def _launch_config(kind, features_n, weight, block_batch, block_classes, num_splits):
    """Tile sizes, class splits, warps and dot dtype of one kernel ('forward', 'features' or 'weight').
    block_batch / block_classes / num_splits override the heuristics (tests use small tiles)."""
    (batch, dim), shard_classes, device = features_n.shape, weight.shape[0], weight.device
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16
    bf16_operands = features_n.dtype == weight.dtype == torch.bfloat16 and not triton.knobs.runtime.interpret
    cap_b, cap_c = TILE_CAPS[kind]
    if not bf16_operands or block_d > 128:
        cap_b, cap_c = cap_b // 2, cap_c // 2
    block_b = block_batch or min(cap_b, max(16, triton.next_power_of_2(batch)))
    block_c = block_classes or min(cap_c, max(16, triton.next_power_of_2(shard_classes)))
    batch_blocks, class_tiles = triton.cdiv(batch, block_b), triton.cdiv(shard_classes, block_c)
    if num_splits is None:
        # Batch blocks alone (B / BLOCK_B = 32 at B = 4096) would leave most SMs idle: split the classes so
        # that there are ~4 programs per SM. The interpreter runs programs one after another.
        processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = triton.cdiv(4 * processors, batch_blocks)
    classes_per_split = triton.cdiv(class_tiles, min(max(num_splits, 1), class_tiles)) * block_c
    return dict(block_b=block_b, block_c=block_c, block_d=block_d, batch_blocks=batch_blocks, class_tiles=class_tiles,
                num_splits=triton.cdiv(shard_classes, classes_per_split), classes_per_split=classes_per_split,
                num_warps=8 if block_b * block_c >= 128 * 64 else 4,
                dot_dtype=tl.bfloat16 if bf16_operands else tl.float32)


def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k,
                        block_batch=None, block_classes=None, num_splits=None):
    """Local statistics of this shard's classes [shard_start, shard_start + C) (see kernels.reference).

    features_n [B, D] normalized, weight [C, D] raw rows, fp32 or bf16; labels [B] global ids;
    0 <= k <= MAX_K, 1 <= D <= MAX_FEATURE_DIM. Returns fp32 sum_exp [B] (fixed shift 1/tau),
    target_logit [B] (0 when not owned), topk_values [B, k] (descending, ties to the lower id, -inf
    padded) and long topk_indices [B, k] (global ids, -1 padded). No [B, C] buffer.
    """
    _check_inputs(features_n, weight, labels, temperature)
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k must be in [0, {MAX_K}], got {k}")
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), shard_classes = features_n.shape, weight.shape[0]
    config = _launch_config("forward", features_n, weight, block_batch, block_classes, num_splits)
    splits, k_pad = config["num_splits"], triton.next_power_of_2(max(k, 1))
    out = dict(dtype=torch.float32, device=weight.device)
    sum_exp = torch.empty(splits, batch, **out)
    target_logit = torch.empty(batch, **out)
    topk_values = torch.empty(splits, batch, k_pad if k else 0, **out)
    topk_local = torch.empty(splits, batch, k_pad if k else 0, dtype=torch.int32, device=weight.device)
    _shard_forward_kernel[(config["batch_blocks"], splits)](
        features_n, weight, _row_norms(weight), _local_ids(labels, shard_start, shard_classes),
        sum_exp, topk_values, topk_local, target_logit,
        batch, shard_classes, dim, config["classes_per_split"], features_n.stride(0), weight.stride(0),
        1.0 / temperature, NORM_EPS,
        BLOCK_B=config["block_b"], BLOCK_C=config["block_c"], BLOCK_D=config["block_d"], K_PAD=k_pad, TOPK=k > 0,
        DOT_DTYPE=config["dot_dtype"], INPUT_PRECISION="ieee", num_warps=config["num_warps"])

    # Merge the splits: sums in split order; the top-k of the union of their candidates.
    candidates = topk_values.transpose(0, 1).reshape(batch, -1)  # [B, S * K_PAD]
    ids = torch.where(candidates > float("-inf"), topk_local.transpose(0, 1).reshape(batch, -1).long() + shard_start, -1)
    values, indices = select_topk(candidates, ids, k)
    return sum_exp.sum(dim=0), target_logit, values, indices


def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_losses, *, temperature, alpha,
                   block_batch=None, block_classes=None, num_splits=None):
    """(dE_n [B, D] in features_n's dtype, dW [C, D] in weight's dtype) of sum_i grad_losses_i loss_i.

    lse [B] and topk_indices [B, K] (global ids, -1 padded) are the MERGED statistics; grad_losses [B].
    dW is w.r.t. the raw rows (normalisation Jacobian included). Deterministic (no atomics).
    """
    _check_inputs(features_n, weight, labels, temperature)
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), shard_classes, device = features_n.shape, weight.shape[0], weight.device
    k = topk_indices.shape[1]
    lse = lse.to(torch.float32).contiguous()
    grad_scale = (grad_losses.to(torch.float32) / temperature).contiguous()  # [B]
    norms = _row_norms(weight)
    weight_config, features_config = (_launch_config(kind, features_n, weight, block_batch, block_classes, num_splits)
                                      for kind in ("weight", "features"))

    # q as (sample, class) targets: y_i with weight 1 - alpha, then the merged top-K with alpha / K each.
    targets = _local_ids(torch.cat([labels[:, None], topk_indices.to(device)], dim=1), shard_start, shard_classes)
    target_weight, topk_weight = 1.0 - alpha, (alpha / k if k else 0.0)
    # Every (sample, target) pair with its -q_ij grad_losses_i / tau, sorted by class for the dW tiles. Pairs
    # of other shards get the class INT32_MAX and sort past the last tile: no boolean indexing, which
    # would wait for the GPU.
    q = torch.full((1 + k,), topk_weight, device=device)
    q[0] = target_weight
    pair_classes = torch.where(targets >= 0, targets, torch.iinfo(torch.int32).max).flatten()  # [B (1 + K)]
    order = torch.argsort(pair_classes, stable=True)
    pair_classes_local = pair_classes[order]
    pair_batch_idx = (order // targets.shape[1]).to(torch.int32)
    pair_grads = (-q[None, :] * grad_scale[:, None]).flatten()[order]
    tile_starts = torch.arange(weight_config["class_tiles"] + 1, dtype=torch.int32, device=device) * weight_config["block_c"]
    pair_offsets = torch.searchsorted(pair_classes_local, tile_starts).to(torch.int32)

    grad_weight = torch.empty(shard_classes, dim, dtype=weight.dtype, device=device)
    _shard_backward_weight_kernel[(weight_config["class_tiles"],)](
        features_n, weight, norms, lse, grad_scale, grad_weight, pair_offsets, pair_batch_idx, pair_classes_local, pair_grads,
        batch, shard_classes, dim, features_n.stride(0), weight.stride(0), 1.0 / temperature, NORM_EPS,
        BLOCK_B=weight_config["block_b"], BLOCK_C=weight_config["block_c"], BLOCK_D=weight_config["block_d"],
        BLOCK_P=PAIR_BLOCK, DOT_DTYPE=weight_config["dot_dtype"], INPUT_PRECISION="ieee",
        num_warps=weight_config["num_warps"])

    # dE_n partials: one slice per class split (softmax part), then the target part.
    splits = features_config["num_splits"]
    partial = torch.empty(splits + 1, batch, dim, dtype=torch.float32, device=device)
    _shard_backward_features_kernel[(features_config["batch_blocks"], splits)](
        features_n, weight, norms, lse, grad_scale, partial,
        batch, shard_classes, dim, features_config["classes_per_split"], features_n.stride(0), weight.stride(0),
        1.0 / temperature, NORM_EPS,
        BLOCK_B=features_config["block_b"], BLOCK_C=features_config["block_c"], BLOCK_D=features_config["block_d"],
        DOT_DTYPE=features_config["dot_dtype"], INPUT_PRECISION="ieee", num_warps=features_config["num_warps"])
    _target_rows_kernel[(triton.cdiv(batch, TARGET_BATCH_BLOCK),)](
        weight, norms, grad_scale, targets, partial[splits],
        batch, shard_classes, dim, targets.shape[1], weight.stride(0), targets.stride(0), target_weight, topk_weight,
        NORM_EPS, BLOCK_B=TARGET_BATCH_BLOCK, BLOCK_D=features_config["block_d"])
    return partial.sum(dim=0).to(features_n.dtype), grad_weight
