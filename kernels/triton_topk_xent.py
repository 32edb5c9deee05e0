"""Triton backend of the sharded smoothed cosine-softmax cross-entropy: fused, no [B, C] buffer.

Math (see kernels.reference): for the normalized features e_i of the global batch and this shard's
raw rows W_j, z_ij = <e_i, W_j / |W_j|> / tau <= 1/tau. The forward returns the local statistics the
exchange merges (kernels.topk_xent); the backward gets the merged lse_i and top-K ids T_i and returns
this shard's gradients of sum_i grad_rows_i loss_i with

    G_ij  = grad_rows_i / tau * (exp(z_ij - lse_i) - q_ij),   q = 1 - alpha on y_i, alpha / K on T_i
    dE_n  = G W_n,     dW_n = G^T E_n,     dW_j = (dW_n,j - W_n,j <dW_n,j, W_n,j>) / |W_j|

Why kernels: at B = 4096 rows against C = 160,000 classes (D = 128) the logits are a 2.6 GB fp32 slab.
The plain way writes it, reads it for topk and softmax, writes G, reads G for each backward product:
~6 passes, ~16 GB of HBM traffic (~5 ms at 3.3 TB/s), while the products are 3 x 2BCD = 0.5 TFLOP
(well under 1 ms of bf16 tensor-core time). Here every logit tile lives in registers only:

  forward   programs (row block, class split) stream over the split's class tiles: z tile by tl.dot of
            E against the raw W tile scaled by 1/|W_j| (rows normalised on the fly), sum of
            exp(z - 1/tau), and an exact streaming top-K per row (_insert_candidates); split 0 also
            computes the target logit. Per-split partials are O(B K); the host sums / merges them.
  backward  G is recomputed tile by tile, never stored (FlashAttention-2 style):
            dW kernel: one program per class block owns its dW tile and loops over all row blocks
                       (dW_n += G^T E), then applies the normalisation Jacobian: no atomics;
            dE kernel: programs (row block, class split) accumulate G W_n; the per-split partials
                       [S, B, D] are summed on the host in split order. Deterministic run to run.
  So 5 products of 2BCD flops in all (1 forward, 2 per backward kernel), each tile streamed once.

Dtypes: features_n and weight fp32 or bf16 (any mix). Both bf16: bf16 tensor-core products with fp32
accumulation. Otherwise fp32 products with input_precision="ieee": TF32 (the default on GPUs) would
cost ~1e-3 relative error. Statistics, G and accumulators are fp32. Under TRITON_INTERPRET=1 (set it
before triton is imported) operands are always upcast to fp32 first: the triton 3.9 interpreter returns
garbage for tl.dot on bf16 operands, so the bf16 tensor-core product is only exercised on a GPU.
"""
import torch
import triton
import triton.language as tl

from kernels.reference import NORM_EPS
from kernels.topk_xent import select_topk

# K of the top-K smoothing: the running top-K of a row block lives in registers ([BLOCK_B, K_PAD]
# values and ids), and the first tile of every program costs K_PAD extraction passes.
MAX_K = 32
# D: whole feature rows are held on chip (an E tile and a W tile of [BLOCK, D], no loop over D).
# Above 128 the tiles are halved to stay within registers and shared memory.
MAX_FEATURE_DIM = 256
# (row, class) target pairs scattered per one-hot product in the dW kernel: tl.dot needs >= 16, and
# a class tile rarely holds more (B (K + 1) / (C / BLOCK_C) pairs: ~20 at B = 4096, C = 160,000, K = 5).
PAIR_BLOCK = 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _load_class_tile(weight_ptr, cols, col_ok, dims, dim_ok, stride_weight, norm_eps):
    """Raw rows W_j [BLOCK_C, BLOCK_D] (zero where masked), 1 / max(|W_j|, eps) and |W_j| > eps, both [BLOCK_C]."""
    w = tl.load(weight_ptr + cols[:, None].to(tl.int64) * stride_weight + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    w32 = w.to(tl.float32)
    norm = tl.sqrt(tl.sum(w32 * w32, axis=1))
    return w, 1.0 / tl.maximum(norm, norm_eps), norm > norm_eps


@triton.jit
def _cosine_logits(e, w, inv_norm, col_ok, inv_temperature, INPUT_PRECISION: tl.constexpr):
    """z = E W_n^T / tau, fp32 [BLOCK_B, BLOCK_C], -inf on columns past the shard.

    e [BLOCK_B, BLOCK_D] and w [BLOCK_C, BLOCK_D] in the dot dtype; normalising after the product
    (one scale per column) keeps the bf16 operands exact instead of rounding W / |W| to bf16.
    """
    z = tl.dot(e, tl.trans(w), input_precision=INPUT_PRECISION) * (inv_norm * inv_temperature)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _insert_candidates(z, tile_start, target, top_value, top_index, threshold, BLOCK_C: tl.constexpr):
    """Stream one logit tile into every row's running top-K_PAD (unordered), exactly.

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
    features_ptr, weight_ptr, target_ptr,
    sum_exp_ptr, topk_value_ptr, topk_index_ptr, target_logit_ptr,
    batch, num_rows, dim, classes_per_split, stride_features, stride_weight,
    inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    TOPK: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Local statistics of one row block against one class split.  Grid (cdiv(B, BLOCK_B), S).

    features_ptr   [B, D] normalized features (row stride stride_features)
    weight_ptr     [C, D] raw rows of the shard (row stride stride_weight)
    target_ptr     [B] int32 local id of y_i, -1 when another shard owns it
    sum_exp_ptr    [S, B] fp32 out: sum over the split's classes of exp(z_ij - 1/tau)
    topk_value_ptr [S, B, K_PAD] fp32 out: the split's K_PAD largest non-target logits (unordered, -inf padded)
    topk_index_ptr [S, B, K_PAD] int32 out: their local ids (negative where padded)
    target_logit_ptr [B] fp32 out (split 0 only): z_{i, y_i}, 0 when not owned
    classes_per_split: a multiple of BLOCK_C; split s covers [s * classes_per_split, ...) within [0, C)
    """
    row_block, split = tl.program_id(0), tl.program_id(1)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    e = tl.load(features_ptr + rows[:, None] * stride_features + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_B, BLOCK_D]
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)  # [BLOCK_B]

    # 1. Target logit, once per row block: a row-wise dot with the gathered rows W_{y_i}.
    if split == 0:
        owned = target >= 0
        w_target, inv_norm_target, _ = _load_class_tile(weight_ptr, target, owned, dims, dim_ok, stride_weight,
                                                        norm_eps)
        z_target = tl.sum(e.to(tl.float32) * w_target.to(tl.float32), axis=1) * inv_norm_target * inv_temperature
        tl.store(target_logit_ptr + rows, tl.where(owned, z_target, 0.0), mask=row_ok)

    # 2. Stream over the split's class tiles. Empty top-K slots hold -inf with distinct negative ids
    #    (so exactly one is evicted at a time); rows past the batch hold +inf so nothing ever enters.
    e = e.to(DOT_DTYPE)
    slots = tl.arange(0, K_PAD)
    top_value = tl.where(row_ok[:, None], float("-inf"), float("inf")) + tl.zeros([BLOCK_B, K_PAD], tl.float32)
    top_index = -1 - slots[None, :] + tl.zeros([BLOCK_B, K_PAD], tl.int32)
    threshold = tl.min(top_value, axis=1)
    sum_exp = tl.zeros([BLOCK_B], tl.float32)
    class_start = split * classes_per_split
    class_stop = tl.minimum(class_start + classes_per_split, num_rows)
    for tile_start in range(class_start, class_stop, BLOCK_C):
        cols = tile_start + tl.arange(0, BLOCK_C)
        col_ok = cols < class_stop
        w, inv_norm, _ = _load_class_tile(weight_ptr, cols, col_ok, dims, dim_ok, stride_weight, norm_eps)
        z = _cosine_logits(e, w.to(DOT_DTYPE), inv_norm, col_ok, inv_temperature, INPUT_PRECISION)
        # Fixed shift: z <= 1/tau, so exp(z - 1/tau) <= 1 and the splits' sums add up without rescaling.
        sum_exp += tl.sum(tl.exp(z - inv_temperature), axis=1)
        if TOPK:
            top_value, top_index, threshold = _insert_candidates(z, tile_start, target, top_value, top_index,
                                                                 threshold, BLOCK_C)

    # 3. Per-split partials; the host merges the S splits.
    tl.store(sum_exp_ptr + split * batch + rows, sum_exp, mask=row_ok)
    if TOPK:
        out = (split * batch + rows)[:, None] * K_PAD + slots[None, :]
        tl.store(topk_value_ptr + out, top_value, mask=row_ok[:, None])
        tl.store(topk_index_ptr + out, top_index, mask=row_ok[:, None])


@triton.jit
def _shard_backward_weight_kernel(
    features_ptr, weight_ptr, lse_ptr, row_scale_ptr, grad_weight_ptr,
    pair_offsets_ptr, pair_rows_ptr, pair_cols_ptr, pair_grads_ptr,
    batch, num_rows, dim, stride_features, stride_weight, inv_temperature, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dW of one class block: dW_n = G^T E_n over all row blocks, then the Jacobian.  Grid (cdiv(C, BLOCK_C),).

    lse_ptr [B] fp32 merged logsumexp; row_scale_ptr [B] fp32 grad_rows / tau; grad_weight_ptr [C, D]
    out, contiguous, in the weight's dtype. The sparse -q part of G comes as (row, class, value) pairs
    sorted by class: pair_rows_ptr / pair_cols_ptr int32 and pair_grads_ptr fp32 [M] (value
    -q_ij grad_rows_i / tau), the pairs of class tile t at [pair_offsets_ptr[t], pair_offsets_ptr[t + 1]).
    """
    tile = tl.program_id(0)
    tile_start = tile * BLOCK_C
    positions = tl.arange(0, BLOCK_C)
    cols = tile_start + positions
    col_ok = cols < num_rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    w, inv_norm, long_row = _load_class_tile(weight_ptr, cols, col_ok, dims, dim_ok, stride_weight, norm_eps)
    w_dot = w.to(DOT_DTYPE)

    # 1. Softmax part: dW_n tile [BLOCK_C, BLOCK_D] += softmax^T E, owned by this program, in registers.
    grad_weight_n = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for row_start in range(0, batch, BLOCK_B):
        rows = row_start + tl.arange(0, BLOCK_B)
        row_ok = rows < batch
        e = tl.load(features_ptr + rows[:, None] * stride_features + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)  # 0 past the batch: no gradient
        z = _cosine_logits(e, w_dot, inv_norm, col_ok, inv_temperature, INPUT_PRECISION)
        softmax_grad = tl.exp(z - lse[:, None]) * row_scale[:, None]  # [BLOCK_B, BLOCK_C]
        grad_weight_n = tl.dot(tl.trans(softmax_grad.to(DOT_DTYPE)), e, acc=grad_weight_n,
                               input_precision=INPUT_PRECISION)

    # 2. Target part: the tile's few (row, class) pairs, scattered by a one-hot product (fp32, exact).
    pair_end = tl.load(pair_offsets_ptr + tile + 1)
    for pair_start in range(tl.load(pair_offsets_ptr + tile), pair_end, BLOCK_P):
        pairs = pair_start + tl.arange(0, BLOCK_P)
        pair_ok = pairs < pair_end
        pair_rows = tl.load(pair_rows_ptr + pairs, mask=pair_ok, other=0)
        pair_cols = tl.load(pair_cols_ptr + pairs, mask=pair_ok, other=-1) - tile_start
        pair_grads = tl.load(pair_grads_ptr + pairs, mask=pair_ok, other=0.0)
        e = tl.load(features_ptr + pair_rows[:, None] * stride_features + dims[None, :],
                    mask=pair_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_D]
        one_hot = (positions[:, None] == pair_cols[None, :]).to(tl.float32)  # [BLOCK_C, BLOCK_P]
        grad_weight_n = tl.dot(one_hot, pair_grads[:, None] * e, acc=grad_weight_n, input_precision="ieee")

    # 3. Through W_n = W / max(|W|, eps): remove the radial part and divide by |W|. Rows not longer than
    #    eps were divided by the constant eps, so they have no radial term (reference.normalize_backward).
    w_n = w.to(tl.float32) * inv_norm[:, None]
    radial = tl.sum(grad_weight_n * w_n, axis=1)
    grad_weight = tl.where(long_row[:, None], grad_weight_n - w_n * radial[:, None], grad_weight_n) * inv_norm[:, None]
    tl.store(grad_weight_ptr + cols[:, None].to(tl.int64) * dim + dims[None, :],
             grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])


@triton.jit
def _shard_backward_features_kernel(
    features_ptr, weight_ptr, lse_ptr, row_scale_ptr, targets_ptr, grad_features_ptr,
    batch, num_rows, dim, num_targets, classes_per_split, stride_features, stride_weight, stride_targets,
    inv_temperature, target_weight, topk_weight, norm_eps,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Partial dE_n = G W_n of one row block over one class split.  Grid (cdiv(B, BLOCK_B), S).

    lse_ptr, row_scale_ptr as in _shard_backward_weight_kernel; targets_ptr [B, 1 + K] int32 local
    ids of y_i then of the merged top-K (-1: not in this shard), weighted 1 - alpha and alpha / K;
    grad_features_ptr [S, B, D] fp32 out, one partial per split, summed by the host in split order.
    """
    row_block, split = tl.program_id(0), tl.program_id(1)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    e = tl.load(features_ptr + rows[:, None] * stride_features + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
    class_start = split * classes_per_split
    class_stop = tl.minimum(class_start + classes_per_split, num_rows)

    # 1. Target part: -sum_j q_ij W_n,j over the K + 1 targets of each row that fall in this split.
    grad_features_n = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for slot in range(num_targets):
        target = tl.load(targets_ptr + rows * stride_targets + slot, mask=row_ok, other=-1)
        in_split = (target >= class_start) & (target < class_stop)
        w, inv_norm, _ = _load_class_tile(weight_ptr, target, in_split, dims, dim_ok, stride_weight, norm_eps)
        q = tl.where(slot == 0, target_weight, topk_weight)
        grad_features_n -= (q * row_scale * inv_norm)[:, None] * w.to(tl.float32)

    # 2. Softmax part, tile by tile: G W_n = (G diag(1 / |W_j|)) W, so the raw tile stays the exact operand.
    for tile_start in range(class_start, class_stop, BLOCK_C):
        cols = tile_start + tl.arange(0, BLOCK_C)
        col_ok = cols < class_stop
        w, inv_norm, _ = _load_class_tile(weight_ptr, cols, col_ok, dims, dim_ok, stride_weight, norm_eps)
        w = w.to(DOT_DTYPE)
        z = _cosine_logits(e, w, inv_norm, col_ok, inv_temperature, INPUT_PRECISION)
        softmax_grad = tl.exp(z - lse[:, None]) * (row_scale[:, None] * inv_norm[None, :])  # [BLOCK_B, BLOCK_C]
        grad_features_n = tl.dot(softmax_grad.to(DOT_DTYPE), w, acc=grad_features_n, input_precision=INPUT_PRECISION)
    tl.store(grad_features_ptr + (split * batch + rows)[:, None] * dim + dims[None, :], grad_features_n,
             mask=row_ok[:, None] & dim_ok[None, :])


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


def _local_ids(ids, shard_start, num_rows):
    """Global class ids -> int32 positions in this shard; -1 for ids it does not own and for -1 padding."""
    local = ids - shard_start
    return torch.where((ids >= 0) & (local >= 0) & (local < num_rows), local, -1).to(torch.int32).contiguous()


def _launch_config(features_n, weight, block_rows, block_classes, num_splits):
    """Tile sizes, class splits, warps and dot dtype. block_rows / block_classes / num_splits override
    the heuristics (tests use small ones to cover many tiles and splits)."""
    (batch, dim), num_rows, device = features_n.shape, weight.shape[0], weight.device
    block_d = max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16
    # 128 x 128 logit tiles keep the tensor cores busy; halved above D = 128 to stay on chip.
    cap = 128 if block_d <= 128 else 64
    block_b = block_rows or min(cap, max(16, triton.next_power_of_2(batch)))
    block_c = block_classes or min(cap, max(16, triton.next_power_of_2(num_rows)))
    row_blocks, class_tiles = triton.cdiv(batch, block_b), triton.cdiv(num_rows, block_c)
    if num_splits is None:
        # Row blocks alone (B / BLOCK_B = 32 at B = 4096) would leave most SMs idle: split the classes so
        # that there are ~4 programs per SM. The interpreter runs programs one after another.
        processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = triton.cdiv(4 * processors, row_blocks)
    classes_per_split = triton.cdiv(class_tiles, min(max(num_splits, 1), class_tiles)) * block_c
    interpreting = triton.knobs.runtime.interpret
    bf16_operands = features_n.dtype == weight.dtype == torch.bfloat16 and not interpreting
    return dict(block_b=block_b, block_c=block_c, block_d=block_d, row_blocks=row_blocks, class_tiles=class_tiles,
                num_splits=triton.cdiv(num_rows, classes_per_split), classes_per_split=classes_per_split,
                num_warps=8 if block_b * block_c >= 128 * 128 else 4,
                dot_dtype=tl.bfloat16 if bf16_operands else tl.float32)


def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k,
                        block_rows=None, block_classes=None, num_splits=None):
    """Local statistics of this shard's rows [shard_start, shard_start + C) (see kernels.reference).

    features_n [B, D] normalized, weight [C, D] raw rows, fp32 or bf16; labels [B] global ids;
    0 <= k <= MAX_K, 1 <= D <= MAX_FEATURE_DIM. Returns fp32 sum_exp [B] (fixed shift 1/tau),
    target_logit [B] (0 when not owned), topk_values [B, k] (descending, ties to the lower id, -inf
    padded) and long topk_indices [B, k] (global ids, -1 padded). No [B, C] buffer.
    """
    _check_inputs(features_n, weight, labels, temperature)
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k must be in [0, {MAX_K}], got {k}")
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), num_rows = features_n.shape, weight.shape[0]
    config = _launch_config(features_n, weight, block_rows, block_classes, num_splits)
    splits, k_pad = config["num_splits"], triton.next_power_of_2(max(k, 1))
    out = dict(dtype=torch.float32, device=weight.device)
    sum_exp = torch.empty(splits, batch, **out)
    target_logit = torch.empty(batch, **out)
    topk_values = torch.empty(splits, batch, k_pad if k else 0, **out)
    topk_local = torch.empty(splits, batch, k_pad if k else 0, dtype=torch.int32, device=weight.device)
    _shard_forward_kernel[(config["row_blocks"], splits)](
        features_n, weight, _local_ids(labels, shard_start, num_rows),
        sum_exp, topk_values, topk_local, target_logit,
        batch, num_rows, dim, config["classes_per_split"], features_n.stride(0), weight.stride(0),
        1.0 / temperature, NORM_EPS,
        BLOCK_B=config["block_b"], BLOCK_C=config["block_c"], BLOCK_D=config["block_d"], K_PAD=k_pad, TOPK=k > 0,
        DOT_DTYPE=config["dot_dtype"], INPUT_PRECISION="ieee", num_warps=config["num_warps"])

    # Merge the splits: sums in split order; the top-k of the union of their candidates.
    candidates = topk_values.transpose(0, 1).reshape(batch, -1)  # [B, S * K_PAD]
    ids = torch.where(candidates > float("-inf"), topk_local.transpose(0, 1).reshape(batch, -1).long() + shard_start, -1)
    values, indices = select_topk(candidates, ids, k)
    return sum_exp.sum(dim=0), target_logit, values, indices


def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_rows, *, temperature, alpha,
                   block_rows=None, block_classes=None, num_splits=None):
    """(dE_n [B, D] in features_n's dtype, dW [C, D] in weight's dtype) of sum_i grad_rows_i loss_i.

    lse [B] and topk_indices [B, K] (global ids, -1 padded) are the MERGED statistics; grad_rows [B].
    dW is w.r.t. the raw rows (normalisation Jacobian included). Deterministic (no atomics).
    """
    _check_inputs(features_n, weight, labels, temperature)
    features_n, weight = _rows_contiguous(features_n), _rows_contiguous(weight)
    (batch, dim), num_rows, device = features_n.shape, weight.shape[0], weight.device
    config = _launch_config(features_n, weight, block_rows, block_classes, num_splits)
    k = topk_indices.shape[1]
    lse = lse.to(torch.float32).contiguous()
    row_scale = (grad_rows.to(torch.float32) / temperature).contiguous()  # [B]
    tiles = dict(BLOCK_B=config["block_b"], BLOCK_C=config["block_c"], BLOCK_D=config["block_d"],
                 DOT_DTYPE=config["dot_dtype"], INPUT_PRECISION="ieee", num_warps=config["num_warps"])

    # q as (row, class) targets: y_i with weight 1 - alpha, then the merged top-K with alpha / K each.
    targets = _local_ids(torch.cat([labels[:, None], topk_indices.to(device)], dim=1), shard_start, num_rows)
    target_weight, topk_weight = 1.0 - alpha, (alpha / k if k else 0.0)
    # The pairs this shard owns, with their -q_ij grad_rows_i / tau, sorted by class for the dW tiles.
    owned = targets >= 0
    q = torch.tensor([target_weight] + [topk_weight] * k, device=device)
    order = torch.argsort(targets[owned], stable=True)
    pair_cols = targets[owned][order]
    pair_rows = torch.arange(batch, dtype=torch.int32, device=device)[:, None].expand_as(targets)[owned][order]
    pair_grads = (-q[None, :] * row_scale[:, None])[owned][order]
    tile_starts = torch.arange(config["class_tiles"] + 1, dtype=torch.int32, device=device) * config["block_c"]
    pair_offsets = torch.searchsorted(pair_cols, tile_starts).to(torch.int32)

    grad_weight = torch.empty(num_rows, dim, dtype=weight.dtype, device=device)
    _shard_backward_weight_kernel[(config["class_tiles"],)](
        features_n, weight, lse, row_scale, grad_weight, pair_offsets, pair_rows, pair_cols, pair_grads,
        batch, num_rows, dim, features_n.stride(0), weight.stride(0), 1.0 / temperature, NORM_EPS,
        BLOCK_P=PAIR_BLOCK, **tiles)

    partial = torch.empty(config["num_splits"], batch, dim, dtype=torch.float32, device=device)
    _shard_backward_features_kernel[(config["row_blocks"], config["num_splits"])](
        features_n, weight, lse, row_scale, targets, partial,
        batch, num_rows, dim, targets.shape[1], config["classes_per_split"], features_n.stride(0),
        weight.stride(0), targets.stride(0), 1.0 / temperature, target_weight, topk_weight, NORM_EPS, **tiles)
    return partial.sum(dim=0).to(features_n.dtype), grad_weight
