"""Chunked plain-torch backend of the sharded smoothed cosine-softmax cross-entropy (CPU path).

Same local-stats / local-backward pair as `kernels.reference` (see there for the math), computed over
chunks of classes so that no [B, C] buffer ever exists: peak extra memory is a few [B, chunk]
blocks whatever C is. The forward streams over chunks (fixed-shift sum of exp, target logit, running
exact top-K); the backward recomputes each chunk's logits from the merged statistics instead of
storing them, and forms G in place on that one block.

This is what runs on machines without CUDA (the 'auto' backend). Inputs may be fp32, bf16 or
float64; everything is computed in reference.accumulation_dtype (fp32 at least) on the operands rounded
to compute_dtype (reference.as_operand), statistics are returned in that dtype and gradients in the
inputs' dtypes.
"""
import torch

from kernels import reference
from kernels.reference import accumulation_dtype, as_operand, local_class_ids, normalize_rows, select_topk

# Elements of one [B, chunk] block: 2^22 fp32 = 16 MiB. Large enough that the [B, D] x [D, chunk]
# product runs at full speed and the per-chunk overhead vanishes; at most a few such blocks are alive
# at once (the forward's logits, exp and top-K temporaries), so the peak stays near 100 MiB.
CHUNK_ELEMENTS = 2**22


def chunk_bounds(batch, shard_classes, chunk_elements=None):
    """Consecutive [start, stop) class ranges of at most max(1, chunk_elements // batch) classes
    (chunk_elements defaults to CHUNK_ELEMENTS, read at call time so tests can shrink it)."""
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(batch, 1))
    return [(start, min(start + step, shard_classes)) for start in range(0, shard_classes, step)]


def exact_topk(logits, k):
    """k largest entries per row, ties to the lower column (the candidates' order is left to select_topk).

    torch.topk returns an arbitrary member of a group of equal values that straddles the k-th place (rare: never
    in random data). Those places get the group's lowest columns instead, found without the host reading anything:
    with m values above the k-th one, slots m .. k-1 of a straddling row take the 1st .. (k-m)-th column equal to
    it, located by a binary search in the running count of equal entries along the row.
    logits [B, c], 1 <= k <= c -> values [B, k], columns [B, k] long
    """
    values, columns = logits.topk(k, dim=1)
    kth = values[:, -1:]
    equal = logits == kth  # [B, c]
    straddling = torch.count_nonzero(equal, dim=1) > torch.count_nonzero(values == kth, dim=1)  # [B]
    above = torch.count_nonzero(values > kth, dim=1)[:, None]  # [B, 1]: slots m .. k-1 hold the value kth
    slots = torch.arange(k, device=logits.device)  # [k]
    # The (slot - m + 1)-th equal column: the first place where the running count reaches slot - m + 1.
    lowest_equal = torch.searchsorted(equal.cumsum(dim=1), slots - above + 1)  # [B, k]
    return values, torch.where(straddling[:, None] & (slots >= above), lowest_equal, columns)


@torch.no_grad()
def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k, compute_dtype=None,
                        chunk_elements=None):
    """Local statistics of the classes [shard_start, shard_start + C), packed; see kernels.reference.

    features_n [B, D] normalized, weight [C, D] raw, labels [B] global ids. Returns the exchange block
    [B, 2 + 2k] of sum_exp, target_logit, topk_values (descending, -inf padded) and topk_indices
    (global, -1 padded), in accumulation_dtype(features_n.dtype).
    """
    dtype = accumulation_dtype(features_n.dtype)
    features_n = as_operand(features_n, compute_dtype, dtype)
    batch = features_n.shape[0]
    sum_exp = features_n.new_zeros(batch)
    target_logit = features_n.new_zeros(batch)
    topk_values = features_n.new_full((batch, k), float("-inf"))
    topk_indices = torch.full((batch, k), -1, dtype=torch.long, device=features_n.device)
    shift = features_n.new_full((), -1.0 / temperature)  # filled on the device: no copy from the host
    for start, stop in chunk_bounds(batch, weight.shape[0], chunk_elements):
        weight_n = normalize_rows(as_operand(weight[start:stop], compute_dtype, dtype))
        # z - 1/tau in one pass over the block (the top-K does not care about the shift).
        shifted = torch.addmm(shift, features_n, weight_n.T, alpha=1.0 / temperature)  # [B, c]
        sum_exp += torch.exp(shifted).sum(dim=1)
        local, owned = local_class_ids(labels, shard_start + start, stop - start)
        # Masks as arithmetic, not as indices (a boolean index makes the host wait for the count): every row
        # gathers a column, and only the rows that own their target keep it.
        local = local.clamp(0, stop - start - 1)[:, None]  # [B, 1]
        target = shifted.gather(1, local)  # [B, 1]
        target_logit = torch.where(owned, target[:, 0] + 1.0 / temperature, target_logit)
        if k > 0:  # the target is never a smoothing class
            shifted.scatter_(1, local, torch.where(owned[:, None], float("-inf"), target))
            values, columns = exact_topk(shifted, min(k, stop - start))
            # The running top-k and this chunk's candidates, ties to the lower class id.
            topk_values, topk_indices = select_topk(torch.cat([topk_values, values + 1.0 / temperature], dim=1),
                                                    torch.cat([topk_indices, columns + shard_start + start], dim=1), k)
    # -inf entries are padding or the masked target: not a class, as the exchange format says.
    topk_indices = torch.where(topk_values > float("-inf"), topk_indices, -1)
    return reference.pack_shard_stats(sum_exp, target_logit, topk_values, topk_indices)


@torch.no_grad()
def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_losses, *, temperature, alpha,
                   compute_dtype=None, chunk_elements=None):
    """(dE_n [B, D], dW [C, D]) of sum_i grad_losses_i loss_i, from the merged lse [B] and top-K ids [B, K].

    Per chunk: G = grad_losses / tau (exp(z - lse) - q) with the sparse q subtracted in place (B (K + 1)
    entries, no dense q block), dE_n += G W_n, and the chunk's rows of dW through the Jacobian of the
    row normalisation (reference.normalize_backward). Gradients in the dtypes of features_n and weight.
    """
    dtype = accumulation_dtype(features_n.dtype)
    features_c = as_operand(features_n, compute_dtype, dtype)
    neg_lse = -lse.to(dtype)[:, None]  # [B, 1]
    grad_scale = (grad_losses.to(dtype) / temperature)[:, None]  # [B, 1]
    k = topk_indices.shape[1]
    # q as targets: local ids of y_i (weight 1 - alpha) then of the top-K (alpha / K); -1 padding and
    # other shards' ids fall outside every chunk.
    targets = torch.cat([labels[:, None], topk_indices.to(labels.device)], dim=1) - shard_start  # [B, 1 + K]
    q = features_n.new_full((1 + k,), alpha / max(k, 1), dtype=dtype)  # filled on the device, as the shift
    q[0] = 1.0 - alpha
    grad_features_n = torch.zeros_like(features_c)
    grad_weight = torch.empty_like(weight)
    for start, stop in chunk_bounds(len(labels), weight.shape[0], chunk_elements):
        weight_c = as_operand(weight[start:stop], compute_dtype, dtype)
        weight_n = normalize_rows(weight_c)
        grad = torch.addmm(neg_lse, features_c, weight_n.T, alpha=1.0 / temperature).exp_()  # softmax [B, c]
        # Every (sample, slot) adds to a column of the chunk; the targets outside it add an exact zero.
        inside = (targets >= start) & (targets < stop)  # [B, 1 + K]
        grad.scatter_add_(1, (targets - start).clamp(0, stop - start - 1), torch.where(inside, -q, 0.0))
        grad.mul_(grad_scale)
        grad_features_n.addmm_(grad, weight_n)
        grad_weight[start:stop] = reference.normalize_backward(weight_c, weight_n, grad.T @ features_c)
    return grad_features_n.to(features_n.dtype), grad_weight
