"""Shared random problems for the classifier tests: the worker and the oracle side build the same data."""
import torch

# N = 1001 is divisible by neither 2 nor 3; batch 13 splits unevenly over 2 and 3 ranks.
CASES = {
    "smooth": dict(instances=1001, dim=16, batch=13, k=5, alpha=0.2, temperature=0.15),
    "plain_k0": dict(instances=1001, dim=16, batch=13, k=0, alpha=0.2, temperature=0.07),
    "plain_alpha0": dict(instances=1001, dim=16, batch=13, k=5, alpha=0.0, temperature=1.0),
    "k_beyond_n": dict(instances=7, dim=8, batch=5, k=50, alpha=0.3, temperature=0.15),
}
SGD_STEP = dict(instances=50, dim=8, lr=0.5,
                inputs=lambda: torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
                labels=lambda: torch.randperm(50, generator=torch.Generator().manual_seed(2))[:9])


def make_problem(case, seed=0):
    """Global float64 features [B, D], weight [N, D] and labels [B] (distinct ids, as in an epoch). Every
    other sample's own row is its feature (as after the raw-feature init), so that the own class is the
    top-1 for some samples and not for others."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(case["batch"], case["dim"], dtype=torch.float64, generator=generator)
    weight = torch.randn(case["instances"], case["dim"], dtype=torch.float64, generator=generator)
    labels = torch.randperm(case["instances"], generator=generator)[:case["batch"]]
    weight[labels[::2]] = features[::2]
    return features, weight, labels


def batch_slice(batch, rank, size):
    """Uneven split of a global batch: rank r takes one more than rank r + 1 where it does not divide."""
    base, extra = divmod(batch, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def tiny_backbone():
    """No batch norm, so the distributed step must equal the single-process step exactly."""
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 8)).double()


def diagnostics(classified):
    """The per-sample numbers of a model.classifier.Classified that the workers save, by name."""
    return {key: getattr(classified, key) for key in ("ids", "own_probability", "own_is_top1", "hardest")}
