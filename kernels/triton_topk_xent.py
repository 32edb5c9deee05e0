"""Triton backend of the sharded smoothed cosine-softmax cross-entropy: fused, no [B, C] buffer.

Math (see kernels.reference): for the normalized features e_i of the global batch and this shard's
raw rows W_j, z_ij = <e_i, W_j / |W_j|> / tau <= 1/tau. The forward returns the local statistics the
exchange merges (kernels.exchange); the backward gets the merged lse_i and top-K ids T_i and returns
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
            also computes the target logit. The splits' partials [S, B, 2 + 2 K_PAD] are merged into
            this shard's exchange block by one more kernel (triton_exchange._merge_splits_kernel).
  backward  G is recomputed tile by tile, never stored (FlashAttention-2 style):
            dW kernel: one program per class block owns its dW tile and loops over all batch blocks
                       (dW_n += G^T E, on transposed logit tiles), then over them again for the -q part
                       of G, with a product only where a batch block has a target in the class tile
                       (rare: _targets_tile_t), then the normalisation Jacobian: no atomics, no sort;
            dE kernel: programs (batch block, class split) accumulate the softmax part of G W_n, and
                       _target_rows_kernel the -q part (K + 1 gathered rows of W per sample); the
                       partials [S + 1, B, D] are summed in order. Deterministic.
  So 5 products of 2BCD flops in all (1 forward, 2 per backward kernel), each tile streamed once, and
  5 launches per forward + backward besides the sum of the dE partials; the labels and top-K ids are
  read as they are (int64, any row stride) and made local in the kernels.
  `python bench/kernel.py compile` shows registers / spills / shared memory of every kernel for sm_90.

Dtypes: features_n and weight fp32 or bf16 (any mix, any row stride). The products' operands are the
inputs rounded to compute_dtype (bf16 or fp32; None: bf16 when both inputs are bf16, else fp32), in
the kernels: so fp32 parameters feed bf16 tensor cores without a bf16 copy, and |W_j| is the norm of
the rounded row. bf16: tensor-core products with fp32 accumulation; fp32: input_precision="ieee" (TF32,
the default on GPUs, would cost ~1e-3 relative error). Statistics, G and accumulators are fp32. With bf16
operands the softmax and -q parts of G reach the products separately rounded to bf16 (the dE kernel's
-q part even exact, in fp32: _target_rows_kernel), so an entry where p_ij ~ q_ij (a target the model
already fits) has relative error ~2^-8 (p + q) / |p - q| instead of 2^-8 (bf16 unit roundoff). Under
TRITON_INTERPRET=1 (set it before triton is imported) operands are rounded to compute_dtype and then
multiplied in fp32: the triton 3.9 interpreter returns garbage for tl.dot on bf16 operands, so the bf16
tensor-core product is only exercised on a GPU.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import NORM_EPS, check_options, stats_ids
from kernels.triton_exchange import merge_splits

# K of the top-K smoothing: the running top-K of a batch block lives in registers ([BLOCK_B, K_PAD]
# values and ids), and the first tile of every program costs K_PAD extraction passes.
MAX_K = 32
# D: whole feature rows are held on chip (an E tile and a W tile of [BLOCK, D], no loop over D).
# Above 128 the tiles are halved to stay within registers and shared memory.
MAX_FEATURE_DIM = 256
# Samples per -q product of the dW kernel: tl.dot's minimum, so that its [BLOCK_C, 16] tile adds few
# registers to the accumulator's.
TARGET_PRODUCT_BLOCK = 16
# Samples per program of the dE target-part kernel: it gathers K + 1 whole rows of W per sample.
TARGET_BATCH_BLOCK = 32
# Classes per program of the norm pre-pass: a [64, D] tile is 32 KB of fp32 at D = 128, and 2,500 programs
# at C = 160,000 fill every SM of a GPU.
NORM_BLOCK = 64
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))  # TRITON_INTERPRET=1, read at import like triton


@triton.jit
def _as_operand(x, ROUND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """x rounded to the compute dtype, in the dtype tl.dot gets (the same on a GPU; fp32 in the interpreter)."""
    if INTERPRETED and ROUND_DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        # The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even (as torch does):
        # round by hand, so that the CPU tests see the GPU's operands. Then the cast below is exact.
        bits = x.to(tl.int32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(ROUND_DTYPE).to(DOT_DTYPE)


@triton.jit
def _row_norms_kernel(weight_ptr, norm_ptr, shard_classes, dim, stride_weight,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_DTYPE: tl.constexpr):
    """Pre-pass: norm_ptr[j] = |W_j| in fp32 of the rows rounded to ROUND_DTYPE, for the classes of one
    block.  Grid (cdiv(C, BLOCK_C),)."""
    classes = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dims = tl.arange(0, BLOCK_D)
    w = tl.load(weight_ptr + classes[:, None].to(tl.int64) * stride_weight + dims[None, :],
                mask=(classes < shard_classes)[:, None] & (dims < dim)[None, :], other=0.0)
    w = _as_operand(w, ROUND_DTYPE, tl.float32)
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
def _target_ids(labels_ptr, stride_labels, topk_ptr, stride_topk, slot, batch_idx, batch_ok):
    """Global class id of target `slot` of each sample: y_i for slot 0, the merged top-K id T_i[slot - 1]
    after it (-1 where padded or past the batch).  int64 [BLOCK_B]"""
    if slot == 0:
        ids = tl.load(labels_ptr + batch_idx * stride_labels, mask=batch_ok, other=-1).to(tl.int64)
    else:
        ids = tl.load(topk_ptr + batch_idx * stride_topk + slot - 1, mask=batch_ok, other=-1).to(tl.int64)
    return ids


@triton.jit
def _shard_forward_kernel(
    features_ptr, weight_ptr, norm_ptr, labels_ptr, partial_ptr, partial_ids_ptr,
    batch, shard_classes, dim, classes_per_split, shard_start, stride_features, stride_weight, stride_labels,
    inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr, KC: tl.constexpr,
    ROUND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Local statistics of one batch block against one class split.  Grid (cdiv(B, BLOCK_B), S).

    features_ptr    [B, D] normalized features (row stride stride_features)
    weight_ptr      [C, D] raw rows of the shard (row stride stride_weight)
    norm_ptr        [C] fp32 |W_j|
    labels_ptr      [B] global ids y_i (row stride stride_labels); the shard holds [shard_start, + C)
    partial_ptr     [S, B, 2 + 2 KC] fp32 out, an exchange block per split (kernels.reference): the
                    split's sum of exp(z_ij - 1/tau), z_{i, y_i} (split 0, when owned; else 0), and its
                    KC largest non-target logits (unordered, -inf padded); their local ids (negative
                    where padded) go to partial_ids_ptr, the int32 view of the last KC columns.
                    KC = K_PAD, the running top-K's width (a power of two), or 0 without smoothing.
    classes_per_split: a multiple of BLOCK_C; split s covers [s * classes_per_split, ...) within [0, C)
    """
    split = tl.program_id(1)
    batch_idx, batch_ok, dims, dim_ok, e = _load_batch_block(features_ptr, batch, dim, stride_features, BLOCK_B, BLOCK_D)
    e = _as_operand(e, ROUND_DTYPE, DOT_DTYPE)
    labels = tl.load(labels_ptr + batch_idx * stride_labels, mask=batch_ok, other=-1).to(tl.int64) - shard_start
    target = tl.where((labels >= 0) & (labels < shard_classes), labels, -1).to(tl.int32)  # local id of y_i, or -1
    out = (split * batch + batch_idx) * (2 + 2 * KC)

    # 1. Target logit, once per batch block: a row-wise dot with the gathered rows W_{y_i}.
    target_logit = tl.zeros([BLOCK_B], tl.float32)
    if split == 0:
        owned = target >= 0
        w_target, inv_norm_target, _ = _load_class_tile(weight_ptr, norm_ptr, target, owned, dims, dim_ok, stride_weight,
                                                        norm_eps)
        w_target = _as_operand(w_target, ROUND_DTYPE, tl.float32)
        z_target = tl.sum(e.to(tl.float32) * w_target, axis=1) * inv_norm_target * inv_temperature
        target_logit = tl.where(owned, z_target, 0.0)
    tl.store(partial_ptr + out + 1, target_logit, mask=batch_ok)

    # 2. Stream over the split's class tiles. Empty top-K slots hold -inf with distinct negative ids
    #    (so exactly one is evicted at a time); positions past the batch hold +inf so nothing ever enters.
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
        z = _cosine_logits(e, _as_operand(w, ROUND_DTYPE, DOT_DTYPE), inv_norm, class_ok, inv_temperature,
                           INPUT_PRECISION)
        # Fixed shift: z <= 1/tau, so exp(z - 1/tau) <= 1 and the splits' sums add up without rescaling.
        sum_exp += tl.sum(tl.exp(z - inv_temperature), axis=1)
        if KC > 0:
            top_value, top_index, threshold = _insert_candidates(z, tile_start, target, top_value, top_index,
                                                                 threshold, BLOCK_C)

    # 3. This split's part of the partials; triton_exchange merges the S splits.
    tl.store(partial_ptr + out, sum_exp, mask=batch_ok)
    if KC > 0:
        tl.store(partial_ptr + out[:, None] + 2 + slots[None, :], top_value, mask=batch_ok[:, None])
        tl.store(partial_ids_ptr + out[:, None] + slots[None, :], top_index, mask=batch_ok[:, None])


@triton.jit
def _targets_tile_t(labels_ptr, stride_labels, topk_ptr, stride_topk, num_topk, batch_idx, batch_ok, tile_first_class,
                    grad_scale, target_weight, topk_weight, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """The -q part of G^T on a tile [BLOCK_C, BLOCK_B]: -q_ij grad_scale_i where class tile_first_class + j is a
    target of sample i (slot 0: y_i, weight 1 - alpha; then the top-K, alpha / K each), and how many
    targets fell in the tile.

    A batch block rarely has a target in a given class tile (B (K + 1) targets among C classes), so
    each slot costs a [BLOCK_B] test and only a hit a pass over the tile: no pair list, no sort.
    """
    positions = tl.arange(0, BLOCK_C)
    tile = tl.zeros([BLOCK_C, BLOCK_B], tl.float32)
    hits = 0
    for slot in range(0, num_topk + 1):
        column = _target_ids(labels_ptr, stride_labels, topk_ptr, stride_topk, slot, batch_idx, batch_ok) - tile_first_class
        hit = batch_ok & (column >= 0) & (column < BLOCK_C)
        slot_hits = tl.sum(hit.to(tl.int32))
        if slot_hits > 0:
            q = tl.where(hit, tl.where(slot == 0, target_weight, topk_weight) * grad_scale, 0.0)
            tile -= tl.where(positions[:, None] == column[None, :], q[None, :], 0.0)
        hits += slot_hits
    return tile, hits


@triton.jit
def _shard_backward_weight_kernel(
    features_ptr, weight_ptr, norm_ptr, lse_ptr, grad_losses_ptr, labels_ptr, topk_ptr, grad_weight_ptr,
    batch, shard_classes, dim, shard_start, num_topk, stride_features, stride_weight, stride_grad_losses,
    stride_labels, stride_topk, inv_temperature, target_weight, topk_weight, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TARGET_BLOCK: tl.constexpr,
    ROUND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dW of one class block: dW_n = G^T E_n over all batch blocks, then the Jacobian.  Grid (cdiv(C, BLOCK_C),).

    lse_ptr [B] fp32 merged logsumexp; grad_losses_ptr [B] fp32 (any stride, 0 for a broadcast scalar);
    labels_ptr [B] and topk_ptr [B, num_topk] global ids (int64, -1 padded) for the -q part;
    grad_weight_ptr [C, D] out, contiguous, in the weight's dtype.
    """
    tile_start = tl.program_id(0) * BLOCK_C
    classes = tile_start + tl.arange(0, BLOCK_C)
    class_ok = classes < shard_classes
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    w, inv_norm, long_row = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
    w = _as_operand(w, ROUND_DTYPE, DOT_DTYPE)

    # 1. Softmax part: dW_n tile [BLOCK_C, BLOCK_D] += softmax^T E, owned by this program, in registers.
    grad_weight_n = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for batch_start in range(0, batch, BLOCK_B):
        batch_idx = batch_start + tl.arange(0, BLOCK_B)
        batch_ok = batch_idx < batch
        e = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :],
                    mask=batch_ok[:, None] & dim_ok[None, :], other=0.0)
        e = _as_operand(e, ROUND_DTYPE, DOT_DTYPE)
        lse = tl.load(lse_ptr + batch_idx, mask=batch_ok, other=0.0)
        grad_scale = tl.load(grad_losses_ptr + batch_idx * stride_grad_losses, mask=batch_ok,
                             other=0.0) * inv_temperature  # 0 past the batch: no gradient
        # Logits transposed, z^T = W_n E^T [BLOCK_C, BLOCK_B], so that G^T comes out of the product in
        # the layout of the next product's left operand (transposing a register tile costs a trip
        # through shared memory; the FlashAttention-2 dK/dV pass does the same).
        z_t = tl.dot(w, tl.trans(e), input_precision=INPUT_PRECISION) * (inv_norm * inv_temperature)[:, None]
        softmax_grad_t = tl.exp(z_t - lse[None, :]) * grad_scale[None, :]  # [BLOCK_C, BLOCK_B]
        grad_weight_n = tl.dot(softmax_grad_t.to(DOT_DTYPE), e, acc=grad_weight_n, input_precision=INPUT_PRECISION)

    # 2. Target part, in a second pass so that step 1 keeps its registers: the batch blocks with a target
    #    in this class tile add -(q grad_scale)^T E by a product with their (mostly zero) -q tile, in
    #    blocks of TARGET_BLOCK samples (a [BLOCK_C, TARGET_BLOCK] tile next to the accumulator).
    for batch_start in range(0, batch, TARGET_BLOCK):
        batch_idx = batch_start + tl.arange(0, TARGET_BLOCK)
        batch_ok = batch_idx < batch
        grad_scale = tl.load(grad_losses_ptr + batch_idx * stride_grad_losses, mask=batch_ok,
                             other=0.0) * inv_temperature
        targets_t, hits = _targets_tile_t(labels_ptr, stride_labels, topk_ptr, stride_topk, num_topk, batch_idx,
                                          batch_ok, shard_start + tile_start, grad_scale, target_weight, topk_weight,
                                          TARGET_BLOCK, BLOCK_C)
        if hits > 0:
            e = tl.load(features_ptr + batch_idx[:, None] * stride_features + dims[None, :],
                        mask=batch_ok[:, None] & dim_ok[None, :], other=0.0)
            grad_weight_n = tl.dot(targets_t.to(DOT_DTYPE), _as_operand(e, ROUND_DTYPE, DOT_DTYPE), acc=grad_weight_n,
                                   input_precision=INPUT_PRECISION)

    # 2. Through W_n = W / max(|W|, eps): dW = (dW_n - W_n <dW_n, W_n>) / |W|, written with the (rounded)
    #    W reloaded rather than kept in registers through the loop, to keep one [BLOCK_C, BLOCK_D] fp32
    #    tile live besides the accumulator. Rows not longer than eps were divided by the constant eps:
    #    no radial term (reference.normalize_backward).
    w, _, _ = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
    w = _as_operand(w, ROUND_DTYPE, tl.float32)
    radial = tl.where(long_row, tl.sum(grad_weight_n * w, axis=1) * inv_norm * inv_norm, 0.0)  # <dW_n, W_n> / |W|
    grad_weight = (grad_weight_n - w * radial[:, None]) * inv_norm[:, None]
    tl.store(grad_weight_ptr + classes[:, None].to(tl.int64) * dim + dims[None, :],
             grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=class_ok[:, None] & dim_ok[None, :])


@triton.jit
def _shard_backward_features_kernel(
    features_ptr, weight_ptr, norm_ptr, lse_ptr, grad_losses_ptr, grad_features_ptr,
    batch, shard_classes, dim, classes_per_split, stride_features, stride_weight, stride_grad_losses,
    inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ROUND_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Partial dE_n = softmax-part of G, times W_n, for one batch block over one class split.  Grid (cdiv(B, BLOCK_B), S).

    lse_ptr, grad_losses_ptr as in _shard_backward_weight_kernel; grad_features_ptr [S + 1, B, D] fp32
    out: slice s is split s's partial (slice S is the target part, _target_rows_kernel); the host
    sums the slices in order, so the result is deterministic.
    """
    split = tl.program_id(1)
    batch_idx, batch_ok, dims, dim_ok, e = _load_batch_block(features_ptr, batch, dim, stride_features, BLOCK_B, BLOCK_D)
    e = _as_operand(e, ROUND_DTYPE, DOT_DTYPE)
    lse = tl.load(lse_ptr + batch_idx, mask=batch_ok, other=0.0)
    grad_scale = tl.load(grad_losses_ptr + batch_idx * stride_grad_losses, mask=batch_ok, other=0.0) * inv_temperature
    class_start = split * classes_per_split
    class_stop = tl.minimum(class_start + classes_per_split, shard_classes)

    # Softmax part only (the sparse -q part is _target_rows_kernel), tile by tile: G W_n =
    # (G diag(1 / |W_j|)) W, so the raw tile stays the exact operand.
    grad_features_n = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for tile_start in range(class_start, class_stop, BLOCK_C):
        classes = tile_start + tl.arange(0, BLOCK_C)
        class_ok = classes < class_stop
        w, inv_norm, _ = _load_class_tile(weight_ptr, norm_ptr, classes, class_ok, dims, dim_ok, stride_weight, norm_eps)
        w = _as_operand(w, ROUND_DTYPE, DOT_DTYPE)
        z = _cosine_logits(e, w, inv_norm, class_ok, inv_temperature, INPUT_PRECISION)
        softmax_grad = tl.exp(z - lse[:, None]) * (grad_scale[:, None] * inv_norm[None, :])  # [BLOCK_B, BLOCK_C]
        grad_features_n = tl.dot(softmax_grad.to(DOT_DTYPE), w, acc=grad_features_n, input_precision=INPUT_PRECISION)

    tl.store(grad_features_ptr + (split * batch + batch_idx)[:, None] * dim + dims[None, :], grad_features_n,
             mask=batch_ok[:, None] & dim_ok[None, :])


@triton.jit
def _target_rows_kernel(
    weight_ptr, norm_ptr, grad_losses_ptr, labels_ptr, topk_ptr, grad_features_ptr,
    batch, shard_classes, dim, shard_start, num_topk, stride_weight, stride_grad_losses, stride_labels, stride_topk,
    inv_temperature, target_weight, topk_weight, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    """Target part of dE_n: -grad_losses_i / tau sum_j q_ij W_n,j over the K + 1 targets of each sample.  Grid (cdiv(B, BLOCK_B),).

    labels_ptr / topk_ptr as in _shard_backward_weight_kernel (targets of other shards are skipped);
    grad_features_ptr [B, D] fp32 out. A separate kernel: gathering whole rows next to the accumulator of
    the softmax part would spill registers there.
    """
    batch_idx = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    batch_ok = batch_idx < batch
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    grad_scale = tl.load(grad_losses_ptr + batch_idx * stride_grad_losses, mask=batch_ok, other=0.0) * inv_temperature
    grad_features_n = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for slot in range(0, num_topk + 1):
        local = _target_ids(labels_ptr, stride_labels, topk_ptr, stride_topk, slot, batch_idx, batch_ok) - shard_start
        owned = (local >= 0) & (local < shard_classes)
        w, inv_norm, _ = _load_class_tile(weight_ptr, norm_ptr, tl.where(owned, local, 0), owned, dims, dim_ok,
                                          stride_weight, norm_eps)
        q = tl.where(slot == 0, target_weight, topk_weight)
        grad_features_n -= (q * grad_scale * inv_norm)[:, None] * _as_operand(w, ROUND_DTYPE, tl.float32)
    tl.store(grad_features_ptr + batch_idx[:, None] * dim + dims[None, :], grad_features_n,
             mask=batch_ok[:, None] & dim_ok[None, :])


def _check_inputs(features_n, weight, labels, temperature, compute_dtype):
    """Host-side validation shared by both launchers; raises ValueError naming the bad value."""
    if features_n.dim() != 2 or weight.dim() != 2 or features_n.shape[1] != weight.shape[1]:
        raise ValueError(f"need features_n [B, D] and weight [C, D], got {list(features_n.shape)} and {list(weight.shape)}")
    if labels.shape != features_n.shape[:1] or labels.is_floating_point():
        raise ValueError(f"labels must be integer ids [{features_n.shape[0]}], got {labels.dtype} {list(labels.shape)}")
    for name, dtype in (("features_n", features_n.dtype), ("weight", weight.dtype), ("compute_dtype", compute_dtype)):
        if dtype not in SUPPORTED_DTYPES and not (name == "compute_dtype" and dtype is None):
            raise ValueError(f"{name} must be float32 or bfloat16 for the Triton kernels, got {dtype}")
    if not features_n.device == weight.device == labels.device:
        raise ValueError(f"all inputs must be on one device, got {features_n.device}, {weight.device}, {labels.device}")
    batch, dim = features_n.shape
    if not 1 <= dim <= MAX_FEATURE_DIM:
        raise ValueError(f"feature dim must be in [1, {MAX_FEATURE_DIM}], got {dim}")
    if batch < 1 or not 1 <= weight.shape[0] < 2**31:
        raise ValueError(f"need B >= 1 and 1 <= C < 2^31 (int32 local ids), got B = {batch}, C = {weight.shape[0]}")
    check_options(temperature=temperature)


def _rows_contiguous(x):
    """The kernels take a row stride but need unit stride along D."""
    return x if x.stride(1) == 1 else x.contiguous()


def _row_norms(weight, round_dtype):
    """|W_j| in fp32 [C] of the rows rounded to the compute dtype: one read of W (40 MB at 160,000 x 128 bf16),
    no fp32 copy."""
    shard_classes, dim = weight.shape
    norms = torch.empty(shard_classes, dtype=torch.float32, device=weight.device)
    _row_norms_kernel[(triton.cdiv(shard_classes, NORM_BLOCK),)](
        weight, norms, shard_classes, dim, weight.stride(0), BLOCK_C=NORM_BLOCK, BLOCK_D=triton.next_power_of_2(dim),
        ROUND_DTYPE=round_dtype)
    return norms


# Largest (BLOCK_B, BLOCK_C) of each kernel for bf16 operands and D <= 128, as in FlashAttention-2 on
# Hopper: the forward and dE kernels hold E tiles and stream class tiles (128 x 64, like its forward);
# the dW kernel holds a class tile and streams batch blocks (64 x 128, like its dK/dV pass). Halved in
# both directions for fp32 operands or D > 128 (4x the register / shared-memory bytes per tile).
TILE_CAPS = {"forward": (128, 64), "features": (128, 64), "weight": (64, 128)}


def _multiprocessors(device):
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one after another)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _launch_config(kind, features_n, weight, compute_dtype, block_batch, block_classes, num_splits):
    """Tile sizes, class splits, warps and operand dtypes of one kernel ('forward', 'features' or 'weight').
    block_batch / block_classes / num_splits override the heuristics (tests use small tiles)."""
    (batch, dim), shard_classes, device = features_n.shape, weight.shape[0], weight.device
    if compute_dtype is None:
        both_bf16 = features_n.dtype == weight.dtype == torch.bfloat16
        compute_dtype = torch.bfloat16 if both_bf16 else torch.float32
    round_dtype = tl.bfloat16 if compute_dtype == torch.bfloat16 else tl.float32
    bf16_products = round_dtype == tl.bfloat16 and not triton.knobs.runtime.interpret
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16
    cap_b, cap_c = TILE_CAPS[kind]
    if not bf16_products or block_d > 128:
        cap_b, cap_c = cap_b // 2, cap_c // 2
    block_b = block_batch or min(cap_b, max(16, triton.next_power_of_2(batch)))
    block_c = block_classes or min(cap_c, max(16, triton.next_power_of_2(shard_classes)))
    batch_blocks, class_tiles = triton.cdiv(batch, block_b), triton.cdiv(shard_classes, block_c)
    if num_splits is None:
        # Batch blocks alone (B / BLOCK_B = 32 at B = 4096) would leave most SMs idle: split the classes so
        # that there are ~4 programs per SM.
        num_splits = triton.cdiv(4 * _multiprocessors(device), batch_blocks)
    classes_per_split = triton.cdiv(class_tiles, min(max(num_splits, 1), class_tiles)) * block_c
    # 8 warps for the full bf16 tiles, and for the backward kernels' fp32 tiles: fp32 products run without
    # tensor cores, with operands and accumulator in registers, which spill at 4 warps.
    many_warps = block_b * block_c >= 128 * 64 or (kind != "forward" and not bf16_products)
    return dict(block_b=block_b, block_c=block_c, block_d=block_d, batch_blocks=batch_blocks, class_tiles=class_tiles,
                num_splits=triton.cdiv(shard_classes, classes_per_split), classes_per_split=classes_per_split,
                num_warps=8 if many_warps else 4, round_dtype=round_dtype,
                dot_dtype=tl.bfloat16 if bf16_products else tl.float32)


def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k, compute_dtype=None,
                        block_batch=None, block_classes=None, num_splits=None):
    """Local statistics of this shard's classes [shard_start, shard_start + C), packed (see kernels.reference).

    features_n [B, D] normalized, weight [C, D] raw rows, fp32 or bf16, any row stride; labels [B] global
    ids (any integer dtype and stride); 0 <= k <= MAX_K, 1 <= D <= MAX_FEATURE_DIM. Returns the fp32
    exchange block [B, 2 + 2k]: sum_exp (fixed shift 1/tau), target_logit (0 when not owned), topk_values
    (descending, ties to the lower id, -inf padded) and topk_indices (global ids, -1 padded). No [B, C]
    buffer; two launches besides the norm pre-pass (the forward kernel and the merge of its splits).
    """
    _check_inputs(features_n, weight, labels, temperature, compute_dtype)
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k must be in [0, {MAX_K}], got {k}")
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), shard_classes = features_n.shape, weight.shape[0]
    config = _launch_config("forward", features_n, weight, compute_dtype, block_batch, block_classes, num_splits)
    splits, k_pad = config["num_splits"], triton.next_power_of_2(max(k, 1))
    candidates = k_pad if k else 0  # per split
    partial = torch.empty(splits, batch, 2 + 2 * candidates, dtype=torch.float32, device=weight.device)
    _shard_forward_kernel[(config["batch_blocks"], splits)](
        features_n, weight, _row_norms(weight, config["round_dtype"]), labels, partial, stats_ids(partial, candidates),
        batch, shard_classes, dim, config["classes_per_split"], shard_start, features_n.stride(0), weight.stride(0),
        labels.stride(0), 1.0 / temperature, NORM_EPS,
        BLOCK_B=config["block_b"], BLOCK_C=config["block_c"], BLOCK_D=config["block_d"], K_PAD=k_pad, KC=candidates,
        ROUND_DTYPE=config["round_dtype"], DOT_DTYPE=config["dot_dtype"], INPUT_PRECISION="ieee",
        num_warps=config["num_warps"])
    return merge_splits(partial, batch, candidates, k, shard_start)


def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_losses, *, temperature, alpha,
                   compute_dtype=None, block_batch=None, block_classes=None, num_splits=None):
    """(dE_n [B, D] in features_n's dtype, dW [C, D] in weight's dtype) of sum_i grad_losses_i loss_i.

    lse [B] and topk_indices [B, K] (global ids, -1 padded, any row stride) are the MERGED statistics;
    grad_losses [B] (any stride: a broadcast scalar is not copied). dW is w.r.t. the raw rows
    (normalisation Jacobian included). Deterministic (no atomics). Four launches besides the norm
    pre-pass: dW, dE's softmax part, dE's target part, the sum of the dE partials.
    """
    _check_inputs(features_n, weight, labels, temperature, compute_dtype)
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), shard_classes, device = features_n.shape, weight.shape[0], weight.device
    k = topk_indices.shape[1]
    lse, grad_losses = lse.to(torch.float32).contiguous(), grad_losses.to(torch.float32)
    # Without smoothing the kernels read no top-K id: any valid pointer will do (an empty tensor has none).
    topk_indices = topk_indices if k else labels
    weight_config, features_config = (
        _launch_config(kind, features_n, weight, compute_dtype, block_batch, block_classes, num_splits)
        for kind in ("weight", "features"))
    norms = _row_norms(weight, weight_config["round_dtype"])
    target_weight, topk_weight = 1.0 - alpha, (alpha / k if k else 0.0)
    topk_stride = topk_indices.stride(0)
    strides = (features_n.stride(0), weight.stride(0), grad_losses.stride(0))

    grad_weight = torch.empty(shard_classes, dim, dtype=weight.dtype, device=device)
    _shard_backward_weight_kernel[(weight_config["class_tiles"],)](
        features_n, weight, norms, lse, grad_losses, labels, topk_indices, grad_weight,
        batch, shard_classes, dim, shard_start, k, *strides, labels.stride(0), topk_stride,
        1.0 / temperature, target_weight, topk_weight, NORM_EPS,
        BLOCK_B=weight_config["block_b"], BLOCK_C=weight_config["block_c"], BLOCK_D=weight_config["block_d"],
        TARGET_BLOCK=TARGET_PRODUCT_BLOCK, ROUND_DTYPE=weight_config["round_dtype"], DOT_DTYPE=weight_config["dot_dtype"],
        INPUT_PRECISION="ieee", num_warps=weight_config["num_warps"])

    # dE_n partials: one slice per class split (softmax part), then the target part.
    splits = features_config["num_splits"]
    partial = torch.empty(splits + 1, batch, dim, dtype=torch.float32, device=device)
    _shard_backward_features_kernel[(features_config["batch_blocks"], splits)](
        features_n, weight, norms, lse, grad_losses, partial,
        batch, shard_classes, dim, features_config["classes_per_split"], *strides, 1.0 / temperature, NORM_EPS,
        BLOCK_B=features_config["block_b"], BLOCK_C=features_config["block_c"], BLOCK_D=features_config["block_d"],
        ROUND_DTYPE=features_config["round_dtype"], DOT_DTYPE=features_config["dot_dtype"], INPUT_PRECISION="ieee",
        num_warps=features_config["num_warps"])
    _target_rows_kernel[(triton.cdiv(batch, TARGET_BATCH_BLOCK),)](
        weight, norms, grad_losses, labels, topk_indices, partial[splits],
        batch, shard_classes, dim, shard_start, k, weight.stride(0), grad_losses.stride(0), labels.stride(0),
        topk_stride, 1.0 / temperature, target_weight, topk_weight, NORM_EPS,
        BLOCK_B=TARGET_BATCH_BLOCK, BLOCK_D=features_config["block_d"], ROUND_DTYPE=features_config["round_dtype"])
    return partial.sum(dim=0).to(features_n.dtype), grad_weight
