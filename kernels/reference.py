"""Plain-torch reference math of the cosine-softmax cross-entropy with top-K hardest-class smoothing.

Liu et al., "Train a One-Million-Way Instance Classifier for Unsupervised Visual Representation
Learning" (AAAI 2021), sections 3.1-3.3. For a batch row i with feature f_i and instance id y_i,
against classifier rows W_j (one per image):

    z_ij   = <f_i/|f_i|, W_j/|W_j|> / tau                    cosine logits, so z_ij <= 1/tau
    T_i    = the K classes j != y_i with the largest z_ij      (no gradient through the choice;
                                                               ties go to the lower class index)
    q_ij   = 1 - alpha on j = y_i,  alpha/K on j in T_i,  0 elsewhere   (K = 0 means alpha = 0)
    loss_i = logsumexp_j z_ij - sum_j q_ij z_ij,              loss = mean_i loss_i

Three things live here (this module imports no other module of kernels/: the backends build on it):
  * `topk_smoothed_xent`: the dense single-device loss with autograd. It materialises the [B, N]
    logits and is the float64 oracle every other path is tested against.
  * the per-shard "local stats / local backward" pair for a shard of classifier rows
    [shard_start, shard_start + C): `shard_forward_stats` returns what the ranks exchange and
    `shard_backward` turns the merged statistics into this shard's gradients. This dense version is
    the plain-torch backend; `kernels.chunked` and the Triton kernels implement the same pair
    without a [B, C] buffer.
  * `select_topk`, the exact top-K of candidate lists with the oracle's tie rule, which the other
    backends use to merge their partial top-Ks.
"""
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # as F.normalize: rows are divided by max(|x|, eps)


def effective_k(k, num_classes):
    """K is clamped to the N - 1 classes that are not the target."""
    return max(0, min(int(k), num_classes - 1))


def effective_alpha(k, alpha):
    """With no smoothing classes the target keeps all the mass (plain cross-entropy)."""
    return float(alpha) if k > 0 else 0.0


def normalize_rows(x):
    return F.normalize(x, dim=1, eps=NORM_EPS)


def hardest_classes(logits, labels, k):
    """Global ids of the k largest non-target logits per row, ties to the lower index.  [B, k] long"""
    masked = logits.detach().scatter(1, labels[:, None], float("-inf"))
    # A stable descending sort keeps equal values in index order, which is the tie rule.
    return torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]


def select_topk(values, indices, k):
    """The k best candidates of every row from lists in any order, best = larger value, then lower
    class id (the oracle's tie rule).  values [B, M], indices [B, M] -> values [B, k], indices [B, k]

    Used where the candidates do not arrive in class order: the chunks of kernels.chunked (torch.topk
    orders equal values arbitrarily) and the class splits of the Triton forward kernel.
    """
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    best = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, best), indices.gather(1, best)


def topk_smoothed_xent(features, weight, labels, *, temperature, k, alpha):
    """Dense oracle: mean over rows of the smoothed loss. features [B, D], weight [N, D], labels [B]."""
    k = effective_k(k, weight.shape[0])
    alpha = effective_alpha(k, alpha)
    logits = normalize_rows(features) @ normalize_rows(weight).T / temperature  # [B, N]
    target = logits.gather(1, labels[:, None])[:, 0]
    loss = torch.logsumexp(logits, dim=1) - (1.0 - alpha) * target
    if k > 0:
        loss = loss - alpha * logits.gather(1, hardest_classes(logits, labels, k)).mean(dim=1)
    return loss.mean()


def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k):
    """Local statistics of one shard of classifier rows, for the exact cross-rank merge.

    features_n [B, D]: normalized features of the whole (global) batch; weight [C, D]: raw rows
    [shard_start, shard_start + C) of W; labels [B]: global instance ids; k: global (clamped) K.
    Returns, in the features' dtype (fp32 at least):
      sum_exp      [B]     sum_j exp(z_ij - 1/tau) over this shard (fixed shift: z <= 1/tau)
      target_logit [B]     z_{i,y_i} if this shard owns y_i, else 0 (so a sum over shards is exact)
      topk_values  [B, k]  this shard's k largest non-target logits, descending, -inf padded
      topk_indices [B, k]  their global class ids, -1 padded
    """
    logits = features_n @ normalize_rows(weight).T / temperature  # [B, C]
    num_rows = weight.shape[0]
    local = labels - shard_start
    owned = (local >= 0) & (local < num_rows)
    local = local.clamp(0, max(num_rows - 1, 0))
    sum_exp = torch.exp(logits - 1.0 / temperature).sum(dim=1)
    target_logit = torch.where(owned, logits.gather(1, local[:, None])[:, 0], torch.zeros_like(sum_exp))
    masked = logits.masked_fill(owned[:, None] & (torch.arange(num_rows, device=logits.device) == local[:, None]), float("-inf"))
    topk_values = logits.new_full((len(labels), k), float("-inf"))
    topk_indices = torch.full((len(labels), k), -1, dtype=torch.long, device=logits.device)
    take = min(k, num_rows)
    if take > 0:
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :take]
        topk_values[:, :take] = masked.gather(1, order)
        topk_indices[:, :take] = torch.where(topk_values[:, :take] > float("-inf"), order + shard_start, -1)
    return sum_exp, target_logit, topk_values, topk_indices


def smoothing_target(labels, topk_indices, shard_start, num_rows, alpha, dtype):
    """q restricted to this shard's columns, dense.  [B, C]"""
    k = topk_indices.shape[1]
    target = torch.zeros(len(labels), num_rows, dtype=dtype, device=labels.device)
    local = labels - shard_start
    rows = torch.arange(len(labels), device=labels.device)
    owned = (local >= 0) & (local < num_rows)
    target[rows[owned], local[owned]] = 1.0 - alpha
    if k > 0:
        local_topk = topk_indices - shard_start
        owned_topk = (local_topk >= 0) & (local_topk < num_rows)
        target[rows[:, None].expand_as(local_topk)[owned_topk], local_topk[owned_topk]] += alpha / k
    return target


def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_rows, *,
                   temperature, alpha):
    """Gradients of sum_i grad_rows_i * loss_i w.r.t. features_n [B, D] and this shard's raw weight [C, D].

    lse [B] and topk_indices [B, k] are the MERGED (global) statistics. dL/dz_ij = grad_rows_i *
    (softmax_ij - q_ij); z = E W_n^T / tau; W_n = W / |W| contributes the Jacobian
    (g - W_n <g, W_n>) / |W| per row.
    """
    weight_n = normalize_rows(weight)
    logits = features_n @ weight_n.T / temperature  # [B, C]
    q = smoothing_target(labels, topk_indices, shard_start, weight.shape[0], alpha, logits.dtype)
    grad_logits = (torch.exp(logits - lse[:, None]) - q) * (grad_rows[:, None] / temperature)
    grad_features_n = grad_logits @ weight_n  # [B, D]
    grad_weight_n = grad_logits.T @ features_n  # [C, D]
    return grad_features_n, normalize_backward(weight, weight_n, grad_weight_n)


def normalize_backward(weight, weight_n, grad_weight_n):
    """Chain rule through W_n = W / max(|W|, eps), row by row."""
    norm = weight.norm(dim=1, keepdim=True)
    radial = (grad_weight_n * weight_n).sum(dim=1, keepdim=True)
    return torch.where(norm > NORM_EPS, (grad_weight_n - weight_n * radial) / norm.clamp_min(NORM_EPS),
                       grad_weight_n / NORM_EPS)


@torch.no_grad()
def seed_rows_(weight, features, ids, shard_start):
    """Raw-feature init: weight[id - shard_start] = features / |features| for the ids this shard owns.

    weight [C, D] is written in place; features [B, D]; ids [B]. With duplicate ids in one call the
    last occurrence wins (deterministic, unlike a plain index_copy_). Returns the number of rows written.
    """
    sources, rows = last_writers(ids.to(weight.device), shard_start, weight.shape[0])
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    weight[rows] = normalize_rows(features.to(weight.device)[sources].to(compute_dtype)).to(weight.dtype)
    return len(rows)


def last_writers(ids, shard_start, num_rows):
    """Which batch position writes which local row in a seeding: the LAST occurrence of every id in
    [shard_start, shard_start + num_rows). Returns (sources [M] long positions in ids, rows [M] long
    local rows), rows distinct and ascending, so the writes can run in parallel without a race."""
    local = ids - shard_start
    owned = (local >= 0) & (local < num_rows)
    position = torch.arange(len(ids), device=ids.device)
    last = torch.full((num_rows,), -1, dtype=torch.long, device=ids.device)
    last.scatter_reduce_(0, local[owned], position[owned], reduce="amax")
    rows = (last >= 0).nonzero()[:, 0]
    return last[rows], rows
