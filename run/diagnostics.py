"""Per-epoch diagnostics of the instance classifier: how well the pretext task is solved, and what the smoothing
targets are.

After each forward the classifier reports, for every sample i of the global batch (the same on every rank):
its instance id y_i, the softmax probability of its own class p_i = exp(z_{i,y_i} - lse_i), whether its own
class is the top-1, and the ids h_{i,1..K} of its K hardest other classes (the ones that receive the smoothing
mass alpha / K; model/classifier.py, `Classified`). Over an epoch of B_total samples:

  instance_accuracy   = 100 / B_total * sum_i [argmax_j z_ij = y_i]           (%, the pretext task's top-1)
  own_probability     = 1 / B_total * sum_i p_i
  hardest_same_label  = 100 / (B_total K) * sum_{i,k} [label(h_ik) = label(y_i)]  (%, only when the images have
                        class labels and K > 0; -1 padded ids excluded). Liu et al. (AAAI 2021) motivate top-K
                        smoothing by the hardest classes being often of the same semantic class; chance is the
                        share of same-label images (about 10% on the 10 digits).

and at the end of the epoch the Euclidean norms ||w_j|| of all N classifier rows (sharded: one allreduce each
of the sum, min and max): row_norm_mean / min / max. The cosine softmax normalizes the rows, so their norm
does not change the logits, but it scales each row's effective step size: a row whose norm grows moves less.
"""
import torch

from run.distributed import engine

# Rows per block of the float64 norms: a float64 copy of a whole shard would hold twice its bytes beside the
# weight, its gradient and its momentum at the end of every epoch, the run's largest state.
NORM_BLOCK_ROWS = 65536


class EpochDiagnostics:
    """Accumulates the classifier's per-sample diagnostics over an epoch on the device (no host sync per step)."""

    def __init__(self, labels, device, totals=None):
        """labels: [N] int64 class of each instance, or None when the images have none (a flat folder, -1);
        totals: those of the steps done before a stop inside the epoch (a checkpoint's), else zeros."""
        self.labels = None if labels is None or (labels < 0).any() else labels.to(device)
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)  # samples, top-1, p, same label, pairs
        if totals is not None:
            self.totals += torch.tensor(totals, dtype=torch.float64, device=device)

    def update(self, diagnostics):
        """diagnostics: ids [B], own_probability [B], own_is_top1 [B] bool, hardest [B, K] (-1 padded)."""
        same_label = pairs = torch.zeros((), dtype=torch.float64, device=self.totals.device)
        if self.labels is not None and diagnostics.hardest.numel():
            valid = diagnostics.hardest >= 0
            hardest_labels = self.labels[diagnostics.hardest.clamp(min=0)]
            same = (hardest_labels == self.labels[diagnostics.ids][:, None]) & valid
            same_label, pairs = same.sum(), valid.sum()
        self.totals[0] += len(diagnostics.ids)  # a host number: no copy to the device
        self.totals[1:] += torch.stack([diagnostics.own_is_top1.sum().double(),
                                        diagnostics.own_probability.double().sum(), same_label, pairs]).double()

    def summary(self, weight):
        """The epoch's numbers as {name: float}; weight: this rank's classifier shard [N / P, D]. Collective."""
        samples, top1, own_probability, same_label, pairs = self.totals.tolist()
        result = {"instance_accuracy": 100 * top1 / max(samples, 1), "own_probability": own_probability / max(samples, 1)}
        if pairs:
            result["hardest_same_label"] = 100 * same_label / pairs
        return {**result, **row_norm_statistics(weight)}


@torch.no_grad()
def row_norm_statistics(weight):
    """Mean, min and max of ||w_j|| over the rows of all ranks' shards. Collective."""
    norms = torch.cat([block.double().norm(dim=1) for block in weight.detach().split(NORM_BLOCK_ROWS)])
    group = engine()
    count_and_sum = group.allreduce(torch.stack([torch.tensor(float(len(norms)), dtype=torch.float64),
                                                 norms.sum().cpu()]), op="sum", name="diagnostics.norm_sum")
    empty = len(norms) == 0  # a rank may own no rows when N < P
    low = group.allreduce(torch.tensor([float("inf") if empty else norms.min().item()], dtype=torch.float64),
                          op="min", name="diagnostics.norm_min")
    high = group.allreduce(torch.tensor([float("-inf") if empty else norms.max().item()], dtype=torch.float64),
                           op="max", name="diagnostics.norm_max")
    return {"row_norm_mean": float(count_and_sum[1] / count_and_sum[0]), "row_norm_min": float(low),
            "row_norm_max": float(high)}
