"""Plain-torch reference math of the cosine-softmax cross-entropy with top-K hardest-class smoothing.

Liu et al., "Train a One-Million-Way Instance Classifier for Unsupervised Visual Representation
Learning" (AAAI 2021), sections 3.1-3.3. For a sample i of the batch with feature f_i and instance id
y_i, against the classes j (one per image, class j has the classifier row W_j):

    z_ij   = <f_i/|f_i|, W_j/|W_j|> / tau                    cosine logits, so z_ij <= 1/tau
    T_i    = the K classes j != y_i with the largest z_ij      (no gradient through the choice;
                                                               ties go to the lower class index)
    q_ij   = 1 - alpha on j = y_i,  alpha/K on j in T_i,  0 elsewhere   (K = 0 means alpha = 0)
    loss_i = logsumexp_j z_ij - sum_j q_ij z_ij,              loss = mean_i loss_i

Three things live here, with the small helpers every backend shares (this module imports no other
module of kernels/: the backends build on it):
  * `topk_smoothed_xent`: the dense single-device loss with autograd. It materialises the [B, N]
    logits and is the float64 oracle every other path is tested against.
  * the per-shard "local stats / local backward" pair for a shard of classes
    [shard_start, shard_start + C): `shard_forward_stats` returns what the ranks exchange and
    `shard_backward` turns the merged statistics into this shard's gradients. This dense version is
    the plain-torch backend; `kernels.chunked` and the Triton kernels implement the same pair
    without a [B, C] buffer.
  * `select_topk`, the exact top-K of candidate lists with the oracle's tie rule, which the other
    backends use to merge their partial top-Ks.

Names, here and in every module of kernels/ and model/classifier.py: `batch` (B) counts samples and
`batch_idx` indexes them; `num_classes` (N) counts the classes of the whole classifier, `shard_classes`
(C) those of one shard, local class ids are positions in the shard; "rows" only ever means the rows of
a matrix (normalize_rows, the rows W_j of the weight).
"""
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # as F.normalize: rows are divided by max(|x|, eps)
# The loss's options and the range each must be in, said once: the kernels, the classifier and the trainer's flags
# judge them here, each naming the option as its caller knows it.
OPTION_RANGES = {"temperature": ("> 0", lambda value: value > 0), "k": (">= 0", lambda value: value >= 0),
                 "alpha": ("in [0, 1)", lambda value: 0 <= value < 1)}


def check_options(names=None, **options):
    """ValueError naming the first of the loss's options (temperature, k, alpha) out of its range; names: what
    the caller calls them, {option: name}."""
    for option, value in options.items():
        wanted, holds = OPTION_RANGES[option]
        if not holds(value):
            raise ValueError(f"{(names or {}).get(option, option)} must be {wanted}, got {value}")


def effective_k(k, num_classes):
    """K is clamped to the N - 1 classes that are not the target."""
    return max(0, min(int(k), num_classes - 1))


def effective_alpha(k, alpha):
    """With no smoothing classes the target keeps all the mass (plain cross-entropy)."""
    return float(alpha) if k > 0 else 0.0


def accumulation_dtype(dtype):
    """The dtype sums and statistics are computed in: the inputs' dtype, but never narrower than fp32."""
    return torch.promote_types(dtype, torch.float32)


def local_class_ids(ids, shard_start, shard_classes):
    """Global class ids -> (ids - shard_start, owned): positions in the shard [shard_start, shard_start +
    shard_classes) and whether the shard holds them (False for other shards' ids and for -1 padding)."""
    local = ids - shard_start
    return local, (local >= 0) & (local < shard_classes)


def relative_error(actual, expected):
    """max |a - e| / max |e| in float64: one scale per tensor, so tiny entries do not dominate (the error
    measure of every comparison with this oracle, in tests/ and bench/)."""
    actual, expected = actual.detach().double(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


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
    """Dense oracle: mean over the batch of the smoothed loss. features [B, D], weight [N, D], labels [B]."""
    k = effective_k(k, weight.shape[0])
    alpha = effective_alpha(k, alpha)
    logits = normalize_rows(features) @ normalize_rows(weight).T / temperature  # [B, N]
    target = logits.gather(1, labels[:, None])[:, 0]
    loss = torch.logsumexp(logits, dim=1) - (1.0 - alpha) * target
    if k > 0:
        loss = loss - alpha * logits.gather(1, hardest_classes(logits, labels, k)).mean(dim=1)
    return loss.mean()


def smoothed_losses(stats, alpha):
    """loss_i = lse_i - (1 - alpha) z_{i,y_i} - alpha/K sum_{j in T_i} z_ij from per-sample statistics: a
    namespace of lse [B], target_logit [B] and topk_values [B, K] (the logits of the K smoothing classes)."""
    losses = stats.lse - (1.0 - alpha) * stats.target_logit
    if stats.topk_values.shape[1] > 0:
        losses = losses - alpha * stats.topk_values.mean(dim=1)
    return losses


def shard_forward_stats(features_n, weight, labels, shard_start, *, temperature, k, compute_dtype=None):
    """Local statistics of one shard of classes, for the exact cross-rank merge, packed for the exchange.

    features_n [B, D]: normalized features of the whole (global) batch; weight [C, D]: raw rows
    [shard_start, shard_start + C) of W; labels [B]: global instance ids; k: how many candidates to
    report; compute_dtype: the products' operands are rounded to it (None: taken as they are). Returns
    pack_shard_stats of, in accumulation_dtype(features_n.dtype):
      sum_exp      [B]     sum_j exp(z_ij - 1/tau) over this shard (fixed shift: z <= 1/tau)
      target_logit [B]     z_{i,y_i} if this shard owns y_i, else 0 (so a sum over shards is exact)
      topk_values  [B, k]  this shard's k largest non-target logits, descending, -inf padded
      topk_indices [B, k]  their global class ids, -1 padded
    """
    features_c, weight_c = product_operands(features_n, weight, compute_dtype)
    logits = features_c @ normalize_rows(weight_c).T / temperature  # [B, C]
    shard_classes = weight.shape[0]
    local, owned = local_class_ids(labels, shard_start, shard_classes)
    local = local.clamp(0, max(shard_classes - 1, 0))
    sum_exp = torch.exp(logits - 1.0 / temperature).sum(dim=1)
    target_logit = torch.where(owned, logits.gather(1, local[:, None])[:, 0], torch.zeros_like(sum_exp))
    masked = logits.masked_fill(owned[:, None] & (torch.arange(shard_classes, device=logits.device) == local[:, None]), float("-inf"))
    topk_values = logits.new_full((len(labels), k), float("-inf"))
    topk_indices = torch.full((len(labels), k), -1, dtype=torch.long, device=logits.device)
    take = min(k, shard_classes)
    if take > 0:
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :take]
        topk_values[:, :take] = masked.gather(1, order)
        topk_indices[:, :take] = torch.where(topk_values[:, :take] > float("-inf"), order + shard_start, -1)
    return pack_shard_stats(sum_exp, target_logit, topk_values, topk_indices)


def product_operands(features_n, weight, compute_dtype):
    """features_n and weight as the products see them (as_operand), in accumulation_dtype(features_n.dtype)."""
    dtype = accumulation_dtype(features_n.dtype)
    return as_operand(features_n, compute_dtype, dtype), as_operand(weight, compute_dtype, dtype)


def as_operand(x, compute_dtype, dtype):
    """x rounded to compute_dtype (None: as it is), held in dtype. Gradients flow through the rounding
    unchanged (as through autograd's .to): the parameters and their gradients keep their own dtype."""
    return x.to(compute_dtype or x.dtype).to(dtype)


# The statistics of one shard travel as ONE block per sample, [B, 2 + 2K] in their own float dtype:
#   [sum_exp, target_logit, K values, K class ids]
# with the class ids stored as the bits of the integer of the same width (int32 in a float32 block, int64
# in a float64 one): exact for every id below 2^31, and nothing is rounded on the way.
ID_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def pack_shard_stats(sum_exp, target_logit, topk_values, topk_indices):
    """The exchange block [B, 2 + 2K] of one shard (see above), in the dtype of the values."""
    k = topk_values.shape[1]
    block = torch.cat([sum_exp[:, None], target_logit[:, None], topk_values, torch.empty_like(topk_values)], dim=1)
    stats_ids(block, k).copy_(topk_indices)
    return block


def stats_ids(block, k):
    """The class ids of an exchange block [..., 2 + 2k] (or a stack of them), as integers: a view."""
    return block[..., 2 + k:].view(ID_BITS[block.dtype])


def unpack_shard_stats(block, k):
    """Views of the four parts of an exchange block: sum_exp, target_logit, topk_values, topk_indices."""
    return block[..., 0], block[..., 1], block[..., 2:2 + k], stats_ids(block, k)


def smoothing_target(labels, topk_indices, shard_start, shard_classes, alpha, dtype):
    """q restricted to this shard's classes, dense.  [B, C]"""
    k = topk_indices.shape[1]
    target = torch.zeros(len(labels), shard_classes, dtype=dtype, device=labels.device)
    batch_idx = torch.arange(len(labels), device=labels.device)
    local, owned = local_class_ids(labels, shard_start, shard_classes)
    target[batch_idx[owned], local[owned]] = 1.0 - alpha
    if k > 0:
        local_topk, owned_topk = local_class_ids(topk_indices, shard_start, shard_classes)
        target[batch_idx[:, None].expand_as(local_topk)[owned_topk], local_topk[owned_topk]] += alpha / k
    return target


def shard_backward(features_n, weight, labels, shard_start, lse, topk_indices, grad_losses, *,
                   temperature, alpha, compute_dtype=None):
    """Gradients of sum_i grad_losses_i * loss_i w.r.t. features_n [B, D] and this shard's raw weight [C, D],
    in their dtypes.

    lse [B] and topk_indices [B, k] are the MERGED (global) statistics. dL/dz_ij = grad_losses_i *
    (softmax_ij - q_ij); z = E W_n^T / tau; W_n = W / |W| contributes the Jacobian
    (g - W_n <g, W_n>) / |W| per row. compute_dtype as in shard_forward_stats.
    """
    features_c, weight_c = product_operands(features_n, weight, compute_dtype)
    weight_n = normalize_rows(weight_c)
    logits = features_c @ weight_n.T / temperature  # [B, C]
    q = smoothing_target(labels, topk_indices, shard_start, weight.shape[0], alpha, logits.dtype)
    grad_logits = (torch.exp(logits - lse[:, None]) - q) * (grad_losses[:, None] / temperature)
    grad_features_n = grad_logits @ weight_n  # [B, D]
    grad_weight_n = grad_logits.T @ features_c  # [C, D]
    return (grad_features_n.to(features_n.dtype),
            normalize_backward(weight_c, weight_n, grad_weight_n).to(weight.dtype))


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
    sources, classes = last_writers(ids.to(weight.device), shard_start, weight.shape[0])
    features = features.to(weight.device)[sources]
    weight[classes] = normalize_rows(features.to(accumulation_dtype(features.dtype))).to(weight.dtype)
    return len(classes)


def last_writers(ids, shard_start, shard_classes):
    """Which batch position writes which class of the shard in a seeding: the LAST occurrence of every id
    in [shard_start, shard_start + shard_classes). Returns (sources [M] long positions in ids, classes [M]
    long local class ids), classes distinct and ascending, so the writes can run in parallel without a race."""
    local, owned = local_class_ids(ids, shard_start, shard_classes)
    position = torch.arange(len(ids), device=ids.device)
    last = torch.full((shard_classes,), -1, dtype=torch.long, device=ids.device)
    last.scatter_reduce_(0, local[owned], position[owned], reduce="amax")
    classes = (last >= 0).nonzero()[:, 0]
    return last[classes], classes
